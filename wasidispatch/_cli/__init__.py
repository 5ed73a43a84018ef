"""Subcommands of the ``wasidispatch`` command line, one module each (see `wasidispatch.cli`)."""
