"""Shared fixtures: the tiny model (`tiny`: SmolLM2's tokenizer, 2 layers, taught the `digits` task so that
about half of its sampled answers are right) and a script runner."""

import json
import math
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


# The fields of metrics.jsonl that are clocks: they differ from run to run by nature.
TIMING = ("wall_s", "train_s", "charts/step_time")


def without_timing(records: list[dict]) -> list[dict]:
    """Metrics records without their clocks (TIMING and every `time/` part): what two equal runs share."""
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("time/")} for r in records]


# The tiny model on the task it was taught: rewards of both kinds in most groups of samples.
TINY_TASK = ["--model", "tiny", "--dataset", "digits"]


def run_tiny(script: str, tmp_path: Path, *args: str, save_model: bool = True,
             rewarded: bool = True) -> tuple[Path, list[dict]]:
    """Run `script`'s main() end to end in this process (no interpreter start: ~4 s less a run) on the tiny model
    and the digits task (flags in `args` come after, so they win); check it wrote a final model (unless the run
    says --no-save-model), only finite losses and (unless `rewarded` is False) earned a reward in some step.
    Returns the run folder and the records of its metrics.jsonl. What a user sees from the command line (one
    `error:` line, Ctrl-C, a kill and --resume) is tested with run_script, in a subprocess."""
    import importlib

    import tyro

    module = importlib.import_module(script[:-3])
    module.main(tyro.cli(module.Args, args=[*TINY_TASK, "--output-dir", str(tmp_path), *args]))
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "charts/reward_mean" in r]
    assert train and all(math.isfinite(v) for r in train for k, v in r.items() if k.startswith("losses/"))
    assert not rewarded or any(r["charts/reward_mean"] > 0 for r in train), "no step earned a reward"
    assert (run_dir / "final_model" / "config.json").exists() == save_model
    return run_dir, records
