"""``python -m stamen`` is the ``stamen`` command."""

from stamen.cli.main import main

main()
