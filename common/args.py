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
    "not set", are skipped). NaN is refused in every float field, named or not."""
    for name, value in vars(args).items():
        if isinstance(value, float) and math.isnan(value):
            raise SystemExit(f"error: --{name.replace('_', '-')} is NaN: give a number")
    for rule, names in rules.items():
        for name in names:
            value = getattr(args, name)
            if value is not None and not RULES[rule](value):
                raise SystemExit(f"error: --{name.replace('_', '-')} must be {rule} (got {value})")
