"""Everything a GPU adds to the code the CPU tests run, checked in one command (under 10 minutes on one GPU).

    python benchmarks/gpu_check.py                          # one CUDA GPU
    python benchmarks/gpu_check.py --device cpu --smoke     # the same code paths on the CPU, small (~2 minutes)
    python benchmarks/gpu_check.py --scripts ppo.py         # one trainer (or a few) and the vLLM cycle

The model is Qwen2.5-0.5B's architecture (benchmarks/memory.py's config) with random weights and a byte-level
tokenizer made here: nothing is downloaded. --smoke shrinks it to 2 layers of width 64 and the runs to 16 new
tokens. Checks, printed as a table (check, result, figure); the exit status is 1 if any check failed:
- trainer: each of ppo, vineppo, numca, hista and prime_implicit_prm runs 2 steps with --backend hf at its own
  learning rate, as a user runs it (a subprocess), and logs finite losses;
- memory: that run's peak (CUDA: torch's reserved high-water mark plus the memory in use before torch
  allocated anything, the CUDA context) against check_memory's estimate for the same settings; it passes when
  the peak is within the estimate. On the CPU it is skipped (the Python runtime dominates a model this size);
- unchanged weights: each trainer one step at learning rate 0: the ratio must be exactly 1 (approx KL and clip
  fraction exactly 0), and the KL to the reference exactly 0 where the reference has the policy's numerics (the
  CPU; PRIME's float32 reference on every device). On CUDA the other scripts' bfloat16 reference gives the KL a
  floor, reported as the figure;
- vllm (where vLLM is installed): the engine sleeps, the policy's weights change, the sync wakes it and
  reloads them, greedy generation; twice. Every token vLLM chose must be within 0.1 nats of the best token under
  the hf backend's model on the same weights (teacher-forced: stale or missing weights put it nats away); the
  figure is the share of greedy sequences identical to the hf backend's. On CUDA also what the engine keeps
  while asleep, against check_memory's allowance for it.
What cannot run is skipped with the reason: no CUDA, no vLLM, or a package the trainers need (tyro,
math-verify, reasoning-gym, tensorboard) missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from memory import SHAPES  # noqa: E402

SCRIPTS = ["ppo.py", "vineppo.py", "numca.py", "hista.py", "prime_implicit_prm.py"]
# Each script's own flags in these runs: the short settings of tests/test_trainers.py; a KL term for the
# DAPO scripts, so that they load a reference too; no filter for PRIME (a random model is never right).
OWN_FLAGS = {"ppo.py": [], "vineppo.py": ["--num-mc-rollouts", "2"], "numca.py": ["--kl-coef", "0.001"],
             "hista.py": ["--kl-coef", "0.001"], "prime_implicit_prm.py": ["--no-filter"]}
FROZEN = {"ppo.py": ["--learning-rate", "0", "--critic-learning-rate", "0"], "vineppo.py": ["--learning-rate", "0"],
          "numca.py": ["--learning-rate", "0"], "hista.py": ["--learning-rate", "0"],
          "prime_implicit_prm.py": ["--learning-rate", "0", "--prm-learning-rate", "0"]}
# Heads of 32: vLLM's CPU attention has no kernel for a head size of 16.
SMOKE_SHAPE = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True)
TRAINER_PACKAGES = {"tyro": "tyro", "math_verify": "math-verify", "reasoning_gym": "reasoning-gym",
                    "tensorboard": "tensorboard"}
GAP_NATS = 0.1  # how far below the hf model's best token vLLM's greedy token may be (bfloat16 kernels differ)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---------------------------------------------------------------------------------------------------------
# The model: a real architecture, random weights, a tokenizer made here.
# ---------------------------------------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) and ChatML's special tokens: every text
    encodes, and the model's ids past its 259 tokens decode to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(folder: Path, smoke: bool) -> Path:
    """Qwen2.5-0.5B's config (SMOKE_SHAPE with --smoke), random weights, saved with the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    spec = dict(SMOKE_SHAPE if smoke else SHAPES["qwen2.5-0.5b"])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=4096, bos_token_id=None,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# A script's runs, in a child process: the script as a user runs it (its __main__ block, its command line),
# with check_memory's estimate and the peak memory recorded around each run.
# ---------------------------------------------------------------------------------------------------------
def child_trainer(record_path: str, script: str, argvs: list[list[str]]) -> None:
    """Run `script` once per command line in `argvs`, one after the other in this process (one start-up for
    both), and write a record per run: check_memory's estimate, and the peak memory of that run."""
    import gc

    import common.models as models

    records: list[dict] = []
    check_memory = models.check_memory

    def spy(*args, **kwargs):  # the script imports check_memory when it runs, so it gets this one
        records[-1]["estimate"] = check_memory(*args, **kwargs)
        return records[-1]["estimate"]

    models.check_memory = spy
    for argv in argvs:
        records.append({})
        device = argv[argv.index("--device") + 1]
        if device.startswith("cuda"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            # before the run: the CUDA context, and anything else on the card (nothing from the first run)
            records[-1]["before_torch_gib"] = (total - free) / 2**30 - torch.cuda.memory_reserved() / 2**30
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident high-water mark
        sys.argv = [script, *argv]
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            records[-1]["exit"] = e.code if isinstance(e.code, int) else 1
            records[-1]["error"] = str(e.code)
        finally:
            if device.startswith("cuda"):
                records[-1]["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                records[-1]["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                with open("/proc/self/status") as f:
                    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
                records[-1]["peak_rss_gib"] = hwm / 2**20
            Path(record_path).write_text(json.dumps(records))


def trainer_argv(script: str, model: Path, out: Path, device: str, smoke: bool, steps: int, extra: list[str]):
    return ["--model", str(model), "--device", device, "--backend", "hf", "--num-steps", str(steps),
            "--num-prompts", "4", "--samples-per-prompt", "4", "--minibatch-size", "8", "--micro-batch-size", "4",
            "--max-new-tokens", "16" if smoke else "128", "--num-train-problems", "64", "--num-eval-problems", "4",
            "--eval-every", "100", "--no-save-model", "--output-dir", str(out), *OWN_FLAGS[script], *extra]


def run_trainer(script: str, model: Path, out: Path, device: str, smoke: bool) -> list[dict]:
    """The script's two runs (2 steps at its learning rate; 1 step at learning rate 0), in one child process.
    Per run: {"records": metrics.jsonl's records, "child": the child's record, "error": its last stderr line}."""
    runs = [(out / f"{script[:-3]}", 2, []), (out / f"{script[:-3]}-frozen", 1, FROZEN[script])]
    record_path = out / f"{script[:-3]}.json"
    command = [sys.executable, __file__, "--child-trainer", str(record_path), script]
    for folder, steps, extra in runs:
        command += ["--", *trainer_argv(script, model, folder, device, smoke, steps, extra)]
    t0 = time.time()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.time() - t0
    children = json.loads(record_path.read_text()) if record_path.exists() else []
    tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    results = []
    for i, (folder, steps, _) in enumerate(runs):
        files = list(folder.glob("*/metrics.jsonl"))
        child = children[i] if i < len(children) else {}
        code = child.get("exit", 0) if i < len(children) else (proc.returncode or 1)
        results.append({"returncode": code, "error": child.get("error") or tail, "child": child, "steps": steps,
                        "records": [json.loads(line) for line in files[0].read_text().splitlines()] if files else [],
                        "seconds": seconds})
    return results


# ---------------------------------------------------------------------------------------------------------
# The checks' verdicts: (check, result, figure) rows. Results: pass, FAIL, skip.
# ---------------------------------------------------------------------------------------------------------
def trainer_row(script: str, run: dict):
    """The run ended, logged every step, and its losses are finite."""
    steps = run["steps"]
    train = [r for r in run["records"] if "losses/policy_loss" in r]
    if run["returncode"] != 0:
        return (f"trainer {script}", "FAIL", f"exit {run['returncode']}: {run['error'][:150]}")
    # (explained variance is NaN by definition when every return is equal, as a random model's all-0 rewards)
    losses = [v for r in train for k, v in r.items() if k.startswith("losses/") and k != "losses/explained_variance"]
    if len(train) != steps or not all(math.isfinite(v) for v in losses):
        return (f"trainer {script}", "FAIL", f"{len(train)} of {steps} steps logged, or a loss not finite")
    step_time = sum(r["charts/step_time"] for r in train) / len(train)
    return (f"trainer {script}", "pass", f"{steps} steps, {step_time:.1f} s a step")


def memory_row(script: str, run: dict, cuda: bool):
    """The run's peak within check_memory's estimate (CUDA)."""
    check, child = f"memory {script}", run["child"]
    if "estimate" not in child:
        return (check, "FAIL", "no estimate recorded (the run ended before check_memory)")
    estimate = child["estimate"]["need"]
    if not cuda:
        return (check, "skip", f"the CPU: peak resident {child.get('peak_rss_gib', float('nan')):.2f} GiB, mostly the "
                               f"Python runtime, against an estimate of {estimate:.2f} GiB")
    peak = child["peak_reserved_gib"] + child["before_torch_gib"]
    figure = (f"peak {peak:.2f} GiB (torch reserved {child['peak_reserved_gib']:.2f}, allocated "
              f"{child['peak_allocated_gib']:.2f}, before torch {child['before_torch_gib']:.2f}) against the "
              f"estimate {estimate:.2f} GiB ({peak / estimate:.0%})")
    return (check, "pass" if peak <= estimate else "FAIL", figure)


def unchanged_weights_row(script: str, run: dict, cuda: bool):
    """At learning rate 0: approx KL and clip fraction exactly 0; the KL to the reference exactly 0 where the
    reference computes as the policy does (the CPU; PRIME's float32 reference everywhere), else its floor."""
    check = f"unchanged weights {script}"
    train = [r for r in run["records"] if "losses/approx_kl" in r]
    if run["returncode"] != 0 or not train:
        return (check, "FAIL", f"exit {run['returncode']}: {run['error'][:150]}")
    r = train[0]
    exact = {"losses/approx_kl": r["losses/approx_kl"], "losses/clipfrac": r["losses/clipfrac"]}
    kl = r.get("losses/kl_ref_k3")
    floor = cuda and script != "prime_implicit_prm.py"  # a bfloat16 reference on CUDA
    if kl is not None and not floor:
        exact["losses/kl_ref_k3"] = kl
    bad = {k: v for k, v in exact.items() if v != 0.0}
    figure = ", ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in exact.items())
    if kl is not None and floor:
        k1 = r.get("losses/kl_ref_k1", math.nan)
        figure += f"; kl_ref_k3 {kl:.3g}, kl_ref_k1 {k1:.3g} (the bf16 reference's floor)"
    return (check, "FAIL" if bad else "pass", ("not exactly 0: " if bad else "") + figure)


def table(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(c) for c, _, _ in rows)
    lines = [f"{'check':{width}}  result  figure", f"{'-' * width}  ------  ------"]
    lines += [f"{c:{width}}  {res:6}  {fig}" for c, res, fig in rows]
    return "\n".join(lines)


def exit_status(rows) -> int:
    return 1 if any(res == "FAIL" for _, res, _ in rows) else 0


# ---------------------------------------------------------------------------------------------------------
# vLLM: sleep -> sync -> generate, twice, against the hf backend.
# ---------------------------------------------------------------------------------------------------------
QUESTIONS = ["What is 17 + 25?", "Compute 8 * 9.", "What is 100 - 37?", "Add 3 and 4.", "What is 12 * 12?",
             "Subtract 9 from 40.", "What is 6 + 7 * 2?", "Half of 64 is?"]


def teacher_forced_gap(model, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """The largest, over every generated token, of (the best log-prob under `model`) - (that token's log-prob),
    each position conditioned on the prompt and the tokens before it. 0 when every token is the model's argmax."""
    gap = 0.0
    with torch.no_grad():
        for prompt, cont in zip(prompts, continuations):
            if not cont:
                continue
            ids = torch.tensor([prompt + cont], device=model.device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)  # (T, V)
            chosen = logp.gather(-1, torch.tensor(cont, device=model.device)[:, None]).squeeze(-1)
            gap = max(gap, float((logp.max(-1).values - chosen).max()))
    return gap


def child_vllm(record_path: str, model_path: str, device: str, smoke: bool) -> None:
    from common.generation import make_generator
    from common.models import load_model, load_tokenizer

    record: dict = {"cycles": []}
    tokenizer = load_tokenizer(model_path)
    policy = load_model(model_path, device=device)
    hf = make_generator("hf", policy, tokenizer, model_path)
    cuda = device.startswith("cuda")

    def used() -> float:  # GiB in use on the GPU, whoever holds it (vLLM's memory is not in torch's counters)
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30

    before = used() if cuda else 0.0
    if not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm = make_generator("vllm", policy, tokenizer, model_path, gpu_memory_utilization=0.3, seed=0,
                          max_model_len=512, enforce_eager=smoke)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for q in QUESTIONS]
    for cycle in (1, 2):
        if cuda:
            awake = used()
        vllm.sleep()
        if cuda:
            torch.cuda.synchronize()
            record["cycles"].append({"engine_awake_gib": awake - before, "engine_asleep_gib": used() - before})
        else:
            record["cycles"].append({})
        with torch.no_grad():  # new weights, everywhere: stale or missing ones would show
            torch.manual_seed(cycle)
            for p in policy.parameters():
                p.mul_(1 + 0.5 * torch.randn_like(p))
        vllm.sync_weights(policy)
        hf.sync_weights(policy)
        got = [o[0].token_ids for o in vllm.generate(prompts, n=1, max_new_tokens=16, temperature=0.0)]
        want = [o[0].token_ids for o in hf.generate(prompts, n=1, max_new_tokens=16, temperature=0.0)]
        record["cycles"][-1] |= {"identical": sum(g == w for g, w in zip(got, want)), "prompts": len(prompts),
                                 "gap": teacher_forced_gap(hf.model, prompts, got)}
        Path(record_path).write_text(json.dumps(record))


def vllm_rows(out: Path, model: Path, device: str, smoke: bool) -> list[tuple[str, str, str]]:
    from common.models import VLLM_ASLEEP_GIB

    record_path = out / "vllm.json"
    proc = subprocess.run([sys.executable, __file__, "--child-vllm", str(record_path), str(model), device]
                          + (["--smoke"] if smoke else []), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    record = json.loads(record_path.read_text()) if record_path.exists() else {"cycles": []}
    rows = []
    for i, c in enumerate(record["cycles"], 1):
        check = f"vllm sleep -> sync -> generate, cycle {i}"
        if "gap" not in c:
            continue
        figure = (f"{c['identical']} of {c['prompts']} greedy sequences identical to hf's; vLLM's tokens at most "
                  f"{c['gap']:.3f} nats below hf's best")
        rows.append((check, "pass" if c["gap"] <= GAP_NATS else "FAIL", figure))
        if "engine_asleep_gib" in c:
            rows.append((f"vllm asleep, cycle {i}", "pass" if c["engine_asleep_gib"] <= VLLM_ASLEEP_GIB else "FAIL",
                         f"the engine keeps {c['engine_asleep_gib']:.2f} GiB asleep (awake "
                         f"{c['engine_awake_gib']:.2f}) "
                         f"against check_memory's allowance of {VLLM_ASLEEP_GIB:.2f} GiB"))
    if proc.returncode != 0 or len(rows) < 2:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        rows.append(("vllm sleep -> sync -> generate", "FAIL", f"exit {proc.returncode}: {tail[:200]}"))
    return rows


# ---------------------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------------------
def versions() -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for name in ("transformers", "vllm"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001  (a broken vLLM install raises more than ImportError)
            pass
    return ", ".join(parts)


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (on a GPU: pip install -r requirements-gpu.txt)"
    proc = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        return f"import vllm fails: {last[:150]}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the default: the GPU checks) or cpu")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model and 16-token responses (the CPU)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--skip-vllm", action="store_true", help="leave the vLLM cycle out")
    parser.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=SCRIPTS, metavar="SCRIPT",
                        help=f"the trainers to run (default: all five: {' '.join(SCRIPTS)})")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: this torch sees no CUDA device: run python benchmarks/gpu_check.py --device cpu "
                         "--smoke")
    if cuda and args.device not in ("cuda", "cuda:0"):
        raise SystemExit("error: the check runs vLLM, which uses the first visible GPU: run with "
                         f"CUDA_VISIBLE_DEVICES={args.device.partition(':')[2]} and --device cuda")
    t_start = time.time()
    where = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"gpu_check on {where}: {versions()}{', smoke' if args.smoke else ''}", flush=True)
    rows: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    if not cuda:
        skipped.append("memory against the estimate, vLLM's sleep mode: no CUDA device (the CPU has neither)")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        model = build_model(out / "model", args.smoke)
        shape = "SMOKE_SHAPE" if args.smoke else "Qwen2.5-0.5B"
        print(f"model: {shape}-shaped, random weights, in {model}", flush=True)
        missing = [pip for module, pip in TRAINER_PACKAGES.items() if importlib.util.find_spec(module) is None]
        if missing:
            skipped.append(f"the trainer runs: {', '.join(missing)} not installed (pip install -r requirements.txt)")
        else:
            for script in args.scripts:
                trained, frozen = run_trainer(script, model, out, args.device, args.smoke)
                rows += [trainer_row(script, trained), memory_row(script, trained, cuda),
                         unchanged_weights_row(script, frozen, cuda)]
                print(f"{script}: {', '.join(r[1] for r in rows[-3:])} ({trained['seconds']:.0f} s)", flush=True)
        why = "--skip-vllm" if args.skip_vllm else vllm_missing()
        if why:
            skipped.append(f"the vLLM cycle: {why}")
        else:
            rows += vllm_rows(out, model, args.device, args.smoke)
            print(f"vllm: {rows[-1][1]}", flush=True)
    print()
    print(table(rows))
    for s in skipped:
        print(f"skipped: {s}")
    status = exit_status(rows)
    print(f"{'FAILED' if status else 'all checks passed'} in {time.time() - t_start:.0f} s")
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-trainer":  # RECORD SCRIPT -- ARGV -- ARGV ...
        argvs, rest = [], sys.argv[4:]
        while rest and rest[0] == "--":
            end = rest.index("--", 1) if "--" in rest[1:] else len(rest)
            argvs.append(rest[1:end])
            rest = rest[end:]
        child_trainer(sys.argv[2], sys.argv[3], argvs)
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-vllm":
        child_vllm(sys.argv[2], sys.argv[3], sys.argv[4], "--smoke" in sys.argv)
    else:
        sys.exit(main())
