"""Properties every trainer shares, checked on each script end to end on the tiny model.

- Checkpoints: a run killed with SIGKILL after its first checkpoint and resumed with --resume ends with the
  same per-step metrics as a run that never stopped; Ctrl-C writes a checkpoint and says how to resume.
- Bad input: every out-of-range numeric flag, a missing or empty file, an unknown dataset, CUDA without a
  GPU: one line starting with "error:", a non-zero exit, no run folder.
- Batch invariance: with every learning rate at 0 the weights never change, so the update's log-probs must
  equal the old and reference log-probs computed before it: approx KL, clip fraction and the k3 KL to the
  reference are exactly 0 (they were 1e-3 to 5e-2 when the update re-batched the rows differently).
"""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import tyro

from common.checkpoint import latest_checkpoint, load_checkpoint
from conftest import ROOT, TINY_TASK, run_script, run_tiny, without_timing

# Script -> the flags that set every learning rate of that script to 0.
FROZEN = {
    "ppo.py": ["--learning-rate", "0", "--critic-learning-rate", "0"],
    "vineppo.py": ["--learning-rate", "0"],
    "numca.py": ["--learning-rate", "0", "--kl-coef", "0.001"],  # a KL coefficient, so that kl_ref_k3 exists
    "hista.py": ["--learning-rate", "0", "--kl-coef", "0.001"],
    "prime_implicit_prm.py": ["--learning-rate", "0", "--prm-learning-rate", "0"],
}

# 4 prompts x 4 samples in micro-batches of 4. With the earlier code (consecutive micro-batches for the
# no-grad passes, reshuffled ones in the update) this run logged approx_kl 1.4e-8 and kl_ref_k3 3.4e-7 on the
# tiny model (2e-3 and 5e-2 on the real one); with a fixed partition both are exactly 0.
INVARIANCE_RUN = ["--num-steps", "1", "--num-prompts", "4", "--samples-per-prompt", "4", "--minibatch-size", "8",
                  "--micro-batch-size", "4", "--num-eval-problems", "2", "--max-new-tokens", "24",
                  "--eval-every", "100", "--no-save-model"]


@pytest.mark.parametrize("script", sorted(FROZEN))
def test_unchanged_weights_give_zero_ratio_statistics(script, tmp_path):
    _, records = run_tiny(script, tmp_path, *INVARIANCE_RUN, *FROZEN[script], save_model=False)
    train = [r for r in records if "losses/approx_kl" in r]
    assert len(train) == 1
    for r in train:
        assert r["charts/reward_mean"] > 0  # rewards were earned: the batch had something to learn from
        for key in ("losses/approx_kl", "losses/clipfrac", "losses/kl_ref_k3"):  # every script logs all three
            assert r[key] == 0.0, (key, r[key])  # exactly: the same arithmetic on the same weights


# ---- Checkpoints: a run killed at any point and resumed ends with the metrics of a run never stopped ----
RESUMABLE = ["ppo.py", "vineppo.py", "numca.py", "hista.py", "prime_implicit_prm.py"]
FAST = {"vineppo.py": ["--num-mc-rollouts", "2"],  # fewer continuations: the same code path, a faster test
        "numca.py": ["--num-train-problems", "2"]}  # prompts recur, so the resumed run reads a restored table
SHORT_RUN = [*TINY_TASK, "--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
             "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "2", "--max-new-tokens", "12",
             "--eval-every", "2", "--no-save-model", "--save-every", "1", "--keep-checkpoints", "2"]


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the clocks (they differ from run to run by nature)."""
    return without_timing([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])


def start(script: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *SHORT_RUN, *FAST.get(script, []), *extra, "--output-dir", str(out)],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(path_glob)):
        assert proc.poll() is None, f"the run ended before {path_glob} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {path_glob} after {timeout} s"
        time.sleep(0.2)


def resumed_equals_uninterrupted(script: str, tmp_path: Path, *extra: str) -> None:
    """A 2-step run never stopped, and the same run SIGKILLed once its first checkpoint exists (mid-step 2, or
    while writing the checkpoint) then continued with --resume: the same metrics (timings aside). One run at a
    time: started side by side (to overlap their start-ups), vineppo.py's two runs once logged an approx_kl of
    5e-12 against 0 at step 2, as if two runs sharing the two cores summed in another order."""
    reference = start(script, tmp_path / "reference", *extra)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    killed = start(script, tmp_path / "killed", *extra)
    wait_for("*/checkpoints/step_000001/state.pt", tmp_path / "killed", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (ref_dir,) = (tmp_path / "reference").iterdir()
    assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    # The training really moved the weights before the kill point (the tiny model earns rewards on digits):
    # a resume that lost the weights (or the optimizer, or the random state) fails below.
    from common.models import TINY_MODEL, load_model

    initial = load_model(TINY_MODEL).state_dict()
    after_step_1 = load_checkpoint(ref_dir / "checkpoints" / "step_000001")["models"]["policy"]
    assert any(not torch.equal(initial[k], after_step_1[k]) for k in initial)

    (run_dir,) = (tmp_path / "killed").iterdir()
    proc = run_script(script, "--resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, uninterrupted = comparable(run_dir), comparable(ref_dir)
    # The same records, the same names, the same numbers up to float32's last bits: the CPU default computes in
    # float32 (issue 30), where a kernel's summation order can move a value by an ulp (once seen: an approx_kl of
    # 5e-12 against 0); a resume that lost weights, optimizer moments or random state moves them far more.
    # The mismatch/* figures are differences between the sampler's and the learner's log-probs (each of size up to
    # ~10, where a float32 ulp is ~1e-6): an ulp in either is an absolute error of ~1e-7 on a mean of ~3e-3 (once
    # seen: 0.00306214 against 0.00306205), so they are held to float32's absolute resolution on a log-prob instead.
    assert [sorted(r) for r in resumed] == [sorted(r) for r in uninterrupted]
    for got, want in zip(resumed, uninterrupted):
        for key in want:
            tolerance = 1e-6 if key.startswith("mismatch/") else 1e-9
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=tolerance), (key, got, want)


@pytest.mark.parametrize("script", RESUMABLE)
def test_killed_run_resumes_to_the_same_metrics(script, tmp_path):
    resumed_equals_uninterrupted(script, tmp_path)


# The same handler in every script; PRIME's step has its own ending (steps the filter skips), so it is checked too.
@pytest.mark.parametrize("script", ["ppo.py", "prime_implicit_prm.py"])
def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(script, tmp_path):
    proc = start(script, tmp_path)
    wait_for("*/metrics.jsonl", tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert f"--resume {run_dir}" in out and latest_checkpoint(str(run_dir)) is not None
    # The first screen says what is happening before the step-0 evaluation, which runs under a progress bar.
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "loading tiny on cpu" in line)
    assert "held-out evaluation of 2 problems" in lines[first]
    assert first < next(i for i, line in enumerate(lines) if line.startswith("step 0: held-out greedy accuracy"))
    assert "held-out evaluation" in err


def test_resume_without_a_checkpoint_is_one_line(tmp_path):
    """As a user sees it for ppo.py (a subprocess: one line, no traceback); the same shared check (resume_args)
    in the other trainers, in this process (~5 s less each)."""
    proc = run_script("ppo.py", "--resume", str(tmp_path))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in proc.stderr and "has no args.json" in proc.stderr
    for script in RESUMABLE[1:]:
        module = importlib.import_module(script[:-3])
        with pytest.raises(SystemExit, match="^error: .* has no args.json"):
            module.main(tyro.cli(module.Args, args=["--resume", str(tmp_path)]))


# ---- Bad input: one line that starts with "error:", a non-zero exit, nothing written ----
TRAINERS = ["ppo.py", "vineppo.py", "numca.py", "hista.py", "prime_implicit_prm.py"]
TINY = ["--model", "tiny", "--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12"]

# Out-of-range numbers are refused by check_args before anything is loaded: checked in-process (fast).
OUT_OF_RANGE = [
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--num-steps", "-1"], "--num-steps must be >= 1"),
    (["--num-epochs", "0"], "--num-epochs must be >= 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--learning-rate", "nan"], "--learning-rate is NaN"),
    (["--learning-rate", "-1e-5"], "--learning-rate must be >= 0"),
    (["--learning-rate", "inf"], "--learning-rate is inf"),
    (["--max-minutes", "inf"], "--max-minutes is inf"),
    (["--max-ratio", "-inf"], "--max-ratio is -inf"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1]"),
    (["--adam-eps", "0"], "--adam-eps must be > 0"),
    (["--max-minutes", "-3"], "--max-minutes must be > 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--eval-every-minutes", "0"], "--eval-every-minutes must be > 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["--kl-coef", "-1"], "--kl-coef must be >= 0"),
    (["--max-ratio", "nan"], "--max-ratio is NaN"),
    (["--vllm-gpu-memory-utilization", "0"], "--vllm-gpu-memory-utilization must be in (0, 1]"),
    (["--minibatch-size", "3"], "must divide the batch"),
    (["--micro-batch-size", "3", "--minibatch-size", "4"], "must divide --minibatch-size"),
]


@pytest.mark.parametrize("script", TRAINERS)
@pytest.mark.parametrize("argv,message", OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_out_of_range_flag_is_one_line(script, argv, message):
    module = importlib.import_module(script[:-3])
    args = tyro.cli(module.Args, args=TINY + argv)
    with pytest.raises(SystemExit) as exc:
        module.check_args(args)
    assert str(exc.value).startswith("error: ") and message in str(exc.value) and "\n" not in str(exc.value)


# Each trainer's own flags, the same way.
OWN_FLAGS = {
    "vineppo.py": [
        (["--num-mc-rollouts", "0"], "--num-mc-rollouts must be >= 1"),
        (["--max-estimated-steps", "-1"], "--max-estimated-steps must be >= 0"),
        (["--clip-eps", "0"], "--clip-eps must be > 0"),
    ],
    "numca.py": [
        (["--min-gap-tokens", "-1"], "--min-gap-tokens must be >= 0"),
        (["--lam", "1.5"], "--lam must be in [0, 1]"),
        (["--max-table-states", "0"], "--max-table-states must be >= 1"),
        (["--dynamic-sampling-scale", "0"], "--dynamic-sampling-scale must be >= 1"),
        (["--clip-eps-low", "0"], "--clip-eps-low must be > 0"),
        (["--clip-eps-high", "-0.1"], "--clip-eps-high must be > 0"),
    ],
    "hista.py": [
        (["--interval", "0"], "--interval must be >= 1"),
        (["--window", "0"], "--window must be >= 1"),
        (["--k-min", "0"], "--k-min must be >= 1"),
        (["--k-max", "0"], "--k-max must be >= 1"),
        (["--k-min", "10", "--k-max", "5"], "--k-min must be <= --k-max"),
        (["--d-min", "0"], "--d-min must be > 0"),
        (["--ema-alpha", "1"], "--ema-alpha must be in [0, 1)"),
        (["--ema-alpha", "-0.1"], "--ema-alpha must be in [0, 1)"),
        (["--ema-alpha", "nan"], "--ema-alpha is NaN"),
        (["--lam", "2"], "--lam must be in [0, 1]"),
        (["--dynamic-sampling-scale", "0"], "--dynamic-sampling-scale must be >= 1"),
        (["--clip-eps-high", "0"], "--clip-eps-high must be > 0"),
    ],
}
OWN_CASES = [(script, argv, message) for script, rows in OWN_FLAGS.items() for argv, message in rows]


@pytest.mark.parametrize("script,argv,message", OWN_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in OWN_CASES])
def test_out_of_range_own_flag_is_one_line(script, argv, message):
    test_out_of_range_flag_is_one_line(script, argv, message)


# The PPO-clip loss and k3 KL of every trainer: log-ratios masked before the exp, so that a padded log-prob of
# -95 (at T = 0.6 a pad token can be that unlikely; exp(95) overflows float32) gives no NaN gradient.
CLIP = {"ppo.py": (0.2,), "vineppo.py": (0.2,), "prime_implicit_prm.py": (0.2,), "numca.py": (0.2, 0.28),
        "hista.py": (0.2, 0.28)}


@pytest.mark.parametrize("script", TRAINERS)
def test_padded_logprob_below_minus_88_gives_no_nan(script):
    module = importlib.import_module(script[:-3])
    logprobs = torch.tensor([[-1.0, -95.0]], requires_grad=True)
    old, ref, adv = torch.tensor([[-1.1, 0.0]]), torch.tensor([[-0.9, 0.0]]), torch.tensor([[0.5, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss, _, _, ratio = module.ppo_policy_loss(logprobs, old, adv, mask, *CLIP[script])
    (loss + module.kl_k3(logprobs, ref, mask).sum()).backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1] == 0
    assert ratio.item() == pytest.approx(math.exp(0.1), rel=1e-5)  # the mean ratio over real tokens only


# Inputs found only when the data or the model is read: checked as a user sees them, in a subprocess.
@pytest.fixture(scope="module")
def empty_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "empty.jsonl"
    path.write_text("")
    return str(path)


BAD_FILES = [
    (["--model", "/no/such/model"], "does not exist"),
    (["--dataset", "nowhere.jsonl"], "does not exist"),
    (["--dataset", "EMPTY"], "is empty"),
    (["--dataset", "what"], "unknown dataset"),
    # vLLM runs on the first visible GPU only, whatever the index says: refused on any machine, GPU or not
    (["--device", "cuda:1", "--backend", "vllm"], "CUDA_VISIBLE_DEVICES=1 and --device cuda"),
]
if not torch.cuda.is_available():
    BAD_FILES.append((["--device", "cuda"], "no CUDA device"))


# Every row as a user sees it, in a subprocess (~5 s each), for ppo.py. Each script's __main__ turns the same
# exceptions into that line; what differs between scripts is the order of their loading, so for the other
# trainers a missing model and an empty dataset are checked in-process: the exception, with nothing written.
BAD_CASES = [("ppo.py", argv, message) for argv, message in BAD_FILES]
IN_PROCESS = [(script, argv, message) for script in TRAINERS[1:] for argv, message in BAD_FILES[0:3:2]]


def bad_argv(argv, empty_jsonl):
    return [empty_jsonl if a == "EMPTY" else a for a in argv]


@pytest.mark.parametrize("script,argv,message", BAD_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_CASES])
def test_bad_input_is_one_line_and_writes_nothing(script, argv, message, tmp_path, empty_jsonl):
    out = tmp_path / "runs"
    proc = run_script(script, *TINY, "--output-dir", str(out), *bad_argv(argv, empty_jsonl))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("script,argv,message", IN_PROCESS, ids=[f"{s} {' '.join(a)}" for s, a, _ in IN_PROCESS])
def test_bad_input_stops_before_the_run_folder(script, argv, message, tmp_path, empty_jsonl):
    from common.data import DataError
    from common.models import ModelLoadError

    module = importlib.import_module(script[:-3])
    out = tmp_path / "runs"
    args = tyro.cli(module.Args, args=[*TINY, "--output-dir", str(out), *bad_argv(argv, empty_jsonl)])
    with pytest.raises((ModelLoadError, DataError), match=message):
        module.main(args)
    assert not out.exists() or not any(out.iterdir())
    source = (ROOT / script).read_text()  # the exceptions its __main__ turns into one `error:` line
    assert "except (ModelLoadError, DataError) as e:\n        sys.exit(f\"error: {e}\")" in source


# The reward reads the question: a trainer whose outcome_rewards dropped it would pay a policy for handing the
# question's calculation back (ppo.py learned `\boxed{59 * 100}` for "What is 59 * 100?" in 30 minutes).
@pytest.mark.parametrize("script", TRAINERS)
def test_outcome_rewards_refuse_the_question_handed_back(script):
    module = importlib.import_module(script[:-3])
    texts = ["\\boxed{59 * 100}", "\\boxed{59 \\times 100}", "59 * 100 = 5900, so \\boxed{5900}", "\\boxed{5900}"]
    rewards = module.outcome_rewards(texts, [True] * 4, ["5900"] * 4, ["Calculate 59 * 100."] * 4)
    assert rewards == [0.0, 0.0, 1.0, 1.0]


def test_vllm_on_another_gpu_is_refused_before_the_cuda_check():
    from common.args import check_device

    for device in ("cuda:1", "cuda:3"):
        with pytest.raises(SystemExit) as exc:
            check_device(device, "vllm")
        message = str(exc.value)
        assert message.startswith("error: ") and f"CUDA_VISIBLE_DEVICES={device[-1]} and --device cuda" in message
    check_device("cpu", "vllm")
    for device in ("cuda", "cuda:0"):  # the first GPU: fine for vLLM wherever CUDA is
        if torch.cuda.is_available():
            check_device(device, "vllm")
        else:
            with pytest.raises(SystemExit, match="no CUDA device"):
                check_device(device, "vllm")
