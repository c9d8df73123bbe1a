"""One module per `qmoe` subcommand (see qmoe/cli.py)."""
