"""``python -m llada`` runs the command line."""

from llada.cli import main

raise SystemExit(main())
