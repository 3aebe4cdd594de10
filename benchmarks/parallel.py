"""Past one process: a trainer's step time as 1 process and as N processes under torchrun, and a LoRA run against
full fine-tuning (memory and accuracy). Each run is a real run of the script, in its own process group.

    python benchmarks/parallel.py --script ppo --nproc 2                     # step time, 1 process vs 2 (CPU)
    python benchmarks/parallel.py --script ppo --lora --max-minutes 30       # LoRA r16 vs full fine-tuning
    python benchmarks/parallel.py --script ppo --smoke                       # both, on the tiny model, in seconds

Step time: the same total batch (the script's defaults, or what follows `--`) with `python SCRIPT` and with
`torchrun --standalone --nproc-per-node N SCRIPT`, each process given cores / N threads (OMP_NUM_THREADS), so
that both use the whole machine; the median of charts/step_time and of its parts (time/...) over the steps after
the first (the first warms up). On the CPU the N processes split the machine's cores: what they gain is the
parallel generation of smaller batches (less padding per sequence, no Python-side serialisation), what they
pay is the gradient all-reduce and N copies of the models in memory.

LoRA against full fine-tuning: the script with `--lora-rank R --learning-rate LR_LORA` (default 16 and 1e-4,
10x the full fine-tuning default, as verl's docs advise; the same rate for the other model that trains with
adapters too: PPO's critic, PRIME's PRM, whose defaults are also 1e-5) and without, at its own defaults, each
for --max-minutes; the peak resident memory of each run's process (the CPU: RAM) and its held-out greedy
accuracy (first, best, last). Prints a markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--model", "tiny", "--dataset", "digits", "--num-prompts", "4", "--samples-per-prompt", "2",
         "--minibatch-size", "8", "--micro-batch-size", "2", "--max-new-tokens", "8", "--num-eval-problems", "4",
         "--eval-every", "2"]


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run cmd in a wrapper process of its own, so that the peak resident memory read after it is this run's (the
    largest of its processes); returns (wall seconds, peak GiB)."""
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0, int(proc.stderr.strip().splitlines()[-1]) / 2**20  # kB -> GiB


def records(out: Path) -> list[dict]:
    (run_dir,) = out.iterdir()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_times(out: Path) -> dict[str, float]:
    steps = [r for r in records(out) if "charts/step_time" in r][1:]  # the first step warms up
    if not steps:
        raise SystemExit("error: one step only: run at least 2 (--num-steps)")
    keys = ["charts/step_time"] + sorted(k for k in steps[0] if k.startswith("time/") and "share" not in k)
    return {k: statistics.median(r[k] for r in steps) for k in keys}


def compare_processes(script: str, nproc: int, flags: list[str], tmp: Path) -> str:
    cores = os.cpu_count() or 1
    rows = {}
    for n in (1, nproc):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n)), "PYTHONUNBUFFERED": "1"}
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(n)]
        out = tmp / f"nproc{n}"
        wall, peak = run([*launcher, f"{script}.py", *flags, "--no-save-model", "--output-dir", str(out)], env)
        rows[n] = {**step_times(out), "peak": peak, "wall": wall}
    keys = [k for k in rows[1] if k not in ("peak", "wall")]
    lines = [f"{script}.py on {cores} cores: median over steps 2+ (s), 1 process vs {nproc} under torchrun",
             "", f"| figure | 1 process | {nproc} processes | ratio |", "|---|---|---|---|"]
    for k in keys:
        lines.append(f"| {k} | {rows[1][k]:.2f} | {rows[nproc][k]:.2f} | {rows[nproc][k] / rows[1][k]:.2f} |")
    lines.append(f"| peak resident GiB (largest process) | {rows[1]['peak']:.2f} | {rows[nproc]['peak']:.2f} | |")
    return "\n".join(lines)


def compare_lora(script: str, rank: int, lora_lr: float, flags: list[str], tmp: Path) -> str:
    lines = [f"{script}.py: LoRA r{rank} (lr {lora_lr:g}) against full fine-tuning (its default lr)", "",
             "| run | peak resident GiB | steps | eval first | eval best | eval last | median step s |",
             "|---|---|---|---|---|---|---|"]
    lora = ["--lora-rank", str(rank), "--learning-rate", str(lora_lr)]
    lora += {"ppo": ["--critic-learning-rate", str(lora_lr)],
             "prime_implicit_prm": ["--prm-learning-rate", str(lora_lr)]}.get(script, [])
    for label, extra in (("full fine-tuning", []), (f"LoRA r{rank}", lora)):
        out = tmp / label.replace(" ", "_")
        _, peak = run([sys.executable, f"{script}.py", *flags, *extra, "--output-dir", str(out)],
                      {**os.environ, "PYTHONUNBUFFERED": "1"})
        rs = records(out)
        evals = [r["eval_accuracy"] for r in rs if "eval_accuracy" in r]
        steps = [r for r in rs if "charts/step_time" in r]
        median = statistics.median(r["charts/step_time"] for r in steps[1:] or steps)
        lines.append(f"| {label} | {peak:.2f} | {len(steps)} | {evals[0]:.3f} | {max(evals):.3f} | {evals[-1]:.3f} | "
                     f"{median:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="ppo", choices=["ppo", "vineppo", "numca", "hista", "prime_implicit_prm"])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run")
    parser.add_argument("--num-steps", type=int, default=4,
                        help="steps of each step-time run (the first is not counted)")
    parser.add_argument("--lora", action="store_true", help="compare LoRA with full fine-tuning instead")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-minutes", type=float, default=30, help="wall-clock of each LoRA / full run")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 steps: checks that this script runs")
    parser.add_argument("--output-dir", default=None, help="keep the runs here (default: a temporary folder)")
    args, rest = parser.parse_known_args()
    flags = [f for f in rest if f != "--"]
    if args.smoke:
        flags = SMOKE + flags
        if args.script == "vineppo":
            flags += ["--num-mc-rollouts", "2"]
        if args.script == "prime_implicit_prm":
            flags += ["--no-filter"]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.output_dir or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.lora or args.smoke:
            budget = ["--num-steps", "2"] if args.smoke else ["--max-minutes", str(args.max_minutes), "--num-steps",
                                                                 "1000"]
            print(compare_lora(args.script, args.lora_rank, args.lora_learning_rate, flags + budget, tmp / "lora"))
            print()
        if not args.lora or args.smoke:
            steps = "2" if args.smoke else str(args.num_steps)
            print(compare_processes(args.script, args.nproc, flags + ["--num-steps", steps],
                                    tmp / "processes"))


if __name__ == "__main__":
    main()
