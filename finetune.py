"""The finetune CLI, written once in safedata/commands/finetune.py (installed: safedata-finetune)."""
from safedata.cli import parse_args, run
from safedata.commands import finetune as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
