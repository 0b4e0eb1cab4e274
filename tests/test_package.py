"""The installable package (pyproject.toml): built and installed into a fresh venv, docs/PYTHON.md's example runs
from another directory with that venv's python and ranks as a NumPy brute force over the features it wrote; a
console script starts; pyproject.toml's pins are requirements.txt's; the root CLIs are safedata.commands'."""
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "ft_datasets" / "lab"
CLIS = ["get_representation", "get_gradients", "score", "rank", "audit", "finetune", "generate", "evaluate",
        "summarize"]
# CI (.ci/run sets SAFEDATA_REQUIRE_SHARED=1; other CI systems set CI) must run this test: no skip there.
IN_CI = bool(os.environ.get("CI")) or os.environ.get("SAFEDATA_REQUIRE_SHARED") == "1"


def cannot(reason):
    if IN_CI:
        pytest.fail(f"in CI the package test must run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv (no pip of its own) that sees this interpreter's site-packages through a .pth file, with
    safedata built from a copy of the repo's pyproject.toml and safedata/ and installed as a wheel (not
    editable: the wheel's package list is what is tested; the copy keeps build files out of the work tree)."""
    work = tmp_path_factory.mktemp("package")
    src = work / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "safedata", src / "safedata", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = work / "venv"
    try:
        venv.EnvBuilder(with_pip=False).create(env_dir)
    except Exception as err:  # noqa: BLE001 - the reason is reported
        cannot(f"cannot create a venv: {err}")
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_safedata_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--no-cache-dir", "--disable-pip-version-check", "-q", str(src)],
                             capture_output=True, text=True, env=clean_env(), cwd=work)
    assert install.returncode == 0, install.stdout + install.stderr
    return env_dir


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def example_code(model, pool, anchors, work) -> str:
    """docs/PYTHON.md's python block with its four path lines set to these paths."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "PYTHON.md").read_text(), re.S).group(1)
    values = {"MODEL": repr(str(model)), "POOL": repr(str(pool)), "ANCHORS": repr([str(a) for a in anchors]),
              "WORK": f"Path({str(work)!r})"}
    for name, value in values.items():
        block, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", block, flags=re.M)
        assert n == 1, f"docs/PYTHON.md: no single `{name} = ...` line"
    return block


def features(directory) -> tuple[np.ndarray, list[int]]:
    meta = json.loads((Path(directory) / "meta.json").read_text())
    return load_file(str(Path(directory) / "features.safetensors"))["features"].astype(np.float64), meta["indices"]


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_docs_example_runs_from_the_installed_package_and_ranks_as_a_brute_force(installed, tiny_model_dir,
                                                                                      tmp_path):
    pool = tmp_path / "pool.json"   # the lab's placeholder pool, its first 300 records: seconds on a CPU
    pool.write_text(json.dumps(json.loads((LAB / "pool.json").read_text())[:300]))
    anchors = [LAB / "anchors_harmful.jsonl", LAB / "anchors_safe.jsonl"]
    work = tmp_path / "work"
    script = tmp_path / "example.py"
    script.write_text("import safedata\nprint('FILE', safedata.__file__)\n"
                      + example_code(tiny_model_dir, pool, anchors, work))
    run = subprocess.run([installed / "bin" / "python", script], cwd=tmp_path, capture_output=True, text=True,
                         env=clean_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    where = Path(next(line for line in lines if line.startswith("FILE ")).split(" ", 1)[1])
    assert installed in where.parents, where          # the installed copy, not the work tree
    subset, index_csv = Path(lines[-2]), Path(lines[-1])
    # Brute force: +1 x the max cosine to a harmful anchor, -1 x the max cosine to a safe one; the 10 highest.
    pool_x, indices = features(work / "pool")
    total = np.zeros(len(indices))
    for weight, anchor in zip([1, -1], anchors):
        anchor_x, _ = features(work / anchor.stem)
        total += weight * (unit(pool_x) @ unit(anchor_x).T).max(axis=1)
    order = np.argsort(-total, kind="stable")[:10]
    records = json.loads(pool.read_text())
    assert json.loads(subset.read_text()) == [records[indices[i]] for i in order]
    rows = list(csv.DictReader(io.StringIO(index_csv.read_text())))
    assert [int(r["index"]) for r in rows] == [indices[i] for i in order]
    assert [float(r["score"]) for r in rows] == pytest.approx(total[order], abs=1e-5)


def test_a_console_script_answers_as_its_root_cli(installed):
    console = subprocess.run([installed / "bin" / "safedata-rank", "--help"], capture_output=True, text=True,
                             env=clean_env(), cwd=installed, timeout=120)
    assert console.returncode == 0, console.stderr[-2000:]
    root = subprocess.run([sys.executable, ROOT / "rank.py", "--help"], capture_output=True, text=True,
                          env=clean_env(), cwd=ROOT, timeout=120)
    # argparse wraps the usage after the program name: compare from the first blank line (description, flags)
    assert console.stdout.split("\n\n", 1)[1] == root.stdout.split("\n\n", 1)[1]


def test_every_root_cli_is_its_commands_module():
    """A CLI is written once: the root script calls safedata.commands.<name>.main, which pyproject.toml's console
    script runs too."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"safedata-{name}": f"safedata.commands.{name}:console" for name in CLIS}
    for name in CLIS:
        text = (ROOT / f"{name}.py").read_text()
        assert f"from safedata.commands import {name} as command" in text and "command.main(parse_args)" in text


def test_pyproject_pins_are_requirements_txt_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            pins[spec.split("==")[0]] = spec
    test_tools = {"pytest", "hypothesis"}
    assert sorted(project["dependencies"]) == sorted(v for k, v in pins.items() if k not in test_tools)
    assert project["requires-python"] == ">=3.11" and project["version"] == "0.1.0"
