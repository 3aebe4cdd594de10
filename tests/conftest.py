"""Shared fixtures: the tiny random model (SmolLM2's tokenizer, 2 layers) and a script runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tokenizer():
    from common.models import TINY_MODEL, load_tokenizer

    return load_tokenizer(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_model():
    from common.models import TINY_MODEL, load_model

    return load_model(TINY_MODEL)


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a top-level script as a user would, from the repository root; returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
