"""Every `nanosil` subcommand, one module each (`add_arguments(parser)`, `run(args) -> int`), listed in :mod:`al_manager.cli`."""
