"""One method of bench/bench_gradients.py, measured in a process of its own, so that on CPU its peak RSS is its
alone (bench_gradients.run_width starts it; not run by hand):

  python bench/gradient_worker.py SPEC.json

SPEC.json (written by run_width): the parent's parsed flags (`args`), the width (`hidden`), the method, the
parent's target and tokenizer files, and `out`, where the measurement is written as JSON.
"""
import json
import sys
from pathlib import Path

from bench_gradients import measure_spec


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["out"]).write_text(json.dumps(measure_spec(spec)))


if __name__ == "__main__":
    main(*sys.argv[1:])
