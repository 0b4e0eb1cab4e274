"""The get_gradients CLI, written once in safedata/commands/get_gradients.py (installed: safedata-get_gradients)."""
from safedata.cli import parse_args, run
from safedata.commands import get_gradients as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
