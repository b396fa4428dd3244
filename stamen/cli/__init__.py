"""The ``stamen`` command line: one front door (:mod:`stamen.cli.main`) with a subcommand per job."""
