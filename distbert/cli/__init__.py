"""The command line: one module per subcommand; :mod:`distbert.cli.main` is the entry point."""
