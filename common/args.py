"""Range checks for the scripts' numeric flags: a wrong value ends the run before anything is loaded,
with one line that names the flag, its range and the value given."""

from __future__ import annotations

import math

# A rule's text, as the error message shows it -> the test a value must pass.
RULES = {
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def check_ranges(args, rules: dict[str, list[str]]) -> None:
    """`rules` maps a rule of RULES to the names of the fields that must satisfy it (None values, meaning
    "not set", are skipped). NaN and infinity are refused in every float field, named or not: no flag means
    "unbounded" by inf (a limit that can be left off, such as --max-minutes, is left off by not giving it)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and math.isnan(value):
            raise SystemExit(f"error: --{name.replace('_', '-')} is NaN: give a number")
        if isinstance(value, float) and math.isinf(value):
            raise SystemExit(f"error: --{name.replace('_', '-')} is {value}: give a finite number (a limit that "
                             "can be left off is left off by not giving the flag)")
    for rule, names in rules.items():
        for name in names:
            value = getattr(args, name)
            if value is not None and not RULES[rule](value):
                raise SystemExit(f"error: --{name.replace('_', '-')} must be {rule} (got {value})")


def check_device(device: str, backend: str) -> None:
    """A --device this machine can run, with this --backend: CUDA present when asked for, and vLLM on the
    first visible GPU only. vLLM ignores a device index (it runs on cuda:0; the weight sync would then copy
    across GPUs and the memory check read the other card), and CUDA_VISIBLE_DEVICES cannot be changed once
    torch has started CUDA, so GPU N is chosen before the process starts."""
    index = device.partition(":")[2]
    if backend == "vllm" and device.startswith("cuda") and index not in ("", "0"):
        raise SystemExit(f"error: --backend vllm runs on the first visible GPU only, not {device}: run with "
                         f"CUDA_VISIBLE_DEVICES={index} and --device cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but this torch build sees no CUDA device: use --device cpu (or auto)")
