"""Checkpoints: what a run needs to continue exactly where it stopped, written so that a kill never
leaves one that cannot be read.

    save_checkpoint(run_dir, step, {"models": ..., "optimizers": ..., ...}, keep=2)
    state = load_checkpoint(latest_checkpoint(run_dir))

A checkpoint is `run_dir/checkpoints/step_000012/state.pt` (one `torch.save` of a dict). It is written
into a temporary folder, flushed to disk, and renamed into place: a rename is atomic, so a checkpoint
folder either exists whole or not at all, and a half-written temporary folder is ignored and removed.
The trainers put in it: the step, every model's and optimizer's and scheduler's state, every random
generator's state (`rng_state`), how many bytes of metrics.jsonl belong to the run so far, the elapsed
wall-clock and the part of it spent in held-out evaluations (the training clock is their difference), and the
algorithm's run-long state (Numca's table, PRIME's surplus prompts).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "step_"


def rng_state() -> dict:
    """The state of every random generator a trainer draws from (Python, NumPy, torch CPU and CUDA)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str, step: int, state: dict, keep: int) -> Path:
    """Write `state` as the checkpoint of `step` atomically, then delete all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".{PREFIX}{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save({**state, "step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from an earlier attempt
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob(PREFIX + "*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> Path | None:
    """The newest complete checkpoint of a run folder (temporary folders of an interrupted write are removed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for tmp in root.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = sorted(p for p in root.glob(PREFIX + "*") if (p / "state.pt").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> dict:
    # weights_only=False: the state holds NumPy's and Python's RNG states. Only load checkpoints you wrote.
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def saved_args(run_dir: str) -> dict:
    """The arguments a run was started with (its run_dir/args.json), for --resume."""
    path = Path(run_dir) / "args.json"
    if not path.exists():
        raise SystemExit(f"error: {run_dir} has no args.json: pass --resume the folder of a run this script started")
    return json.loads(path.read_text())
