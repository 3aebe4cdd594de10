"""benchmarks/compare.py (runs, skips, restarts), benchmarks/report.py (its arithmetic, by hand) and
benchmarks/gpu_check.py (its verdicts, and its CPU smoke mode end to end)."""

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402
import report  # noqa: E402

TINY = ["--model", "tiny", "--num-prompts", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--micro-batch-size", "1", "--max-new-tokens", "12"]


# ---- report.py: the definitions its docstring states, on numbers worked by hand ----
EVALS = [(0, 0.2, 0, 0.30), (2, 3.0, 64, 0.35), (4, 6.5, 128, 0.40), (5, 10.4, 160, 0.38)]  # step, min, samples, acc


def test_accuracy_at_is_the_latest_evaluation_not_after():
    assert math.isnan(report.at(EVALS, 0.1, 1))  # before the first evaluation
    assert report.at(EVALS, 0.2, 1) == 0.30
    assert report.at(EVALS, 6.4, 1) == 0.35  # never a later evaluation
    assert report.at(EVALS, 6.5, 1) == 0.40
    assert report.at(EVALS, 100, 1) == 0.38
    assert report.at(EVALS, 127, 2) == 0.35 and report.at(EVALS, 128, 2) == 0.40  # along samples


def test_mean_and_standard_error():
    m, se = report.mean_se([0.3, 0.4, 0.5])
    assert m == pytest.approx(0.4) and se == pytest.approx(0.1 / math.sqrt(3))  # sd (n-1) = 0.1
    m, se = report.mean_se([0.3, math.nan])  # missing values are left out; one value has no error
    assert m == 0.3 and math.isnan(se)
    assert report.fmt(0.4, 0.0577) == "0.400 ± 0.058" and report.fmt(math.nan, math.nan) == "-"


def test_time_to_a_target():
    assert report.time_to(EVALS, 0.35) == 3.0
    assert report.time_to(EVALS, 0.39) == 6.5
    assert math.isnan(report.time_to(EVALS, 0.41))


def fake_run(out: Path, arm: str, seed: int, baseline, evals, step_times, budget=10.0, cpu="CPU A"):
    """A finished compare.py run folder with a metrics.jsonl written as the scripts write it."""
    run_dir = out / arm / f"seed{seed}"
    inner = run_dir / f"{arm}__{seed}__1"
    inner.mkdir(parents=True)
    (inner / "args.json").write_text(json.dumps({"num_prompts": 4, "samples_per_prompt": 8}))
    rows, wall = [], 0.0
    for step, (acc, eval_s) in enumerate(evals):
        if step > 0:
            wall += step_times[step - 1]
            rows.append({"step": step, "wall_s": wall, "charts/step_time": step_times[step - 1],
                         "time/generation": 1.0, "time/update": step_times[step - 1] - 1.0})
        wall += eval_s
        rows.append({"step": step, "eval_accuracy": acc, "wall_s": wall})
    (inner / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "run.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "baseline": baseline, "command": f"python x.py --seed {seed}",
        "budget": {"max_minutes": budget, "samples": None, "num_steps": 1000}, "cpu": cpu, "returncode": 0}))


def table(md: str, heading: str) -> dict[str, list[str]]:
    """The rows of the markdown table under `heading`, by their first cell."""
    section = md.split(f"## {heading}")[1].split("\n## ")[0]
    return {line.split(" | ")[0].strip("| "): [c.strip(" |") for c in line.split(" | ")]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| arm")}


def test_report_tables_by_hand(tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    # Steps of 180 s, evaluations of 20 s: evaluations at 1/3, 11/3, 7 and 31/3 minutes; budget 10 minutes,
    # so the fixed points are 10/3 and 20/3 minutes and "end" is the evaluation at 31/3.
    fake_run(out, "grpo", 1, None, [(0.30, 20), (0.34, 20), (0.40, 20), (0.36, 20)], [180, 180, 180])
    fake_run(out, "grpo", 2, None, [(0.30, 20), (0.32, 20), (0.36, 20), (0.40, 20)], [180, 180, 180])
    fake_run(out, "numca", 1, "grpo", [(0.30, 20), (0.40, 20), (0.42, 20), (0.44, 20)], [180, 180, 180])
    fake_run(out, "numca", 2, "grpo", [(0.30, 20), (0.30, 20), (0.40, 20), (0.38, 20)], [180, 180, 180])
    fake_run(out, "unfinished", 1, None, [(0.30, 20)], [])
    (out / "unfinished" / "seed1" / "run.json").write_text(json.dumps({"arm": "unfinished", "returncode": None}))
    proc = subprocess.run([sys.executable, "benchmarks/report.py", "--out", str(out), "--docs", str(docs)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (docs / "compare.md").read_text()
    assert (docs / "compare.png").stat().st_size > 10_000
    assert "unfinished" not in md and "python x.py --seed 2" in md
    acc = table(md, "Held-out accuracy")
    # grpo at 10/3 min: the step-0 evaluations; at 20/3: those of 11/3 min (0.34, 0.32); end 0.36, 0.40.
    assert acc["grpo"][2:5] == ["0.300 ± 0.000", "0.300 ± 0.000", "0.330 ± 0.010"]
    assert acc["grpo"][5:7] == ["0.380 ± 0.020", "0.400 ± 0.000"]
    assert acc["grpo"][7:] == ["3.0", "96", "10.3", "13%"]  # steps, samples (3 x 32), minutes, 80 s of 620
    # numca minus grpo, seed by seed: at 20/3 min +0.06, -0.02; end +0.08, -0.02; best +0.04, 0.00.
    pair = table(md, "Each method")["numca"]
    assert pair[1:5] == ["grpo", "2", "0.020 ± 0.040", "0.030 ± 0.050"] and pair[6] == "0.020 ± 0.020"
    # minutes to grpo's best (0.40 at both seeds): numca 11/3 and 7; grpo itself 7 and 31/3.
    assert pair[7:10] == ["3.7, 7.0", "7.0, 10.3", "2 of 2"]
    steps = table(md, "Step time")
    assert steps["grpo"][1:5] == ["180.0", "1.0", "179.0", "0.0"]
    assert steps["numca"][5] == "+0% (against grpo, 2 of 2 seeds)"
    assert "- CPU A: grpo 1, grpo 2, numca 1, numca 2" in md and "†" not in md
    # Run by run: grpo seed 1 peaks at 0.40 (step 2) and ends at 0.36, 4 points under its best; the others end
    # within 2 points of theirs; all four end above 0.30.
    assert "4 of 4 runs end above their step-0 accuracy; 3 of 4 end within 3 points of their best" in md
    assert "| grpo | 1 | 0.300 | 0.400 | 2 | 0.360 | +0.060 | 0.040 | CPU A |" in md
    assert "| numca | 2 | 0.300 | 0.400 | 2 | 0.380 | +0.080 | 0.020 | CPU A |" in md


def test_report_sets_minutes_against_minutes_only_on_one_processor(tmp_path):
    # Seed 2 of numca ran on another machine than grpo's seed 2, whose steps take twice as long: its minutes are
    # marked †, and its step time stays out of the overhead (+50% with it: (1 + 2) / 2 - 1). Its accuracy counts.
    out, docs = tmp_path / "runs", tmp_path / "docs"
    fake_run(out, "grpo", 1, None, [(0.30, 20), (0.40, 20)], [180])
    fake_run(out, "grpo", 2, None, [(0.30, 20), (0.40, 20)], [180])
    fake_run(out, "numca", 1, "grpo", [(0.30, 20), (0.40, 20)], [180])
    fake_run(out, "numca", 2, "grpo", [(0.30, 20), (0.44, 20)], [360], cpu="CPU B")
    fake_run(out, "hista", 2, "grpo", [(0.30, 20), (0.44, 20)], [360], cpu="CPU B")
    proc = subprocess.run([sys.executable, "benchmarks/report.py", "--out", str(out), "--docs", str(docs)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (docs / "compare.md").read_text()
    pair = table(md, "Each method")
    assert pair["numca"][2] == "2" and pair["numca"][4] == "0.020 ± 0.020"  # both seeds' end: +0.00 and +0.04
    # Minutes (wall_s here, evaluations included): grpo's best 0.40 at 220 s at both seeds; numca reaches it at
    # 220 s and, on the slower processor, 400 s.
    assert pair["numca"][7:10] == ["3.7, 6.7†", "3.7, 3.7†", "2 of 2"]
    steps = table(md, "Step time")
    assert steps["numca"][1] == "270.0" and steps["numca"][5] == "+0% (against grpo, 1 of 2 seeds)"
    assert steps["hista"][5] == "- (no seed ran with grpo on one processor)"
    assert "- CPU A: grpo 1, grpo 2, numca 1" in md and "- CPU B: numca 2, hista 2" in md


def test_report_pairs_a_chain_of_baselines():
    """grpo-cispo is measured against grpo and is numca-cispo's baseline: it heads a plot column of its own and
    stays in grpo's; an arm whose baseline did not run heads its own."""
    order = ["ppo", "vineppo", "grpo", "numca", "grpo-cispo", "numca-cispo", "hista-cispo", "prime"]
    baseline_of = {"ppo": None, "vineppo": "ppo", "grpo": None, "numca": "grpo", "grpo-cispo": "grpo",
                   "numca-cispo": "grpo-cispo", "hista-cispo": "grpo-cispo", "prime": "rloo"}
    assert report.families(order, baseline_of) == [["ppo", "vineppo"], ["grpo", "numca", "grpo-cispo"],
                                                   ["grpo-cispo", "numca-cispo", "hista-cispo"], ["prime"]]


def test_report_without_runs_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/report.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: no finished runs")


def test_cpu_name_tells_processor_generations_apart(tmp_path):
    """Two EPYC generations both call themselves "AMD EPYC": the family and model numbers tell them apart."""
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n\n"
    for family, model in [(25, 17), (26, 2)]:
        (tmp_path / "cpuinfo").write_text(block.format(0, family, model) + block.format(1, 99, 99))
        assert compare.cpu_name(tmp_path / "cpuinfo") == f"AMD EPYC (family {family}, model {model})"
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Some CPU\n")  # no family (not x86)
    assert compare.cpu_name(tmp_path / "cpuinfo") == "Some CPU"


# ---- the headline benchmark's runs, committed in benchmarks/results/ as they finish ----
def test_committed_headline_runs_match_the_readme_command_and_todays_defaults():
    """The README's headline command, dry-run on the committed folder: it refuses (exit 1) any committed run made
    with another command or with defaults a script has changed since (a stale result), and the number of
    finished runs it lists is the one the README states."""
    import re

    readme = (ROOT / "README.md").read_text()
    found = re.search(r"`(python benchmarks/compare\.py --out benchmarks/results/compare640 [^`]*)`", readme)
    assert found, "the README no longer gives the headline benchmark's command"
    command = found.group(1).split()
    stated = re.search(r"(\d+) of its 30 runs are committed", readme)
    assert stated, "the README no longer says how many of the headline runs are committed"
    cut = command.index("--") if "--" in command else len(command)  # compare.py's own flags go before --
    proc = subprocess.run([sys.executable, *command[1:cut], "--dry-run", *command[cut:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 30 and all(line.startswith(("[finished] ", "[to run] ")) for line in lines)
    finished = sum(line.startswith("[finished] ") for line in lines)
    on_disk = [p for p in (ROOT / "benchmarks/results/compare640").glob("*/seed*/run.json")
               if json.loads(p.read_text()).get("returncode") == 0]
    assert finished == len(on_disk) == int(stated.group(1))


# ---- compare.py: real runs of the tiny model ----
def run_compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/compare.py", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_compare_runs_skips_and_restarts(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    flags = ["--arms", "ppo", "grpo", "--seeds", "1", "--samples", "8", "--num-eval-problems", "4", "--", *TINY]
    proc = run_compare(out, *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arm, script in [("ppo", "ppo.py"), ("grpo", "numca.py --no-numca")]:
        record = json.loads((out / arm / "seed1" / "run.json").read_text())
        assert record["returncode"] == 0 and f"python {script} --seed 1" in record["command"]
        assert "--num-steps 2" in record["command"]  # 8 samples / (2 prompts x 2 samples)
        (inner,) = (out / arm / "seed1").glob(f"{arm}__1__*")
        steps = [json.loads(line)["step"] for line in (inner / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2 and not (inner / "final_model").exists()
    started = json.loads((out / "ppo" / "seed1" / "run.json").read_text())["started"]

    # A run killed without a checkpoint (its lock names a dead process) restarts from nothing.
    grpo = out / "grpo" / "seed1"
    record = json.loads((grpo / "run.json").read_text())
    (grpo / "run.json").write_text(json.dumps({**record, "returncode": None}))
    (grpo / "lock").write_text(f"{compare.socket.gethostname()} 999999999")
    (grpo / "leftover.txt").write_text("half a run")
    proc = run_compare(out, *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started  ppo" not in proc.stdout and "started  grpo seed 1" in proc.stdout  # finished: never redone
    assert json.loads((out / "ppo" / "seed1" / "run.json").read_text())["started"] == started
    assert not (grpo / "leftover.txt").exists() and not (grpo / "lock").exists()
    assert len(list(grpo.glob("grpo__1__*"))) == 1

    # A run that a live process holds is left to it.
    (grpo / "run.json").write_text(json.dumps({**record, "returncode": None}))
    (grpo / "lock").write_text(f"{compare.socket.gethostname()} {os.getpid()}")
    proc = run_compare(out, *flags)
    assert proc.returncode == 0 and "started" not in proc.stdout and "skipped  grpo seed 1" in proc.stdout

    # A finished run asked for again with other flags (another budget, another flag for the scripts) is
    # refused in one line, before anything runs; it was silently kept and reported as the new setting. In this
    # process (compare.main as the command line calls it): reading a script's batch size imports it, which a
    # fresh interpreter pays ~5 s for.
    more_samples = [("12" if flags[i - 1] == "--samples" else a) for i, a in enumerate(flags)]
    for argv in (more_samples, [*flags, "--temperature", "1.0"]):
        monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(out), *argv])
        with pytest.raises(SystemExit, match="^error: .*was run with another command"):
            compare.main()
        assert "started" not in capsys.readouterr().out

    # The same command when a script's default has changed since the run (its args.json says another learning
    # rate): refused, naming the setting; it was kept as if run with the new default. A setting the run's script
    # did not have yet (absent from its args.json) is not a change: the second invocation above (unchanged runs)
    # and the dry run below pass.
    (inner,) = (out / "ppo" / "seed1").glob("ppo__1__*")
    recorded = json.loads((inner / "args.json").read_text())
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(out), *flags])
    (inner / "args.json").write_text(json.dumps({**recorded, "learning_rate": recorded["learning_rate"] * 3}))
    with pytest.raises(SystemExit, match=r"^error: .*ppo/seed1 was run with the same command but learning_rate="):
        compare.main()
    (inner / "args.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "learning_rate"}))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(out), "--dry-run", *flags])
    compare.main()
    assert "[finished] OMP_NUM_THREADS=1 python ppo.py --seed 1 " in capsys.readouterr().out


def test_compare_resumes_a_killed_run_from_its_checkpoint(tmp_path):
    out = tmp_path / "cmp"
    command = [sys.executable, "benchmarks/compare.py", "--out", str(out), "--arms", "ppo", "--seeds", "3",
               "--samples", "16", "--save-every", "1", "--num-eval-problems", "4", "--", *TINY]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (saved := list((out / "ppo" / "seed3").glob("ppo__3__*/checkpoints/step_*"))) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # compare.py and its run, as a crash or a closed terminal would
    proc.wait()
    assert saved, "no checkpoint within 300 s"
    assert int(saved[0].name.split("_")[1]) < 4  # killed part way through its 4 steps
    done = run_compare(out, *command[4:])
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "ppo" / "seed3" / "run.json").read_text())
    assert record["returncode"] == 0 and record["resumed"] and "--resume" in record["resume_command"]
    assert "--seed 3" in record["command"]  # the command that started the run is kept
    (inner,) = (out / "ppo" / "seed3").glob("ppo__3__*")
    train = [json.loads(line)["step"] for line in (inner / "metrics.jsonl").read_text().splitlines()
             if "charts/step_time" in line]
    assert train == list(range(1, 5)) and not (inner / "checkpoints").exists()  # each step once; cleaned up


def test_compare_passes_the_minutes_cadence_and_500_problems(tmp_path, monkeypatch, capsys):
    """--eval-every-minutes reaches every arm's command instead of --eval-every; 500 held-out problems by default."""
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--arms", "ppo", "grpo-bf16", "--seeds", "1",
                                      "--max-minutes", "30", "--eval-every-minutes", "3", "--dry-run"])
    compare.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--eval-every-minutes 3.0 --num-eval-problems 500 " in line for line in lines)
    assert not any("--eval-every " in line for line in lines) and "numca.py --no-numca --bf16 on" in lines[1]


@pytest.mark.parametrize("argv,message", [
    (["--arms", "ppo"], "give one budget"),
    (["--max-minutes", "5", "--samples", "10"], "give one budget"),
    (["--max-minutes", "5", "--model", "x"], "flags for the scripts go after --"),
    (["--max-minutes", "5", "--parallel", "0"], "--parallel must be >= 1"),
    (["--max-minutes", "-1"], "--max-minutes must be > 0"),
    (["--max-minutes", "5", "--eval-every-minutes", "0"], "--eval-every-minutes must be > 0"),
    (["--max-minutes", "5", "--arms", "dqn"], "invalid choice"),
])
def test_compare_bad_flags_are_one_line(argv, message, tmp_path):
    proc = run_compare(tmp_path, *argv)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


# ---- gpu_check.py: its verdicts on made-up runs, and its CPU smoke mode for real ----
import gpu_check  # noqa: E402


def made_up_run(returncode=0, steps=2, **metrics):
    record = {"step": 1, "charts/step_time": 1.0, "losses/policy_loss": 0.1, "losses/approx_kl": 0.0,
              "losses/clipfrac": 0.0, **metrics}
    return {"returncode": returncode, "error": "error: boom", "steps": steps, "child": {},
            "records": [{"step": 0, "eval_accuracy": 0.0}] + [{**record, "step": s} for s in range(1, steps + 1)]}


def test_gpu_check_verdicts():
    assert gpu_check.trainer_row("ppo.py", made_up_run(**{"losses/explained_variance": math.nan}))[1] == "pass"
    assert gpu_check.trainer_row("ppo.py", made_up_run(**{"losses/value_loss": math.nan}))[1] == "FAIL"
    assert gpu_check.trainer_row("ppo.py", made_up_run(returncode=1))[1:] == ("FAIL", "exit 1: error: boom")
    assert gpu_check.trainer_row("ppo.py", {**made_up_run(), "steps": 3})[1] == "FAIL"  # a step missing
    # the ratio: exactly 1, on every device
    frozen = made_up_run(steps=1, **{"losses/kl_ref_k3": 0.0, "losses/kl_ref_k1": 0.0})
    assert gpu_check.unchanged_weights_row("ppo.py", frozen, cuda=True)[1] == "pass"
    off = made_up_run(steps=1, **{"losses/approx_kl": 1e-12, "losses/kl_ref_k3": 0.0})
    assert gpu_check.unchanged_weights_row("ppo.py", off, cuda=True)[1] == "FAIL"
    # the KL to the reference: a floor for a bf16 reference on CUDA, exactly 0 for PRIME's and on the CPU
    floor = made_up_run(steps=1, **{"losses/kl_ref_k3": 3e-4, "losses/kl_ref_k1": 2e-3})
    row = gpu_check.unchanged_weights_row("ppo.py", floor, cuda=True)
    assert row[1] == "pass" and "floor" in row[2] and "0.0003" in row[2]
    assert gpu_check.unchanged_weights_row("prime_implicit_prm.py", floor, cuda=True)[1] == "FAIL"
    assert gpu_check.unchanged_weights_row("ppo.py", floor, cuda=False)[1] == "FAIL"
    # memory: the peak (torch's reserved + what was in use before torch) within the estimate
    child = {"estimate": {"need": 10.0}, "peak_reserved_gib": 9.0, "peak_allocated_gib": 8.0, "before_torch_gib": 0.5}
    assert gpu_check.memory_row("ppo.py", {"child": child}, cuda=True)[1] == "pass"
    assert gpu_check.memory_row("ppo.py", {"child": {**child, "before_torch_gib": 1.5}}, cuda=True)[1] == "FAIL"
    assert gpu_check.memory_row("ppo.py", {"child": {}}, cuda=True)[1] == "FAIL"
    assert gpu_check.memory_row("ppo.py", {"child": {**child, "peak_rss_gib": 0.5}}, cuda=False)[1] == "skip"
    assert gpu_check.exit_status([("a", "pass", ""), ("b", "skip", "")]) == 0
    assert gpu_check.exit_status([("a", "pass", ""), ("b", "FAIL", "")]) == 1


def test_gpu_check_smoke_on_the_cpu(tmp_path):
    """The CPU smoke mode end to end for one trainer (--scripts; all five take 45 s): 2 steps and 1 step at
    learning rate 0, through the same code the GPU mode runs; what needs CUDA is skipped, with the reason. The
    verdicts for every trainer are test_gpu_check_verdicts'."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--out",
                           str(tmp_path), "--scripts", "ppo.py", "--skip-vllm"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("  ")[0]: line.split("  ", 1)[1].split() for line in proc.stdout.splitlines()
            if line.startswith(("trainer ", "memory ", "unchanged weights ", "vllm "))}
    assert [r for r in rows if r.startswith("trainer ")] == ["trainer ppo.py"]
    assert rows["trainer ppo.py"][0] == "pass" and rows["unchanged weights ppo.py"][0] == "pass"
    assert rows["memory ppo.py"][0] == "skip"
    assert "skipped: memory against the estimate, vLLM's sleep mode: no CUDA device" in proc.stdout
    # the vLLM cycle is tests/test_vllm.py's (the plain suite gives the same result with vLLM installed or not)
    assert "skipped: the vLLM cycle: --skip-vllm" in proc.stdout and not any(r.startswith("vllm") for r in rows)
    assert proc.stdout.strip().splitlines()[-1].startswith("all checks passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_without_cuda_says_what_to_run():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip() == ("error: this torch sees no CUDA device: run python "
                                                            "benchmarks/gpu_check.py --device cpu --smoke")


# ---- bf16_floor.py: one update's movement of the log-probs under each learner numerics ----
import bf16_floor  # noqa: E402


def test_bf16_floor_grid_shares_by_hand():
    one, half, between = 1.0, 1.0 + 2**-8, 1.0 + 2**-9  # bf16 keeps 7 fraction bits: 1 + 2**-8 is half-way
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[one, half, between]]))
    on, mid = bf16_floor.grid_shares(model)
    assert (on, mid) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert torch.tensor(half).bfloat16().float() == 1.0 and torch.tensor(1.0 + 3 * 2**-8).bfloat16().float() > 1.01


def test_bf16_floor_end_to_end_on_the_tiny_model(capsys, monkeypatch):
    # float32 at learning rate 0: the update's log-probs are the old ones exactly; a real rate moves them
    assert bf16_floor.one_step("fp32", 0.0, 1, bf16_floor.SMOKE)["losses/approx_kl"] == 0.0
    assert bf16_floor.one_step("head32", 1e-3, 1, bf16_floor.SMOKE)["losses/approx_kl"] > 0.0
    assert bf16_floor.numca.load_trained.__name__ == "load_trained"  # the patch is undone
    monkeypatch.setattr(sys, "argv", ["bf16_floor.py", "--smoke", "--modes", "snap", "fp32", "--seeds", "1",
                                      "--learning-rates", "1e-3"])
    bf16_floor.main()
    out = capsys.readouterr().out
    assert "of the float32 weights on the bfloat16 grid" in out
    assert "| snap | 0.001 |" in out and "| fp32 | 0.001 |" in out
