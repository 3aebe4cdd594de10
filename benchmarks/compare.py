"""Run every method side by side, over seeds, at an equal budget; `benchmarks/report.py` draws the result.

    python benchmarks/compare.py --arms ppo vineppo --seeds 1 2 3 --max-minutes 30
    python benchmarks/compare.py --seeds 1 2 3 --max-minutes 12 -- --backend vllm   # flags after -- go to every arm
    python benchmarks/compare.py --arms numca --seeds 2        # one arm, one seed: spread the work out
    python benchmarks/compare.py --samples 640 --dry-run       # equal samples instead; print the commands

An arm is a script and its flags (ARMS below: `grpo` is `numca.py --no-numca`, `rloo` is
`prime_implicit_prm.py --process-reward-coef 0`; `grpo-nocorr`, `grpo-cispo`, `numca-cispo`, `hista-cispo`,
`grpo-bf16` and `grpo-lr1e-5`, run only when named in --arms, are GRPO without the sampler-learner correction, the
three with CISPO's loss, GRPO's learner under bfloat16 autocast instead of float32 on the CPU, and GRPO at the
learning rate of 1e-5 that every trainer had by default before issue 30 instead of 3e-6). Each run is the unchanged script, launched as a subprocess
with the same seed, evaluation set (the first --num-eval-problems test problems: every script draws them
with seed 0), evaluation cadence (--eval-every steps, or --eval-every-minutes of training) and budget as the
other arms; this file re-implements
nothing and reads nothing but the scripts' own files. Equal runs of two arms at one seed share their first
batch of problems, so two arms can be compared seed by seed (paired).

Budget: `--max-minutes M` gives every run M minutes of training as the scripts count it (wall-clock from the
end of model loading, less the held-out evaluations: their `train_s`; so the evaluation set's size and cadence
cost no arm any training; report.py gives each arm's evaluation share of its wall-clock too), with
a step cap of --num-steps, and a constant learning rate without warm-up for every arm (a schedule over
--num-steps has no known end under a time budget; flags after -- override it). `--samples N` gives every
run N sampled training responses instead: the step count is N / (num_prompts * samples_per_prompt) of that
arm, read from the script's own argument parser, and each script keeps its own schedule.

Where things go: `{--out}/{arm}/seed{seed}/` holds `run.json` (the command, its environment, the budget,
the CPU it ran on, start and end times, exit code), `log.txt` (the script's output) and the script's run folder
(`{arm}__{seed}__{time}/` with `metrics.jsonl`, `args.json`, TensorBoard events; no final model: the runs
are for their metrics, so they pass --no-save-model).

Resuming. A run whose run.json has exit code 0 is finished and never redone; a run already started with
another command than the one this invocation would give it (other flags, budget, cadence), or with the same
command when the script's defaults have changed since (its args.json against what the command parses to now:
a new default learning rate would otherwise keep the old runs), is refused in one line before anything runs
(give another --out, or delete its folder). A run that another
invocation is running (a `lock` file naming a live invocation or run on this machine) is left to it, so
several invocations can share one --out folder: give each its own --arms or --seeds, or the same ones
(each takes the next free run). A run that was killed restarts cleanly: from its newest checkpoint when
the script wrote one (pass --save-every N; the scripts resume with their own --resume, the clock
included), otherwise from scratch, its partial folder deleted first. Runs are taken seed by seed (every arm of seed 1, then of seed 2, ...), so a
comparison stopped half way is still balanced across arms.

Sharing the machine: each run gets OMP_NUM_THREADS=--threads (default 1) and --parallel runs go at once
(default 2), so on a 2-core machine two runs share the cores evenly and every arm sees the same load.
Memory: a run of the default model takes 4-8 GiB (PRIME holds three models).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# arm name -> (script, its own flags, the arm it is measured against in report.py)
ARMS: dict[str, tuple[str, list[str], str | None]] = {
    "ppo": ("ppo.py", [], None),
    "vineppo": ("vineppo.py", [], "ppo"),
    "grpo": ("numca.py", ["--no-numca"], None),
    "numca": ("numca.py", [], "grpo"),
    "hista": ("hista.py", [], "grpo"),
    "rloo": ("prime_implicit_prm.py", ["--process-reward-coef", "0"], None),
    "prime": ("prime_implicit_prm.py", [], "rloo"),
    # Issue 28, on request (--arms): grpo's sampler-learner correction (TRL's sequence_mask, numca.py's default)
    # against none; and the official recipes' other loss, CISPO, for the baseline and both estimators: the
    # baseline with CISPO against the baseline with DAPO's clipped loss (MiniMax-M1's comparison), each estimator
    # with CISPO against the baseline with CISPO.
    "grpo-nocorr": ("numca.py", ["--no-numca", "--rollout-correction", "none"], "grpo"),
    "grpo-cispo": ("numca.py", ["--no-numca", "--loss", "cispo"], "grpo"),
    "numca-cispo": ("numca.py", ["--loss", "cispo"], "grpo-cispo"),
    "hista-cispo": ("hista.py", ["--loss", "cispo"], "grpo-cispo"),
    # Issue 30, on request: GRPO's learner under bfloat16 autocast (the GPU's numerics, and the CPU default before
    # issue 30) against float32, the CPU default (the rounding floor of one update: benchmarks/bf16_floor.py).
    "grpo-bf16": ("numca.py", ["--no-numca", "--bf16", "on"], "grpo"),
    # Issue 30, on request: GRPO at the learning rate every trainer had by default before issue 30 (now 3e-6).
    "grpo-lr1e-5": ("numca.py", ["--no-numca", "--learning-rate", "1e-5"], "grpo"),
}
# The arms run when --arms is not given: every method and its baseline (the others answer narrower questions).
DEFAULT_ARMS = ["ppo", "vineppo", "grpo", "numca", "hista", "rloo", "prime"]


def script_args(script: str, flags: list[str]):
    """The Args `script` parses from `flags` (its own parser; defaults included)."""
    import importlib

    import tyro

    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(Path(script).stem)  # the scripts run nothing on import
    return tyro.cli(module.Args, args=flags)


def batch_size(script: str, flags: list[str]) -> int:
    """Sampled responses per training step of `script` run with `flags`, from the script's own Args."""
    args = script_args(script, flags)
    return args.num_prompts * args.samples_per_prompt


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name, with its family and model numbers where /proc/cpuinfo gives them (Linux):
    sessions of one benchmark can land on different machines under one host name (this project's runs have seen
    two AMD EPYC generations, which both name themselves "AMD EPYC", and an Intel Xeon with AMX, whose step times
    differ), and wall-clock figures compare only between runs on the same processor."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def run_command(arm: str, seed: int, run_dir: Path, opts, extra: list[str]) -> list[str]:
    script, flags, _ = ARMS[arm]
    budget = ["--num-steps", str(opts.num_steps)]
    if opts.max_minutes is not None:
        # The scripts' learning-rate schedules span --num-steps, which a time budget leaves unknown (ppo.py's
        # 3% warm-up of a 1,000-step cap would last 30 steps): every arm gets a constant rate instead.
        budget += ["--max-minutes", str(opts.max_minutes), "--warmup-ratio", "0", "--lr-decay", "constant"]
    if opts.samples is not None:
        per_step = batch_size(script, flags + extra)
        budget = ["--num-steps", str(max(1, round(opts.samples / per_step)))]
    save = ["--save-every", str(opts.save_every), "--keep-checkpoints", "1"] if opts.save_every else []
    out = os.path.relpath(run_dir, ROOT) if run_dir.is_relative_to(ROOT) else str(run_dir)
    return [sys.executable, script, *flags, "--seed", str(seed), "--exp-name", arm, "--output-dir", out,
            *(["--eval-every", str(opts.eval_every)] if opts.eval_every_minutes is None else
              ["--eval-every-minutes", str(opts.eval_every_minutes)]),
            "--num-eval-problems", str(opts.num_eval_problems),
            "--no-save-model", *budget, *save, *extra]


def script_run_dir(run_dir: Path) -> Path | None:
    """The script's own run folder inside ours (it names it {exp_name}__{seed}__{unix time})."""
    found = sorted(p for p in run_dir.glob("*__*__*") if p.is_dir())
    return found[-1] if found else None


def finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("returncode") == 0
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def command_line(arm: str, seed: int, run_dir: Path, opts, extra: list[str]) -> str:
    """The command a run of `arm` at `seed` is started with, as run.json records it."""
    return f"OMP_NUM_THREADS={opts.threads} " + shlex.join(["python", *run_command(arm, seed, run_dir, opts, extra)[1:]])


def refuse_changed_runs(todo: list[tuple[str, int]], opts, extra: list[str]) -> None:
    """A run already started in --out (finished, or killed and to be resumed) with another command than the one
    this invocation would start it with (other flags after --, another budget, cadence or thread count) would
    be kept or continued as it was and reported beside runs made the new way: refuse, in one line, before
    anything runs."""
    for arm, seed in todo:
        run_dir = ROOT / opts.out / arm / f"seed{seed}"
        try:
            recorded = json.loads((run_dir / "run.json").read_text())["command"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue  # never started, or its record half-written: it starts afresh
        now = command_line(arm, seed, run_dir, opts, extra)
        if recorded != now:
            sys.exit(f"error: {run_dir} was run with another command ({recorded!r}; now: {now!r}): give another "
                     f"--out, the same flags as before, or delete {run_dir} to run it again")
        changed = changed_defaults(arm, seed, run_dir, opts, extra)
        if changed:
            sys.exit(f"error: {run_dir} was run with the same command but {changed} (a default of "
                     f"{ARMS[arm][0]} changed since): give another --out, or delete {run_dir} to run it again")


def changed_defaults(arm: str, seed: int, run_dir: Path, opts, extra: list[str]) -> str:
    """The settings the run in `run_dir` recorded (its script's args.json) that the same command now resolves
    otherwise, because the script's defaults changed (say its learning rate), as "name=then (now: value)",
    comma-separated; "" when none did or nothing was recorded yet. Settings the run's script did not have yet
    are not compared (the scripts' --resume gives them their defaults too), nor those the script fills in after
    parsing (a None here; batch_size, computed)."""
    inner = script_run_dir(run_dir)
    try:
        then = json.loads((inner / "args.json").read_text()) if inner is not None else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return ""
    script = ARMS[arm][0]
    now = vars(script_args(script, run_command(arm, seed, run_dir, opts, extra)[2:]))
    now = json.loads(json.dumps(now, default=str))  # as args.json has them (tuples as lists, paths as strings)
    return ", ".join(f"{k}={then[k]!r} (now: {v!r})" for k, v in now.items()
                     if k in then and k != "batch_size" and v is not None and then[k] != v)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def holder_alive(lock: Path) -> bool:
    """Whether the invocation or the run named in `lock` still lives (a lock from another machine counts)."""
    try:
        host, *pids = lock.read_text().split()
        return host != socket.gethostname() or any(pid_alive(int(pid)) for pid in pids)
    except (ValueError, FileNotFoundError):
        return False  # half-written or just removed: stale


def take_lock(run_dir: Path) -> bool:
    """Claim a run for this process; False when a live process on this machine holds it."""
    lock = run_dir / "lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if holder_alive(lock):
                return False
            lock.unlink(missing_ok=True)  # its processes died: take the run over
            continue
        os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
        os.close(fd)
        return True
    return False


def start(arm: str, seed: int, opts, extra: list[str]) -> tuple[subprocess.Popen, Path, dict] | None:
    run_dir = ROOT / opts.out / arm / f"seed{seed}"
    if finished(run_dir):
        return None
    if not take_lock(run_dir):
        print(f"skipped  {arm} seed {seed}: another invocation is running it ({run_dir / 'lock'})", flush=True)
        return None
    inner = script_run_dir(run_dir)
    if inner is not None and (inner / "checkpoints").is_dir() and any((inner / "checkpoints").glob("step_*")):
        # A killed run with a checkpoint: the script continues it from its own args.json.
        command = [sys.executable, ARMS[arm][0], "--resume", str(inner)]
        resumed = True
    else:
        for p in run_dir.iterdir():  # a killed run without a checkpoint: start again from nothing
            if p.name != "lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        command = run_command(arm, seed, run_dir, opts, extra)
        resumed = False
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    record = {"arm": arm, "seed": seed, "script": ARMS[arm][0], "baseline": ARMS[arm][2],
              "command": command_line(arm, seed, run_dir, opts, extra) if not resumed
              else f"OMP_NUM_THREADS={opts.threads} " + shlex.join(["python", *command[1:]]),
              "budget": {"max_minutes": opts.max_minutes, "samples": opts.samples,
                         "num_steps": int(command[command.index("--num-steps") + 1]) if not resumed else None},
              "parallel": opts.parallel, "host": socket.gethostname(), "cpu": cpu_name(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "resumed": resumed, "returncode": None}
    if resumed and (run_dir / "run.json").exists():  # keep the command that started the run; note the restart
        old = json.loads((run_dir / "run.json").read_text())
        record = {**old, "resumed": True, "resume_command": record["command"], "returncode": None}
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    log = open(run_dir / "log.txt", "a")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    # The run's own pid too: if this invocation dies and the run goes on, no other invocation takes it over.
    (run_dir / "lock").write_text(f"{socket.gethostname()} {os.getpid()} {proc.pid}")
    print(f"started  {arm} seed {seed}: {record['command'] if not resumed else record['resume_command']}", flush=True)
    return proc, run_dir, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS), metavar="ARM",
                        help=f"arms to run, from: {' '.join(ARMS)} (default: {' '.join(DEFAULT_ARMS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of every run")
    parser.add_argument("--samples", type=int, default=None, help="sampled training responses per run instead")
    parser.add_argument("--num-steps", type=int, default=1000, help="step cap under --max-minutes")
    parser.add_argument("--eval-every", type=int, default=2, help="held-out evaluation every this many steps")
    parser.add_argument("--eval-every-minutes", type=float, default=None,
                        help="held-out evaluation every this many minutes of training instead (every arm alike)")
    parser.add_argument("--num-eval-problems", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once")
    parser.add_argument("--save-every", type=int, default=0,
                        help="checkpoint every N steps so that a killed run resumes (default: restart it)")
    parser.add_argument("--out", default="runs/compare", help="results folder (relative to the repository)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    opts, extra = parser.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    elif extra:
        parser.error(f"unknown flags {' '.join(extra)}: flags for the scripts go after --")
    if (opts.max_minutes is None) == (opts.samples is None):
        parser.error("give one budget: --max-minutes M (equal wall-clock) or --samples N (equal samples)")
    for name in ("num_steps", "eval_every", "num_eval_problems", "threads", "parallel", "samples"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_minutes", "eval_every_minutes"):
        if getattr(opts, name) is not None and not getattr(opts, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if opts.save_every < 0:
        parser.error("--save-every must be >= 0")
    opts.out = os.path.relpath(Path(opts.out).resolve(), ROOT) if Path(opts.out).resolve().is_relative_to(ROOT) \
        else str(Path(opts.out).resolve())  # the commands recorded in run.json stay copyable from the repository

    todo = [(arm, seed) for seed in opts.seeds for arm in opts.arms]
    refuse_changed_runs(todo, opts, extra)
    if opts.dry_run:
        for arm, seed in todo:
            run_dir = ROOT / opts.out / arm / f"seed{seed}"
            state = "finished" if finished(run_dir) else "to run"
            print(f"[{state}] {command_line(arm, seed, run_dir, opts, extra)}")
        return

    running: list[tuple[subprocess.Popen, Path, dict]] = []
    failed = []
    try:
        while todo or running:
            while todo and len(running) < opts.parallel:
                arm, seed = todo.pop(0)
                job = start(arm, seed, opts, extra)
                if job is not None:
                    running.append(job)
            time.sleep(2)
            for job in list(running):
                proc, run_dir, record = job
                if proc.poll() is None:
                    continue
                running.remove(job)
                record.update(returncode=proc.returncode, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
                (run_dir / "run.json").write_text(json.dumps(record, indent=1))
                inner = script_run_dir(run_dir)
                if proc.returncode == 0 and inner is not None:
                    shutil.rmtree(inner / "checkpoints", ignore_errors=True)  # finished: the metrics are what stays
                (run_dir / "lock").unlink(missing_ok=True)
                status = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, {run_dir}/log.txt)"
                print(f"{status} {record['arm']} seed {record['seed']}", flush=True)
                if proc.returncode != 0:
                    failed.append(f"{record['arm']} seed {record['seed']}")
    except KeyboardInterrupt:
        for proc, run_dir, record in running:
            proc.terminate()  # the scripts stop at once on a second SIGINT; SIGTERM ends them now
            proc.wait()
            (run_dir / "lock").unlink(missing_ok=True)
        sys.exit("stopped: run the same command again to continue (finished runs are kept)")
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")
    print(f"done: python benchmarks/report.py --out {opts.out}")


if __name__ == "__main__":
    main()
