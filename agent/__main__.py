"""``python -m agent SUBCOMMAND ...``: the same as the ``torchbay`` command."""

from agent.cli import run

if __name__ == "__main__":
    run()
