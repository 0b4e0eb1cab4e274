"""The root CLIs' work, one module a CLI: `main(parse_args)` builds the CLI's parser from its stage's settings and
calls the stage; `console()` is the installed console script (`safedata-<name>`, pyproject.toml). The root scripts
(`rank.py`, ...) call `main`, so a CLI is written once."""
