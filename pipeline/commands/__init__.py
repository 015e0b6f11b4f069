"""One module per ``latentpipe`` subcommand: ``NAME``, ``HELP``, ``add_arguments``, ``run``."""
