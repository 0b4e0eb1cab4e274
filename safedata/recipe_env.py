"""What scripts/recipe_env.sh takes from the package, by the package's own rules: the folder key of a model
(models.folder_key) and the template the CLIs would choose (templates.choose_template).

    python -m safedata.recipe_env MODEL [TEMPLATE]   ->  two lines: the folder key, the template

One line on stderr and exit 2 when the model cannot be read (no tokenizer, a Hub id not downloaded)."""
from __future__ import annotations

import sys

from .models import folder_key
from .templates import choose_template


def recipe_values(model: str, template: str | None) -> tuple[str, str]:
    """(folder key, template): the template as given, or the model's own when None."""
    return folder_key(model), choose_template(model, template or None)


def main(argv: list[str]) -> int:
    model, template = argv[0], (argv[1] if len(argv) > 1 else "")
    try:
        key, chosen = recipe_values(model, template)
    except Exception as err:  # one line, whatever failed to read
        problem = (str(err).splitlines() or [""])[0]
        print(f"error: MODEL={model}: could not read it ({type(err).__name__}: {problem}); set MODEL to a model "
              "directory or a downloaded Hub id (or MODEL_NAME and TEMPLATE to skip reading it)", file=sys.stderr)
        return 2
    print(key)
    print(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
