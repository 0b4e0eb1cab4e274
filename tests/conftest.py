import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SAFEDATA_SHARED_DATA") or ROOT.parent / "shared" / "data")
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama with the project's own tokenizer, built once per test session."""
    from safedata.models import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2,
                               num_heads=4, vocab_size=1024, seed=0))


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (the real files). A fresh clone skips the tests that read it; CI has it and sets
    SAFEDATA_REQUIRE_SHARED=1 (.ci/run), which turns the skip into a failure, so CI can never pass by skipping."""
    if not SHARED.exists():
        if os.environ.get("SAFEDATA_REQUIRE_SHARED") == "1":
            pytest.fail(f"SAFEDATA_REQUIRE_SHARED=1 but {SHARED} is not there", pytrace=False)
        pytest.skip("../shared/data not present (a user's fresh clone)")
    return SHARED


def python():
    return str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
