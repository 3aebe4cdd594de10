"""Grade a model's math answer against a gold final answer: 1.0 if equivalent, else 0.0.

    grade("... so the answer is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}")  ->  1.0

The prediction is the LAST `\\boxed{...}` (nested braces handled), else the last "answer is ..." phrase,
else a GSM8K `#### n` line, else the last number in the text. Equivalence is decided by math-verify
(numbers, fractions, LaTeX forms, thousands separators, units, percentages) with a fast exact-number
path first. Nothing is ever executed: math-verify parses LaTeX into sympy without `eval`, and both its
parsing and its comparison run under a timeout, so hostile output (huge towers of powers, deep nesting,
code) costs at most a few seconds and scores 0.0.
"""

from __future__ import annotations

import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MAX_ANSWER_CHARS = 300  # a longer "final answer" is not an answer; refuse it before parsing
TIMEOUT_S = 2  # per math-verify parse and per comparison (signal-based: main thread only)

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_GSM8K = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_PLAIN_NUMBER = re.compile(r"^\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*\$?$")


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (or `\\fbox{...}`), nested braces included."""
    opens = [m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not opens:
        return None
    # One pass pairs every brace with its partner, so even thousands of nested boxes cost O(len).
    close_of, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close_of[stack.pop()] = i
    for start in reversed(opens):
        if start in close_of:
            return text[start + 1 : close_of[start]].strip()
    return None  # only unbalanced boxes


def extract_answer(response: str) -> str | None:
    """The model's final answer as a string, or None when the response has none."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    phrases = _ANSWER_IS.findall(response)
    if phrases:
        return phrases[-1].strip().strip("$").strip()
    gsm = _GSM8K.findall(response)
    if gsm:
        return gsm[-1]
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _as_number(s: str) -> float | None:
    m = _PLAIN_NUMBER.match(s.strip())
    return float(m.group(1).replace(",", "")) if m else None


def _parse(s: str):
    return parse(f"${s}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=TIMEOUT_S)


def grade(response: str, gold: str) -> float:
    """1.0 if the final answer of `response` equals `gold` (the data loader's final answer), else 0.0."""
    pred = extract_answer(response)
    if pred is None or not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    gold = gold.strip()
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:  # the common case, decided without sympy
        return float(abs(a - b) <= 1e-6 * max(1.0, abs(b)))
    try:
        gold_parsed, pred_parsed = _parse(gold), _parse(pred)
        if not gold_parsed or not pred_parsed:
            return float(pred.replace(" ", "") == gold.replace(" ", ""))
        return float(verify(gold_parsed, pred_parsed, timeout_seconds=TIMEOUT_S))
    except Exception:  # math-verify raises on some pathological input: that is a wrong answer
        return 0.0
