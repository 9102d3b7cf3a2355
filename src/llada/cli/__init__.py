"""The ``llada`` command: a table of subcommands (``main``), each a typed function in the module of its
command family. Nothing in the library imports this package."""
