"""How far one update moves the log-probs under each learner numerics: the bf16 rounding floor (issue 30).

    python benchmarks/bf16_floor.py                                     # the CPU default, 3 seeds x 2 rates x 4 modes
    python benchmarks/bf16_floor.py --modes bf16 fp32 --seeds 1 --learning-rates 1e-6
    python benchmarks/bf16_floor.py --smoke                             # the tiny model, seconds: checks the script

Each cell is one GRPO step (`numca.py --no-numca --num-steps 1`, a constant learning rate from the first
optimizer step), run in this process with the script's own main(); the figures are that step's `losses/approx_kl`
and `losses/clipfrac`: how far the update's later minibatches moved the log-probs of the tokens they train on
from the log-probs before the update (the first minibatch sees unchanged weights and gives exactly 0). In float32
an update of learning rate lr moves log-probs by O(lr), so approx_kl grows as lr squared; a floor that stays when
lr shrinks is rounding, not learning. Modes (the sampler is the hf backend's bfloat16 copy in every mode):
- bf16: `--bf16 on` (the trainers' default on CUDA, and on the CPU too before issue 30), float32 weights under
  bfloat16 autocast;
- snap: the same, with the float32 weights rounded to the nearest bfloat16 value at load, as a bfloat16
  checkpoint's weights are (the CPU default is dequantised from a Q4_1 GGUF: its weights are not);
- head32: bf16 with the LM head computed in float32 (float32 logits; what TRL's `cast_lm_head_to_fp32` aims at);
- fp32: `--bf16 off`, float32 compute (the CPU default since issue 30).
Also printed: the share of the model's float32 weights that sit on the bfloat16 grid, and exactly half-way
between two bfloat16 values (where any change, however small, moves their bfloat16 rounding by a whole step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numca  # noqa: E402
import tyro  # noqa: E402

MODES = ["bf16", "snap", "head32", "fp32"]
SMOKE = ["--model", "tiny", "--dataset", "digits", "--num-prompts", "4", "--samples-per-prompt", "4",
         "--minibatch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "12"]


def grid_shares(model) -> tuple[float, float]:
    """(share of float32 weights exactly representable in bfloat16, share exactly half-way between two)."""
    total = on = mid = 0
    for p in model.parameters():
        low = p.detach().float().contiguous().view(torch.int32) & 0xFFFF  # the 16 bits bfloat16 drops
        total += p.numel()
        on += int((low == 0).sum())
        mid += int((low == 0x8000).sum())
    return on / total, mid / total


def float32_head(model) -> None:
    """The LM head as a float32 matmul of a float32 input, autocast off (the weight may be tied to the embeddings)."""
    head = model.get_output_embeddings()

    def forward(x):
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x.float(), head.weight.float(), None if head.bias is None else
                                              head.bias.float())

    head.forward = forward


def one_step(mode: str, lr: float, seed: int, flags: list[str]) -> dict:
    """One GRPO step of numca.py in this process under `mode`; that step's metrics."""
    original = numca.load_trained

    def load(args, device, checkpointing):
        model = original(args, device, checkpointing)
        if mode == "snap":
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        if mode == "head32":
            float32_head(model)
        return model

    numca.load_trained = load
    try:
        with tempfile.TemporaryDirectory() as out:
            argv = [*flags, "--no-numca", "--num-steps", "1", "--seed", str(seed), "--learning-rate", str(lr),
                    "--warmup-ratio", "0", "--lr-decay", "constant", "--eval-every", "1000", "--no-save-model",
                    "--num-eval-problems", "2", "--output-dir", out, "--exp-name", f"{mode}-{lr:g}-{seed}"]
            numca.main(tyro.cli(numca.Args, args=argv + ["--bf16", "off" if mode == "fp32" else "on"]))
            (run,) = Path(out).iterdir()
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finally:
        numca.load_trained = original
    return next(r for r in records if "losses/approx_kl" in r)


def mean_se(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2g}"
    return f"{statistics.mean(values):.2g} ± {statistics.stdev(values) / len(values) ** 0.5:.1g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-6, 1e-5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--smoke", action="store_true", help="the tiny model: checks that the script runs")
    args, rest = parser.parse_known_args()
    flags = (SMOKE if args.smoke else []) + [f for f in rest if f != "--"]
    from common.models import load_model

    model_name = flags[flags.index("--model") + 1] if "--model" in flags else numca.DEFAULT_MODEL
    on, mid = grid_shares(load_model(model_name))
    rows = {}
    for mode in args.modes:
        for lr in args.learning_rates:
            for seed in args.seeds:
                r = one_step(mode, lr, seed, flags)
                rows.setdefault((mode, lr), []).append(r)
                print(json.dumps({"mode": mode, "lr": lr, "seed": seed, "approx_kl": r["losses/approx_kl"],
                                  "clipfrac": r["losses/clipfrac"], "update_s": r["time/update"],
                                  "step_s": r["charts/step_time"]}), flush=True)
    print(f"\n{model_name}: {on:.1%} of the float32 weights on the bfloat16 grid, {mid:.1%} exactly half-way\n")
    print("| numerics | learning rate | approx_kl | clipfrac | update s | step s |")
    print("|---|---|---|---|---|---|")
    for (mode, lr), rs in rows.items():
        print(f"| {mode} | {lr:g} | {mean_se([r['losses/approx_kl'] for r in rs])} | "
              f"{mean_se([r['losses/clipfrac'] for r in rs])} | {mean_se([r['time/update'] for r in rs])} | "
              f"{mean_se([r['charts/step_time'] for r in rs])} |")


if __name__ == "__main__":
    main()
