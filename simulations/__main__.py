"""``python -m simulations`` is the ``stamen`` command."""

from simulations.cli import main

main()
