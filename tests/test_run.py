"""The run's bookkeeping (common/run.py), which every trainer uses: --track really reaches wandb, --resume refuses
a folder that is not this script's run before any model is loaded, and the shared argument checks.

The rest of what Run does (metrics.jsonl, checkpoints and resume, Ctrl-C, the final model) is checked through the
trainers themselves in tests/test_trainers.py."""

import importlib
import json
import struct
import time

import pytest
import tyro

from conftest import run_script, run_tiny

pytest.importorskip("wandb")

TINY = ["--model", "tiny", "--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "2", "--max-new-tokens", "8",
        "--eval-every", "2", "--no-save-model"]


def wandb_history(path) -> list[dict]:
    """The history rows of an offline run's .wandb file: the LevelDB log format (a 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header: checksum, length, type), each record a protobuf
    Record. wandb ships no reader for it in Python, so this is the smallest one that reads the history."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the end of a block is padded with zeros
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_track_sends_the_step_metrics_and_the_evaluation_to_wandb(tmp_path, monkeypatch):
    # wandb patches TensorBoard only for writers made after wandb.init: before the fix the run held no metric.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    proc = run_script("vineppo.py", *TINY, "--num-mc-rollouts", "2", "--output-dir", str(tmp_path), "--track")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(wandb_file)
    logged = {key for row in rows for key in row}
    for key in ("charts/reward_mean", "losses/policy_loss", "losses/approx_kl", "vine/continuations", "time/update",
                "charts/eval_accuracy"):
        assert key in logged, key
    # The same numbers as metrics.jsonl: the step-2 policy loss, and the evaluations at steps 0 and 2.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step2 = next(r for r in records if r["step"] == 2 and "losses/policy_loss" in r)
    by_step = {row["global_step"]: row for row in rows if "losses/policy_loss" in row}
    assert by_step[2]["losses/policy_loss"] == pytest.approx(step2["losses/policy_loss"], rel=1e-6)
    evals = sorted(row["global_step"] for row in rows if "charts/eval_accuracy" in row)
    assert evals == [r["step"] for r in records if "eval_accuracy" in r] == [0, 2]


def test_resume_of_another_scripts_run_is_one_line(tmp_path):
    run_dir, _ = run_tiny("ppo.py", tmp_path, *TINY[4:], "--save-every", "1", "--num-steps", "1", save_model=False)
    proc = run_script("vineppo.py", "--resume", str(run_dir))  # as a user sees it: one line, no traceback
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("error:") and "is not a run of this script" in last, last
    for script in ("numca.py", "hista.py", "prime_implicit_prm.py"):  # the same check in each: in-process
        module = importlib.import_module(script[:-3])
        with pytest.raises(SystemExit, match="^error: .*is not a run of this script"):
            module.main(tyro.cli(module.Args, args=["--resume", str(run_dir)]))
    # A run of this script started before a flag existed (here: before issue 30, with --bf16 a bool and no
    # --eval-every-minutes) resumes, the new flag at its default, the old bool meaning what it meant.
    saved = json.loads((run_dir / "args.json").read_text())
    del saved["eval_every_minutes"]
    (run_dir / "args.json").write_text(json.dumps({**saved, "bf16": True}))
    ppo = importlib.import_module("ppo")
    args = ppo.resume_args(ppo.Args, tyro.cli(ppo.Args, args=["--resume", str(run_dir)]))
    assert args.eval_every_minutes is None and args.bf16 is True and args.num_steps == 1
    ppo.main(tyro.cli(ppo.Args, args=["--resume", str(run_dir)]))  # nothing left to run: it resumes and finishes


def test_evaluation_grades_with_the_question():
    from common.data import Problem
    from common.generation import Completion
    from common.run import evaluate

    class Echo:  # answers every prompt with a fixed text
        def __init__(self, text):
            self.text = text

        def generate(self, inputs, n=1, **kw):
            return [[Completion([1, 2], self.text, True)] for _ in inputs]

    class Tokenizer:
        def apply_chat_template(self, messages, **kw):
            return [1, 2, 3]

    problems = [Problem("Calculate 59 * 100.", "5900")] * 2
    assert evaluate(Echo("\\boxed{59 * 100}"), Tokenizer(), problems, 8)[0] == 0.0
    assert evaluate(Echo("\\boxed{5900}"), Tokenizer(), problems, 8)[0] == 1.0


def test_evaluation_in_chunks_gives_what_one_call_gives(tiny_model, tokenizer):
    """The progress bar's chunks are the hf generator's own batches: the same greedy tokens as one call, in order."""
    from common.data import load_problems, prompt_ids
    from common.generation import HFGenerator
    from common.run import evaluate

    problems = load_problems("digits", "test", size=10, seed=0)
    gen = HFGenerator(tiny_model, tokenizer, batch_size=4)  # chunks of 4, 4, 2
    calls = []
    generate = gen.generate
    gen.generate = lambda inputs, **kw: calls.append(len(inputs)) or generate(inputs, **kw)
    acc, samples = evaluate(gen, tokenizer, problems, 12)
    whole = generate([prompt_ids(tokenizer, p.question) for p in problems], n=1, max_new_tokens=12, temperature=0.0)
    assert calls == [4, 4, 2] and [s[1] for s in samples] == [o[0].text for o in whole]
    assert [s[0] for s in samples] == [p.question for p in problems] and 0 <= acc <= 1


def test_the_budget_and_the_minutes_cadence_count_training_not_evaluation():
    """--max-minutes and --eval-every-minutes read train_s, the wall-clock less the held-out evaluations: a run
    that spent most of its time evaluating still has its training budget left. Run.end_step on a run whose
    clocks are set by hand (no model: the decision alone)."""
    from types import SimpleNamespace

    from common.run import Run

    run = Run.__new__(Run)
    run.args = SimpleNamespace(max_minutes=1.0, eval_every=100, eval_every_minutes=None, num_steps=1000, save_every=0)
    run.main, run.last, run.stop_requested, evaluated = False, {}, False, []
    run.evaluate = evaluated.append
    run.start_time, run.eval_seconds, run.last_eval_train_s = time.time() - 120, 90.0, 0.0  # 2 min: 30 s training
    assert run.end_step(3) is False and evaluated == []
    run.eval_seconds = 50.0  # 70 s of training: over the minute
    assert run.end_step(4) is True and evaluated == [4]  # out of time: a last evaluation, then stop
    run.args.max_minutes, run.args.eval_every_minutes = None, 0.5
    run.eval_seconds, run.last_eval_train_s = 90.0, 10.0  # 20 s of training since the last evaluation
    assert run.end_step(5) is False and evaluated == [4]
    run.last_eval_train_s = -5.0  # 35 s since: due, whatever --eval-every says
    assert run.end_step(6) is False and evaluated == [4, 6]


@pytest.mark.parametrize("bf16,device,on", [("auto", "cpu", False), ("on", "cpu", True), ("off", "cpu", False),
                                            (True, "cpu", True), (False, "cpu", False)])
def test_bf16_auto_is_float32_on_the_cpu(bf16, device, on):
    """setup()'s autocast: --bf16 auto is bfloat16 autocast on CUDA only (float32 on the CPU), on and off are
    what they say, and a run's args.json from before "auto" (a bool) means what it meant."""
    from types import SimpleNamespace

    import torch

    from common.run import setup

    args = SimpleNamespace(seed=1, device=device, exp_name="x", model="m", backend="hf", resume=None,
                           num_eval_problems=1, bf16=bf16, gradient_checkpointing="auto")
    _, autocast, _ = setup(args)
    with autocast():
        assert torch.is_autocast_enabled("cpu") == on
        assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype == (torch.bfloat16 if on else torch.float32)
