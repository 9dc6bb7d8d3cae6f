"""``python -m agent SUBCOMMAND ...``: the same as the ``torchbay`` command."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
