"""Plots and tables from the runs of `benchmarks/compare.py`: mean and standard error across seeds.

    python benchmarks/report.py --out runs/compare                  # docs/compare.png and docs/compare.md
    python benchmarks/report.py --out runs/compare --include-unfinished --docs /tmp/peek   # while it runs

It reads only what the scripts wrote (`metrics.jsonl`, `args.json`) and what compare.py recorded
(`run.json`: the command, the budget, the baseline of each arm). Definitions, so that the tables can be
checked by hand:
- Accuracy at time t of one run: its latest held-out evaluation at or before t (no interpolation, never
  a later one). Minutes are the scripts' own training clock, `train_s` (wall-clock from the end of model
  loading less the held-out evaluations, the clock of --max-minutes; runs written before it existed have
  only `wall_s`, evaluations included, and are read by that); samples are steps x (num_prompts x samples_per_prompt), the responses the policy trained on
  (VinePPO's Monte Carlo continuations and PRIME's filtered-out draws are extra generation, not counted).
- "end" is each run's last evaluation: a run under --max-minutes finishes the step it is in when the budget
  runs out, then evaluates, so "end" comes a fraction of a step after the budget; the fixed points (a third
  and two thirds of the budget) read the latest evaluation before them.
- Mean ± standard error across seeds: the standard error is the sample standard deviation (n - 1) over
  sqrt(n). With 3 seeds it is itself rough: read a difference of under 2 standard errors as a tie.
- Best: each run's highest evaluation, averaged over seeds. A maximum over several noisy evaluations is
  biased upward, more so for a run with more evaluations; the accuracy at fixed times is not.
- Paired difference: arm minus its baseline at the same seed (same first batch and evaluation set), then
  mean ± standard error of those differences. "Mean over the budget" averages the accuracy on a 61-point
  grid over the budget (the area under the curve divided by its length).
- Time to the baseline's best: per seed, the first minute at which the arm's evaluation reaches the best
  evaluation its baseline made at that seed, against the minute the baseline itself got there.
- Each run: its step-0 accuracy, its best evaluation (the first step that reached it), its last, and whether
  it ends above its start and within 3 points of its best (issue 30's bar for a CPU default).
- Step time: the mean of `charts/step_time` and of each `time/*` part over steps; "evaluation share" is
  the wall-clock spent in held-out evaluations over the run's total. A method's overhead is, seed by seed,
  its mean step time over its baseline's at that seed, averaged over the seeds, minus 1; step time also
  follows response length, which training changes.
- Processors: compare.py records the CPU each run ran on (`cpu` in run.json; runs from before it have none and
  read as "not recorded"). Sessions of one benchmark can land on different machines, whose clocks differ by
  far more than any method's overhead, so every figure that sets one run's minutes against another's (the
  minutes to the baseline's best, the overhead) uses only the seeds where the method and its baseline ran on
  the same processor; a pair on two processors is marked † and left out of the overhead. Accuracy figures use
  every seed: a processor changes the last bits of the numbers, not what is learned.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NEAR_BEST = 0.03  # "within a few points of its best" (issue 30): 3 points, ~1.4 standard errors of one figure on
# 500 problems at an accuracy of 0.4
PARTS = ["generation", "reference", "critic", "mc_values", "numca", "hista", "prm", "update"]


def load_run(run_dir: Path, include_unfinished: bool) -> dict | None:
    """One run's evaluations and step records, or None when it is not there (or not finished)."""
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("returncode") != 0 and not include_unfinished:
        return None
    inner = sorted(p for p in run_dir.glob("*__*__*") if (p / "metrics.jsonl").exists())
    if not inner:
        return None
    args = json.loads((inner[-1] / "args.json").read_text())
    per_step = args["num_prompts"] * args["samples_per_prompt"]
    evals, steps, eval_seconds, last_wall = [], [], 0.0, 0.0
    for line in open(inner[-1] / "metrics.jsonl"):
        row = json.loads(line)
        if "eval_accuracy" in row:
            # An evaluation is written right after its step's record (or at the start, for step 0).
            eval_seconds += row["wall_s"] - last_wall
            evals.append((row["step"], row.get("train_s", row["wall_s"]) / 60, row["step"] * per_step,
                          row["eval_accuracy"]))
        else:
            steps.append(row)
        last_wall = row["wall_s"]
    if not evals:
        return None
    return {**record, "cpu": record.get("cpu") or "not recorded", "evals": evals, "steps": steps,
            "eval_share": eval_seconds / max(last_wall, 1e-9), "total_minutes": last_wall / 60, "per_step": per_step}


def at(evals: list[tuple], x: float, axis: int) -> float:
    """The accuracy of the latest evaluation whose minutes (axis 1) or samples (axis 2) are <= x."""
    seen = [e[3] for e in evals if e[axis] <= x + 1e-9]
    return seen[-1] if seen else math.nan


def mean_se(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def fmt(m: float, se: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def curve(runs: list[dict], grid: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([[at(r["evals"], x, axis) for x in grid] for r in runs])
    n = np.sum(~np.isnan(values), axis=0)
    with warnings.catch_warnings():  # grid points past every run's end (all nan), or one seed: nan, said
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        se = np.where(n > 1, np.nanstd(values, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, se


def time_to(evals: list[tuple], target: float) -> float:
    """The minutes of the first evaluation that reaches `target`; nan if none does."""
    hits = [e[1] for e in evals if e[3] >= target - 1e-9]
    return hits[0] if hits else math.nan


def families(order: list[str], baseline_of: dict[str, str | None]) -> list[list[str]]:
    """The plot's columns: each arm that has no baseline among the runs, or that is itself the baseline of another
    (grpo-cispo: measured against grpo, and the baseline of numca-cispo), heads a column of itself and the arms
    measured against it, so such an arm is drawn in two columns."""
    heads = [a for a in order if baseline_of[a] not in order or any(baseline_of[m] == a for m in order)]
    return [[a] + [m for m in order if baseline_of[m] == a] for a in heads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/compare", help="compare.py's results folder")
    parser.add_argument("--docs", default="docs", help="where compare.png and compare.md go")
    parser.add_argument("--include-unfinished", action="store_true", help="also runs still going or failed")
    opts = parser.parse_args()
    out = Path(opts.out) if os.path.isabs(opts.out) else ROOT / opts.out
    docs = Path(opts.docs) if os.path.isabs(opts.docs) else ROOT / opts.docs
    runs: dict[str, list[dict]] = {}
    for run_json in sorted(out.glob("*/seed*/run.json")):
        run = load_run(run_json.parent, opts.include_unfinished)
        if run is not None:
            runs.setdefault(run["arm"], []).append(run)
    if not runs:
        raise SystemExit(f"error: no finished runs under {out} (run benchmarks/compare.py first, "
                         "or pass --include-unfinished)")
    budgets = {r["budget"]["max_minutes"] for rs in runs.values() for r in rs}
    budget = max((b for b in budgets if b is not None), default=None)
    order = [a for a in ["ppo", "vineppo", "grpo", "grpo-nocorr", "grpo-bf16", "grpo-lr1e-5", "numca", "hista", "grpo-cispo", "numca-cispo",
                         "hista-cispo", "rloo", "prime"] if a in runs]
    order += sorted(a for a in runs if a not in order)
    baseline_of = {a: runs[a][0].get("baseline") for a in order}

    # Fixed points along the budget: minutes under --max-minutes, samples under --samples. "end" is each run's
    # last evaluation, made when its budget ran out (a time-budgeted run finishes the step it is in first).
    axis, unit = (1, "min") if budget else (2, "samples")
    horizon = budget or min(min(r["evals"][-1][2] for r in rs) for rs in runs.values())
    points = [horizon / 3, 2 * horizon / 3]
    grid = np.linspace(0, horizon, 61)
    final = lambda r: r["evals"][-1][3]  # noqa: E731
    best = lambda r: max(e[3] for e in r["evals"])  # noqa: E731

    seeds = lambda a: f"{len(runs[a])} seed" + ("s" if len(runs[a]) > 1 else "")  # noqa: E731
    lines = [f"# Side-by-side comparison ({', '.join(f'{a}: {seeds(a)}' for a in order)})", ""]
    trained = all("train_s" in r["steps"][0] for rs in runs.values() for r in rs if r["steps"])  # runs since issue 30
    clock = ("of training", "evaluations not counted") if trained else ("of wall-clock", "evaluations included")
    lines += [f"Budget: {budget:g} minutes {clock[0]} per run ({clock[1]})" if budget else
              f"Budget: {horizon:g} training samples per run", ""]
    head = "| arm | seeds | step 0 | " + " | ".join(f"{x:.3g} {unit}" for x in points) + \
        " | end | best | steps | samples | minutes | evaluation share |"
    lines += ["## Held-out accuracy (mean ± standard error across seeds)", "", head,
              "|" + "---|" * (head.count("|") - 1)]
    for a in order:
        rs = runs[a]
        cells = [fmt(*mean_se(r["evals"][0][3] for r in rs))]
        cells += [fmt(*mean_se(at(r["evals"], x, axis) for r in rs)) for x in points]
        cells += [fmt(*mean_se(final(r) for r in rs)), fmt(*mean_se(best(r) for r in rs))]
        cells += [f"{np.mean([r['evals'][-1][0] for r in rs]):.1f}", f"{np.mean([r['evals'][-1][2] for r in rs]):.0f}",
                  f"{np.mean([r['evals'][-1][1] for r in rs]):.1f}", f"{np.mean([r['eval_share'] for r in rs]):.0%}"]
        lines.append(f"| {a} | {len(rs)} | " + " | ".join(cells) + " |")

    # Issue 30's bar for a CPU default, run by run: it ends above its start and within a few points of its best.
    runs_all = [(a, r) for a in order for r in sorted(runs[a], key=lambda r: r["seed"])]
    above = sum(final(r) > r["evals"][0][3] for _, r in runs_all)
    near = sum(best(r) - final(r) <= NEAR_BEST + 1e-9 for _, r in runs_all)
    lines += ["", "## Each run: its start, best and end", "",
              f"{above} of {len(runs_all)} runs end above their step-0 accuracy; {near} of {len(runs_all)} end within "
              f"{NEAR_BEST * 100:g} points of their best evaluation.", "",
              "| arm | seed | step 0 | best | at step | end | end - start | best - end | processor |",
              "|---|---|---|---|---|---|---|---|---|"]
    for a, r in runs_all:
        top = max(r["evals"], key=lambda e: e[3])  # the first evaluation at the best accuracy
        lines.append(f"| {a} | {r['seed']} | {r['evals'][0][3]:.3f} | {top[3]:.3f} | {top[0]} | {final(r):.3f} | "
                     f"{final(r) - r['evals'][0][3]:+.3f} | {best(r) - final(r):.3f} | {r['cpu']} |")

    paired = [a for a in order if baseline_of[a] in runs]
    any_apart = False
    if paired:
        lines += ["", "## Each method against its baseline, seed by seed (difference: method minus baseline)", "",
                  f"| method | baseline | seeds paired | Δ at {points[1]:.3g} {unit} | Δ end | "
                  "Δ mean over the budget | Δ best | minutes to the baseline's best: method | baseline | reached |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for a in paired:
            b = baseline_of[a]
            base = {r["seed"]: r for r in runs[b]}
            pairs = [(r, base[r["seed"]]) for r in runs[a] if r["seed"] in base]
            if not pairs:
                continue
            d_mid = [at(r["evals"], points[1], axis) - at(q["evals"], points[1], axis) for r, q in pairs]
            d_end = [final(r) - final(q) for r, q in pairs]
            mean_acc = lambda r: np.nanmean([at(r["evals"], x, axis) for x in grid])  # noqa: E731
            d_auc = [mean_acc(r) - mean_acc(q) for r, q in pairs]
            d_best = [best(r) - best(q) for r, q in pairs]
            t_arm = [time_to(r["evals"], best(q)) for r, q in pairs]
            t_base = [time_to(q["evals"], best(q)) for _, q in pairs]
            apart = [r["cpu"] != q["cpu"] for r, q in pairs]  # minutes on two processors do not compare
            show = lambda ts: ", ".join(("never" if math.isnan(t) else f"{t:.1f}") + ("†" if x else "")  # noqa: E731
                                        for t, x in zip(ts, apart))
            lines.append(f"| {a} | {b} | {len(pairs)} | {fmt(*mean_se(d_mid))} | {fmt(*mean_se(d_end))} | "
                         f"{fmt(*mean_se(d_auc))} | {fmt(*mean_se(d_best))} | {show(t_arm)} | {show(t_base)} | "
                         f"{sum(not math.isnan(t) for t in t_arm)} of {len(pairs)} |")
            any_apart = any_apart or any(apart)

    if any_apart:
        lines += ["", "† the method and its baseline ran on different processors at that seed (see Processors): "
                  "their minutes do not compare."]

    parts = [p for p in PARTS if any(f"time/{p}" in s for rs in runs.values() for r in rs for s in r["steps"])]
    lines += ["", "## Step time (seconds, mean over steps and seeds)", "",
              "| arm | step | " + " | ".join(parts) + " | other | overhead against the baseline |",
              "|" + "---|" * (len(parts) + 4)]
    run_step = lambda r: np.mean([s["charts/step_time"] for s in r["steps"]])  # noqa: E731
    step_mean = {a: np.mean([run_step(r) for r in runs[a]]) for a in order}
    for a in order:
        cells = []
        for p in parts:
            vals = [s[f"time/{p}"] for r in runs[a] for s in r["steps"] if f"time/{p}" in s]
            cells.append("" if not vals else f"{np.mean(vals):.1f}" if np.mean(vals) >= 0.1 else f"{np.mean(vals):.3f}")
        known = sum(np.mean([s.get(f"time/{p}", 0.0) for r in runs[a] for s in r["steps"]]) for p in parts)
        b = baseline_of[a]
        overhead = ""
        if b in step_mean:  # seed by seed, only where both ran on one processor: the mean of the ratios, minus 1
            base = {r["seed"]: r for r in runs[b]}
            ratios = [run_step(r) / run_step(base[r["seed"]]) for r in runs[a]
                      if r["seed"] in base and base[r["seed"]]["cpu"] == r["cpu"]]
            overhead = (f"{np.mean(ratios) - 1:+.0%} (against {b}, {len(ratios)} of {len(runs[a])} seeds)" if ratios
                        else f"- (no seed ran with {b} on one processor)")
        lines.append(f"| {a} | {step_mean[a]:.1f} | " + " | ".join(cells)
                     + f" | {step_mean[a] - known:.1f} | {overhead} |")

    cpus = sorted({r["cpu"] for rs in runs.values() for r in rs})
    lines += ["", "## Processors", "", "The CPU each run ran on (compare.py's run.json):", ""]
    for cpu in cpus:
        on = [f"{a} {r['seed']}" for a in order for r in sorted(runs[a], key=lambda r: r["seed"]) if r["cpu"] == cpu]
        lines.append(f"- {cpu}: " + ", ".join(on))
    if len(cpus) > 1:
        lines += ["", "The minutes columns above and the minutes plot mix processors; only the figures that set a "
                  "method against its baseline keep to one (see †)."]

    lines += ["", "## Commands", ""]
    for a in order:
        for r in sorted(runs[a], key=lambda r: r["seed"]):
            lines.append(f"    {r['command']}" + (f"   (resumed: {r['resume_command']})" if r.get("resumed") else ""))
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "compare.md").write_text("\n".join(lines) + "\n")

    # Plots: one column per baseline family, accuracy against minutes (top) and samples (bottom).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_families = families(order, baseline_of)
    fig, axes = plt.subplots(2, len(fig_families), figsize=(max(6, 5 * len(fig_families)), 7), squeeze=False)
    # Each curve stops where the shortest of its seeds stops, so that every point is a mean over all seeds.
    minute_grid = np.linspace(0, max(r["evals"][-1][1] for rs in runs.values() for r in rs), 200)
    sample_grid = np.linspace(0, max(r["evals"][-1][2] for rs in runs.values() for r in rs), 200)
    for col, family in enumerate(fig_families):
        for row, (x_axis, xs, label) in enumerate([(1, minute_grid, f"minutes {clock[0]} ({clock[1]})"),
                                                   (2, sample_grid, "training samples")]):
            ax = axes[row][col]
            for a in family:
                end = min(r["evals"][-1][x_axis] for r in runs[a])
                x = np.append(xs[xs < end], end)  # up to the last evaluation of the shortest seed, included
                m, se = curve(runs[a], x, x_axis)
                (line,) = ax.step(x, m, where="post", label=f"{a} (n={len(runs[a])})")
                ax.fill_between(x, m - np.nan_to_num(se), m + np.nan_to_num(se), step="post", alpha=0.2,
                                color=line.get_color())
            if budget and x_axis == 1:
                ax.axvline(budget, color="gray", linestyle=":", linewidth=1)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out accuracy")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    fig.suptitle("Held-out greedy accuracy, mean ± standard error across seeds")
    fig.tight_layout()
    fig.savefig(docs / "compare.png", dpi=110)
    print(f"wrote {docs / 'compare.md'} and {docs / 'compare.png'}")


if __name__ == "__main__":
    main()
