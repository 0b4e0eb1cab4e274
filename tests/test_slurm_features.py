"""A SLURM array job of sharded feature extraction merges to exactly what a single run writes."""
import json

import pytest

from conftest import ROOT, python
from slurm_util import require_slurm, submit, wait_ok
from safedata.features.representations import RepresentationArgs, extract_representations


def test_array_job_sharded_representations_equal_single_run(tiny_model_dir, tmp_path):
    require_slurm()
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"instruction": f"Describe thing {i}", "input": "",
                                 "output": "1. A part.\n2. Another part." * (1 + i % 3)} for i in range(23)]))
    single = tmp_path / "single"
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=single,
                                               batch_size=4, chunk_size=3, dtype="fp32"))
    sharded = tmp_path / "sharded"
    script = tmp_path / "extract.sh"
    # No --shard flag: each array task finds its part from SLURM_ARRAY_TASK_ID / _COUNT.
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      f'"{python()}" "{ROOT / "get_representation.py"}" --model_name "{tiny_model_dir}" '
                      f'--data_path "{pool}" --output_dir "{sharded}" --batch_size 4 --chunk_size 3 --dtype fp32\n')
    script.chmod(0o755)
    job = submit(script, sbatch_args=["--array=0-2", f"--output={tmp_path}/task-%a.out", "--time=10"])
    states = wait_ok(job, timeout=300)
    assert sorted(states.values()) == ["COMPLETED"] * 3
    assert (sharded / "features.safetensors").read_bytes() == (single / "features.safetensors").read_bytes()
    # Each task either merged (the last to finish) or left the merge to the others: none ended silently.
    logs = [(tmp_path / f"task-{i}.out").read_text() for i in range(3)]
    assert [("wrote " in t) + ("still to do in other shards" in t) for t in logs] == [1, 1, 1], logs
