import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama with the project's own tokenizer, built once per test session."""
    from safedata.models import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2,
                               num_heads=4, vocab_size=1024, seed=0))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED.exists():
        pytest.skip("../shared/data not present (a user's fresh clone)")
    return SHARED


def python():
    return str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
