"""``python -m stemstream``: the same as the ``stemstream`` command."""

from stemstream.cli.app import main

main()
