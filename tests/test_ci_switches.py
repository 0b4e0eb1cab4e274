"""CI's switches: with SAFEDATA_REQUIRE_SHARED=1 a test of the real data fails where ../shared/data is missing."""
import os
import subprocess

from conftest import ROOT, python

REAL_DATA_TEST = "tests/test_data.py::test_load_real_gsm8k_dolly_anchors_advbench"


def run_without_shared_data(tmp_path, **env):
    environment = {k: v for k, v in os.environ.items() if k != "SAFEDATA_REQUIRE_SHARED"}
    environment.update(SAFEDATA_SHARED_DATA=str(tmp_path / "no-shared-data"), **env)
    return subprocess.run([python(), "-m", "pytest", REAL_DATA_TEST, "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)


def test_missing_shared_data_skips_on_a_laptop_and_fails_in_ci(tmp_path):
    laptop = run_without_shared_data(tmp_path)
    assert laptop.returncode == 0 and "1 skipped" in laptop.stdout, laptop.stdout[-2000:]
    ci = run_without_shared_data(tmp_path, SAFEDATA_REQUIRE_SHARED="1")
    assert ci.returncode == 1 and "1 error" in ci.stdout, ci.stdout[-2000:]   # fails in the fixture
    assert "SAFEDATA_REQUIRE_SHARED=1 but" in ci.stdout
