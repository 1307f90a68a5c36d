"""``python -m flowstate``: the ``flowstate`` command."""

from flowstate.cli import main

main()
