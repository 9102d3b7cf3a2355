"""``python -m llada`` runs the command line."""

from llada.cli.main import main

raise SystemExit(main())
