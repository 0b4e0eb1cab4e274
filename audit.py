"""The audit CLI, written once in safedata/commands/audit.py (installed: safedata-audit)."""
from safedata.cli import parse_args, run
from safedata.commands import audit as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
