"""Flags that change how a run goes rather than what it learns, each tried end to end on the tiny model:
--gradient-checkpointing on (the CUDA default, also on the CPU), float32 (the CPU default) and --bf16 on (the CUDA
default), the training clock (--max-minutes, --eval-every-minutes), and a step whose every micro-batch the ratio
guard skips."""

import json
import math

import torch

from conftest import run_tiny, without_timing
from common.models import TINY_MODEL, load_model

RUN = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "4", "--minibatch-size", "4",
       "--micro-batch-size", "2", "--num-eval-problems", "2", "--max-new-tokens", "12", "--eval-every", "2",
       "--learning-rate", "1e-4"]


def test_gradient_checkpointing_changes_no_number(tmp_path):
    """Recomputing the activations in the backward pass runs the same arithmetic: PPO's policy and critic,
    trained with and without it, log the same numbers to the last bit. Both under bf16 autocast (--bf16 on), as
    on CUDA where both are the default: the bf16 path end to end on the CPU."""
    _, on = run_tiny("ppo.py", tmp_path / "on", *RUN, "--gradient-checkpointing", "on", "--bf16", "on",
                     "--no-save-model", save_model=False)
    _, off = run_tiny("ppo.py", tmp_path / "off", *RUN, "--gradient-checkpointing", "off", "--bf16", "on",
                      "--no-save-model", save_model=False)
    trained = [r for r in on if "losses/approx_kl" in r]
    assert len(trained) == 2 and trained[-1]["losses/approx_kl"] > 0  # the weights moved
    assert without_timing(on) == without_timing(off)


def test_the_cpu_default_trains_in_float32(tmp_path):
    """On the CPU --bf16 auto is float32 compute. Unchanged weights then give exactly the reference's log-probs (k3 KL 0)
    on a step that also trains (the KL of step 1 is taken before its first update), and the run learns.
    The same run checks the training clock: with --eval-every-minutes (here a few microseconds) it evaluates
    after every step whatever --eval-every says, and train_s is wall_s less the evaluations: the two differ
    by a gap that grows at each evaluation and at nothing else."""
    _, records = run_tiny("numca.py", tmp_path, *RUN, "--kl-coef", "0.001", "--no-save-model",
                          "--eval-every-minutes", "1e-7", save_model=False)
    trained = [r for r in records if "losses/approx_kl" in r]
    assert len(trained) == 2 and trained[0]["losses/approx_kl"] > 0
    assert trained[0]["losses/kl_ref_k1"] == 0.0  # the sampling-time log-probs equal the reference's at step 1
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1, 2]  # --eval-every 2 would skip step 1
    gaps = [r["wall_s"] - r["train_s"] for r in records]
    assert all(r["train_s"] > 0 for r in records[1:]) and gaps[0] > 0  # step 0's evaluation is not training
    for before, after, r in zip(gaps, gaps[1:], records[1:]):
        assert after > before if "eval_accuracy" in r else after == before, r


def test_max_minutes_ends_the_run_evaluates_and_saves(tmp_path):
    run_dir, records = run_tiny("vineppo.py", tmp_path, *RUN, "--num-steps", "50", "--max-minutes", "0.001",
                                "--num-mc-rollouts", "2")
    trained = [r for r in records if "losses/policy_loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    assert len(trained) == 1  # the clock ran out during step 1
    assert [r["step"] for r in evals] == [0, 1]  # the evaluation before training, and one when time ran out
    assert json.loads((run_dir / "args.json").read_text())["max_minutes"] == 0.001


def test_a_step_whose_micro_batches_are_all_skipped_logs_no_loss(tmp_path):
    """--max-ratio far below 1 skips every micro-batch: the weights stay as they were, and the step's losses
    are absent from the log (they were NaN: the mean of no values)."""
    run_dir, records = run_tiny("numca.py", tmp_path, *RUN, "--num-steps", "1", "--max-ratio", "1e-6")
    (step,) = [r for r in records if "losses/skipped" in r]
    assert step["losses/skipped"] == 4  # 8 samples in micro-batches of 2
    assert not any(k in step for k in ("losses/policy_loss", "losses/approx_kl", "losses/clipfrac", "losses/entropy"))
    assert all(not isinstance(v, float) or math.isfinite(v) for v in step.values())
    before, after = load_model(TINY_MODEL), load_model(str(run_dir / "final_model"))
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
