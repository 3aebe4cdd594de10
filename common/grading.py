"""Grade a model's math answer against a gold final answer: 1.0 if equivalent, else 0.0.

    grade("... so the answer is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}")              ->  1.0
    grade("\\boxed{59 \\cdot 100}", "5900", question="What is 59 * 100?")            ->  0.0 (handed back)

Unicode operators and symbols (⋅ ∗ × · ÷ − ½ ² √ π ≤ °) are rewritten as ASCII/LaTeX first, in the
response, the gold answer and the question alike (normalize_unicode).

Extraction: the model's final answer is the FIRST of these that the response has
  1. boxes: the last balanced `\\boxed{...}` / `\\fbox{...}` (nested braces handled). Boxes just before it
     that are separated from it only by separators (spaces, `$`, commas, semicolons, "and", "or", a unit
     then "and", `\\quad`, `\\text{ and }`, line breaks, labels such as `x =`) belong to the same answer:
     `$x = \\boxed{-2}$ and $x = \\boxed{1}$` is the answer "-2, 1". A box followed by more reasoning and
     then another box is superseded: the last box wins; so is a box followed by "the answer is <math>".
  2. "answer is ...": the rest of the sentence after the last "answer is" (case-insensitive); a number
     followed only by words is that number ("The answer is 18 dollars." -> "18");
  3. GSM8K: the text after the last `####` that starts a line;
  4. the whole response, when it is one short line of math without prose ("\\frac{1}{2}", "x^2 + 2x + 1");
  5. otherwise whichever ends last of: the last math span (`$...$` with or without spaces inside,
     `$$...$$`, `\\(...\\)`, `\\[...\\]`; "$5 and $10" are prices, not a span), the last bare `\\frac{..}{..}` /
     `\\sqrt{..}` read whole with a sign or whole part glued to it (`-\\frac{1}{9}`, `3\\frac{1}{2}`), and the
     last number that stands on its own (a fraction 2/3 kept whole). A digit inside a word or an index is
     not a number: `B2`, `x_2`, `H2O`, `CO2`, the exponent of `x^2`, the base of `2^{10}`; "2nd" is the
     ordinal 2 and "5cm" is 5.
The gold answer goes through the same reading: its box ("... \\boxed{24}" -> "24"; several boxes with only
symbols between them are all of it), the rest after "answer is", or the text without `$` delimiters.

Equivalence:
- Identical text (spaces, delimiters, \\left/\\right, \\text{} wrappers and \\dfrac/\\frac aside) is equal.
  An `\\approx` keeps the exact side (`\\frac{\\sqrt3}{3} \\approx 0.577` is `\\frac{\\sqrt3}{3}`);
  `\\begin{bmatrix}` and the other bracket styles are `\\begin{pmatrix}`.
- A numeric gold answer (a number, fraction, mixed number, power, scientific notation, ...) is compared
  with the answer's value side: the last side of an equation that is a plain number or a fraction in
  lowest terms ("3 \\times 4 = 12", value first "1024 = 2^{10}", "x = 5"); an equation whose plain-number
  sides differ ("5901 = 5900") scores 0.0. When that side is a form whose value a human reads directly -
  a plain number (units, \\text{}, degrees, %, currency signs and digit-group separators ignored; a decimal
  comma where a comma cannot group thousands: 2,74), a fraction a/b, (a)/(b), \\frac{a}{b}, a mixed number
  3 1/2 or 3\\frac{1}{2}, scientific notation 2.5 \\times 10^3 or 2.5e3, an integer power 10^3, 2^{-1}, the
  root of a perfect square \\sqrt{16}, or a repeating decimal 0.\\overline{3} - the two values are compared
  exactly (Fractions, nothing evaluated); a decimal equals a value it rounds to a relative 1e-6, except that
  an integer gold needs that integer. Any other form goes to math-verify.
- Everything else goes to math-verify (fractions, roots, LaTeX forms, sets, intervals, tuples, relations,
  matrices, units, percentages); a relation such as "x \\geq 5" equals the interval "[5, \\infty)", and
  "y = 2x + 1" equals "2x + 1" either way round.

The question (issue 26). Without it, any form of the right value counts, as a careful human grader reads it:
`10^3`, `2^{10}`, `\\sqrt{4}`, `(3)/(4)`, `3 1/2`, `1024 = 2^{10}`, and also `3 \\cdot 4` or `59 * 100`, whose
value is right; nothing is refused for its notation alone, because without the question "what is 59 * 100?" and
"how many eggs in 3 boxes of 4?" cannot be told apart. What is still refused is what a careful grader refuses
whatever the question: several values for one (`5900 \\pm 1`, "5900 or 5901", "1,2" for 12), a false equation
("5901 = 5900"), an imprecise decimal (0.33 for 1/3). With the question (the trainers and the evaluation pass
it), an answer that only hands the question back scores 0.0 (restates_question, question_expressions):
- an answer identical to an expression the question writes (a math span, or what follows "What is",
  "Compute", "Simplify", ...) and not to the gold answer: `\\sqrt{245}` for "Simplify $\\sqrt{245}$";
- against a numeric gold, when the question has a calculation of its own (numbers joined by an operator
  or operator word, "59 * 100", "59 times 100", "the product of 59 and 100", "2^{10}", "gcd(12, 18)",
  "\\sqrt{16}", "12 squared"; see question_operands): the answer must be a plain number, a fraction in lowest
  terms, or another directly read form (mixed number, power of ten, scientific notation with a mantissa
  from 1 to 10, root, unreduced fraction) that is not written with the question's operands (0 and 1
  count as the question's) and is not a trivial dressing (x^1, a whole number as a fraction); a power of
  another base rewrites a calculation without doing it (2^{10} for 32 * 32). Any other calculation, in
  any notation (`59 \\cdot 100`, `59 \\times 10^2`, `\\exp(\\ln 5900)`, `\\max(5900, 1)`, `|-5900|`,
  `-(-5900)`), is the question's calculation left undone and scores 0.0, while `5900`, `5,900`,
  `5.9 \\times 10^3` and the value-first `5900 = 59 \\times 100` count. A question without a calculation (a
  word problem: "Each of 3 baskets holds 4 eggs") has nothing to restate, and `3 \\cdot 4` answers it.
  Known limits: numbers written as words in the question ("fifty-nine times one hundred") are not read; a
  symbolic answer is caught only when it repeats the question's expression verbatim; the check reads the
  question's last MAX_QUESTION_CHARS characters.

Safety and time:
- Nothing is ever executed: values are computed with Fractions from digits, and math-verify parses LaTeX
  into sympy without `eval`; powers are computed only below about 1,200 digits.
- Every regular expression here runs in linear time on any input: no `\\s*` that can cross the lines a
  MULTILINE pattern starts from, no repetition that can match the same text two ways (the one pattern
  with nested alternatives, _SEPARATORS, only ever sees at most _MAX_GAP characters; the question's
  patterns only see windows of at most 200 characters), and the brace and math-delimiter pairing is one pass.
  Extracting the answer takes about 0.05-0.6 s of CPU per MB (tests/test_grading.py floods 1 MB of each
  kind: newlines, spaces, braces, `#`, digits, `$`, `\\frac{`, subscripts, ...).
- An extracted answer over MAX_ANSWER_CHARS is not an answer and scores 0.0 without being parsed.
- math-verify's parse and comparison run under its own timeouts (TIMEOUT_S each), and an answer it cannot
  check in time scores 0.0 (math-verify logs a warning).

Threads: math-verify's timeouts use `signal.alarm`, which works only on the main thread. Called from any
other thread, `grade` sends the math-verify step to a helper Python process (started on first use, then
reused) that runs the very same function on ITS main thread, so the grade is the same on every thread and
the timeouts still hold; a helper that overruns HARD_TIMEOUT_S anyway is killed and that answer scores 0.0
with a warning. Everything that reads the question is pure Python decided before that step, in the calling
thread, so the helper needs only the two answer strings.

Failures: a silent 0.0 never stands in for "could not grade". An empty gold answer raises ValueError; a
helper process that cannot be started or dies raises GradingError; a gold answer that math-verify cannot
parse at all is compared as text, with a warning (once per gold answer).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import selectors
import subprocess
import sys
import threading
import warnings
from fractions import Fraction

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MAX_ANSWER_CHARS = 300  # a longer "final answer" is not an answer; refuse it before parsing
MAX_QUESTION_CHARS = 20_000  # the restatement check reads the question's last 20,000 characters
TIMEOUT_S = 2  # per math-verify parse and per comparison (signal-based: main thread only)
HARD_TIMEOUT_S = 30.0  # off the main thread: kill the helper if one math-verify call overruns this
STARTUP_TIMEOUT_S = 120.0  # off the main thread: time allowed for the helper to import math-verify
MAX_HELPERS = max(2, os.cpu_count() or 2)  # helper processes at most, however many threads grade at once


class GradingError(RuntimeError):
    """The grader itself failed (not the model's answer): no grade could be given."""


# ---------------------------------------------------------------------------------------------------
# 0. Unicode operators and symbols, normalised before anything reads the text
# ---------------------------------------------------------------------------------------------------

_UNICODE = str.maketrans({
    "\u22c5": " \\cdot ", "\u00b7": " \\cdot ", "\u2219": " \\cdot ", "\u2022": " \\cdot ",  # ⋅ · ∙ •
    "\u2217": "*", "\u204e": "*",  # ∗ ⁎
    "\u00d7": " \\times ", "\u2715": " \\times ", "\u2a2f": " \\times ",  # × ✕ ⨯
    "\u00f7": " \\div ", "\u2236": ":",  # ÷ ∶
    "\u2212": "-", "\u2013": "-", "\u2012": "-",  # − – ‒
    "\uff0d": "-", "\u2010": "-", "\u2011": "-",  # － ‐ ‑
    "\uff0b": "+", "\u2044": "/", "\u2215": "/", "\uff1d": "=",  # ＋ ⁄ ∕ ＝
    "\u221a": "\\sqrt ", "\u03c0": "\\pi ", "\u221e": "\\infty ",  # √ π ∞
    "\u2264": " \\le ", "\u2265": " \\ge ", "\u2260": " \\ne ", "\u2248": " \\approx ",  # ≤ ≥ ≠ ≈
    "\u00b2": "^2", "\u00b3": "^3", "\u00b9": "^1", "\u00b0": "^\\circ ",  # ² ³ ¹ °
    "\u00bd": "\\frac{1}{2}", "\u00bc": "\\frac{1}{4}", "\u00be": "\\frac{3}{4}",  # ½ ¼ ¾
    "\u2153": "\\frac{1}{3}", "\u2154": "\\frac{2}{3}",  # ⅓ ⅔
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2007": " ", "\u2002": " ", "\u2003": " ",  # spaces
    "\u200b": "", "\ufeff": "",  # zero-width
})


def normalize_unicode(text: str) -> str:
    """Unicode operators and symbols as ASCII/LaTeX: `59 ⋅ 100` -> `59 \\cdot 100`, `−3` -> `-3`, `½` ->
    `\\frac{1}{2}`, `x²` -> `x^2`. Done first, to the response, the gold answer and the question alike."""
    return text.translate(_UNICODE)


# ---------------------------------------------------------------------------------------------------
# 1. Extraction. Every pattern below is linear: fixed literals, one bounded or single-class repetition,
#    and nothing that rescans text a previous attempt already scanned.
# ---------------------------------------------------------------------------------------------------

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")  # `\s*` only after the literal command: linear
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (`\{`, `\\`) or a brace
# Text allowed between two boxes of one answer. Only gaps of at most _MAX_GAP characters are tried, so
# even backtracking inside this pattern is bounded.
_MAX_GAP = 120
_SEPARATORS = re.compile(
    r"(?:\s|[$,;&]"  # spaces, line breaks, math delimiters, commas, semicolons, alignment
    r"|\\[,;:! ]|\\\\|\\\(|\\\)|\\\[|\\\]|\\q?quad(?![A-Za-z])"  # LaTeX spacing, line breaks, delimiters
    r"|\b(?:and|or)\b"  # words joining the answers
    r"|\b(?!(?:and|or)\b)[A-Za-z]{1,12}\s+(?:and|or)\b"  # a unit, then "and": `\boxed{1} papers and \boxed{2}`
    # the same inside \text{...}, with a part label: `\text{ and }`, `\text{ for part (a) and }`
    r"|\\(?:text|textrm|textnormal|mbox)\{\s*(?:for\s+)?(?:part\s*)?(?:\(\w\)\s*)?(?:and|or|,)?\s*\}"
    r"|(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w{1,8}\}?)?\s*&?=(?!=)"  # a label: `x =`, `x_1 &=`, `\theta =`
    r")*"
)
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_GSM8K = re.compile(r"^[ \t]*####[ \t]*([^\n]*)", re.MULTILINE)  # `[ \t]`, not `\s`: stays on its line
# 12, -3.5, 1,234,567, .5, and a decimal comma where a comma cannot group thousands: 2,74
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+,\d{1,2}(?![\d,])|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER = re.compile(rf"(?:{_NUM})(?: ?/ ?(?:{_NUM}))?")  # a number, or a fraction 2/3 kept whole
# "18 dollars", "12 eggs per day": a number then plain words (a unit; math-verify knows only some units).
_QUANTITY = re.compile(rf"({_NUM})\s+[A-Za-z]{{2,}}(?:[\s,'-]+[A-Za-z]+)*\.?")
# Math delimiters for the last-expression fallback: `\$` is an escaped dollar (currency), not math.
_MATH_DELIM = re.compile(r"\\\$|\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_CLOSER = {"$$": "$$", "\\(": "\\)", "\\[": "\\]"}
# LaTeX whose value is read as a whole: `\frac{1}{9}` is one answer, not the number 9.
_LATEX_VALUE = re.compile(r"\\(?:[dtc]?frac|sqrt)(?![A-Za-z])")
_COMMAND_NAME = re.compile(r"\\[A-Za-z]+")
# Groups of text inside math: units, labels, words (`\text{ cm}`, `\mathrm{E}`).
_TEXT_GROUP = re.compile(r"\\(?:text|textrm|textbf|textit|textnormal|mathrm|mathbf|mathit|mbox|operatorname)"
                         r"\s*\{([^{}]*)\}")
_ENVIRONMENT = re.compile(r"\\(?:begin|end)\s*\{[A-Za-z*]*\}")  # \begin{pmatrix}: no words
_WORD = re.compile(r"[A-Za-z]{2,}")
_LETTER = re.compile(r"[A-Za-z]")
_MATHY = re.compile(r"[\d\\]")  # a digit or a LaTeX command


def _is_prose_word(word: str) -> bool:
    return word.lower() in _PROSE_WORDS or (len(word) > 2 and word.lower() not in _MATH_WORDS)


def _words(s: str) -> list[str]:
    """The words of `s` outside LaTeX commands, environments and `\\text{}` groups."""
    return _WORD.findall(_COMMAND_NAME.sub(" ", _TEXT_GROUP.sub(" ", _ENVIRONMENT.sub(" ", s))))
# Words that may stand in a bare math answer without making it prose.
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt pi mod gcd lcm max min "
    "abs det inf oo infty cis deg rad".split())
# Short words that are prose, not a product of variables (`ab`, `xy` are variables).
_PROSE_WORDS = frozenset("is so or an it be we to of at on by as if no do he my me us am the and are".split())


def _pair_braces(text: str, start: int) -> dict[int, int]:
    """{position of `{`: position of its `}`} for the braces from `start` on, in one pass (escaped braces
    `\\{`, `\\}` are characters, not groups)."""
    close_of, stack = {}, []
    for m in _BRACE_TOKEN.finditer(text, start):
        token = m.group()
        if token == "{":
            stack.append(m.start())
        elif token == "}" and stack:
            close_of[stack.pop()] = m.start()
    return close_of


def _boxes(text: str) -> list[tuple[int, int, int]]:
    """Every balanced box in order of position, as (start of `\\boxed`, start of content, end of content).

    One pass over the braces from the first box on pairs each `{` with its `}` (escaped `\\{`, `\\}` are
    characters, not groups), so even thousands of nested or unclosed boxes cost linear time. Braces
    before the first box cannot change how the boxes' own braces pair, so they are not scanned."""
    opens = [(m.start(), m.end() - 1) for m in _BOX_OPEN.finditer(text)]
    if not opens:
        return []
    box_braces = {brace for _, brace in opens}
    unclosed, last_brace = len(box_braces), opens[-1][1]
    close_of, stack = {}, []
    for m in _BRACE_TOKEN.finditer(text, opens[0][1]):
        token, at = m.group(), m.start()
        if token == "{":
            stack.append(at)
        elif token == "}" and stack:
            brace = stack.pop()
            close_of[brace] = at
            if brace in box_braces:
                unclosed -= 1
                if unclosed == 0 and at > last_brace:
                    break  # every box is closed: the rest of the text cannot change them
    return [(start, brace + 1, close_of[brace]) for start, brace in opens if brace in close_of]


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (or `\\fbox{...}`), nested braces included."""
    boxes = _boxes(text)
    if not boxes:
        return None  # no box, or only unbalanced ones
    _, begin, end = boxes[-1]
    return text[begin:end].strip()


def boxed_answer(text: str) -> str | None:
    """The boxed final answer: the last box, joined by the boxes just before it that only separators
    divide from it ("\\boxed{-2} and \\boxed{1}" -> "-2, 1"). Repeated identical boxes count once."""
    boxes = _boxes(text)
    if not boxes:
        return None
    start, begin, end = boxes[-1]
    parts, length = [text[begin:end].strip()], end - begin
    for prev_start, prev_begin, prev_end in reversed(boxes[:-1]):
        gap_begin = prev_end + 1  # just after the previous box's closing brace
        if gap_begin > start or start - gap_begin > _MAX_GAP:  # a box enclosing this one, or real text
            break
        if not _SEPARATORS.fullmatch(text, gap_begin, start):
            break  # reasoning between the boxes: the earlier box was superseded
        parts.append(text[prev_begin:prev_end].strip())
        length += prev_end - prev_begin
        start = prev_start
        if length > MAX_ANSWER_CHARS:
            break  # already too long to be an answer; no need to walk further back
    parts = list(dict.fromkeys(p for p in reversed(parts) if p))  # text order, duplicates once
    return ", ".join(parts)


def _answer_phrase(text: str, after: int = 0) -> str | None:
    """The rest of the sentence after the last "answer is" ("The answer is: $\\frac{2}{3}$." -> ...), if
    that "answer is" starts at `after` or later."""
    last = None
    for last in _ANSWER_IS.finditer(text, after):
        pass
    if last is None:
        return None
    rest = text[last.end():].lstrip(": \t\r\n")  # "answer is:\n\n42" still reaches 42
    line_end = rest.find("\n")
    phrase = rest if line_end < 0 else rest[:line_end]
    # The sentence ends at a period followed by a space or ending the line; a period inside a number
    # (3.5) does not end it.
    end = _SENTENCE_END.search(phrase)
    phrase = _unwrap(phrase if end is None else phrase[:end.start()])
    quantity = _QUANTITY.fullmatch(phrase)
    return quantity.group(1) if quantity else phrase


def _unwrap(s: str) -> str:
    """Drop the math delimiters, quotes and Markdown emphasis around an answer: `$x$`, `\\(x\\)`, `**x**`,
    `"x"`."""
    s = s.strip().strip("*").strip()
    for quote in ('\\"', '"', "`"):
        if len(s) > 2 * len(quote) and s.startswith(quote) and s.endswith(quote):
            s = s[len(quote):-len(quote)].strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)]
    return s.strip().strip("$").strip()


def _is_prose(content: str) -> bool:
    """True when a `$...$` candidate is text between two prices ("$5 for the pears and $"), not math: it
    starts with a number and has a word in it (outside `\\text{}`), or it crosses a blank line."""
    if "\n\n" in content:
        return True
    stripped = content.lstrip()
    if not stripped[:1].isdigit() or not _LETTER.search(content):
        return False
    return any(_is_prose_word(w) for w in _words(content))


def _math_spans(text: str) -> list[tuple[int, str]]:
    """(end, content) of every closed math span: `$...$`, `$$...$$`, `\\(...\\)` or `\\[...\\]`.

    One pass over the delimiters; spaces inside the delimiters are allowed (`$ \\frac{1}{3} $`). A single
    `$` just before a digit is a price, never a closing one ("$5 and $10" are two prices), and a `$...$`
    that reads as text between two prices ("$5 for the pears and $") is not math either: its closing `$`
    opens the next span instead."""
    spans, open_delim, open_end = [], None, 0
    for m in _MATH_DELIM.finditer(text):
        d, a, b = m.group(), m.start(), m.end()
        if d == "\\$":
            continue  # an escaped dollar sign
        if open_delim is None:
            if d in ("$", "$$", "\\(", "\\["):
                open_delim, open_end = d, b
        elif open_delim == "$":
            if d != "$":
                continue
            if (b < len(text) and text[b].isdigit()) or _is_prose(text[open_end:a]):
                open_end = b  # the first dollar was a price; this one may open math
            else:
                spans.append((b, text[open_end:a]))
                open_delim = None
        elif d == _CLOSER[open_delim]:
            spans.append((b, text[open_end:a]))
            open_delim = None
    return spans


def _last_math_span(text: str) -> tuple[int, str] | None:
    """(end, content) of the last closed math span (see _math_spans)."""
    spans = _math_spans(text)
    return spans[-1] if spans else None


def _standalone_number(text: str, m: re.Match, exponents: bool = False) -> tuple[int, int, str] | None:
    """(start, end, text) of a number match that stands on its own, or None for a digit inside a word or
    an index: `B2`, `x_2`, `H2O`, `CO2`, the `2` of `x^2` (unless `exponents`), the base of `2^{10}`. A
    minus glued to what precedes it ("5-2") is subtraction, not a sign. A number followed by letters
    stays a number: "5cm", "2nd" (the ordinal's value)."""
    s, a, e = m.group(), m.start(), m.end()
    if s.startswith("-") and a > 0 and (text[a - 1].isalnum() or text[a - 1] in ")}]"):
        s, a = s[1:], a + 1
    prev = text[a - 1] if a > 0 else ""
    if prev and ((prev.isascii() and prev.isalnum()) or prev in "_\\." or (prev in "^{" and not exponents)):
        return None
    if e < len(text) and text[e] in "^_" and not exponents:
        return None
    return a, e, s


def _last_number(text: str) -> tuple[int, str] | None:
    """(end, number) of the last number that stands on its own (a fraction 2/3 kept whole, a percent sign
    kept)."""
    last = None
    for m in _NUMBER.finditer(text):
        found = _standalone_number(text, m)
        if found is not None:
            last = found
    if last is None:
        return None
    _, end, number = last
    for sign in ("%", "\\%"):  # "0.5%" keeps its percent sign
        if text.startswith(sign, end):
            return end + len(sign), number + sign
    return end, number


def _skip_argument(text: str, pos: int, close_of: dict[int, int]) -> int | None:
    """End of one LaTeX argument starting at `pos` (a `{...}` group, a command, or one character)."""
    for _ in range(4):  # `\frac {1}{2}`: a few spaces at most
        if pos < len(text) and text[pos] == " ":
            pos += 1
    if pos >= len(text):
        return None
    if text[pos] == "{":
        close = close_of.get(pos)
        return None if close is None else close + 1
    if text[pos] == "\\":
        command = _COMMAND_NAME.match(text, pos)
        return None if command is None else command.end()
    return pos + 1 if text[pos].isalnum() else None


def _last_bare_latex(text: str) -> tuple[int, str] | None:
    """(end, expression) of the last `\\frac{..}{..}` / `\\sqrt{..}` outside math delimiters, whole, with a
    sign or whole part written directly before it (`-\\frac{1}{2}`, `3\\frac{1}{2}`, `2\\sqrt{2}`).
    Linear: the braces are paired in one pass, and a command nested in an earlier one is skipped."""
    commands = list(_LATEX_VALUE.finditer(text))
    if not commands:
        return None
    close_of = _pair_braces(text, commands[0].start())
    covered, found = -1, None
    for m in commands:
        if m.start() < covered:
            continue  # inside the previous command's arguments
        pos = m.end()
        if m.group() == "\\sqrt":
            if pos < len(text) and text[pos] == "[":  # \sqrt[3]{x}
                close = text.find("]", pos, pos + 32)
                if close < 0:
                    continue
                pos = close + 1
            end = _skip_argument(text, pos, close_of)
        else:
            first = _skip_argument(text, pos, close_of)
            end = None if first is None else _skip_argument(text, first, close_of)
        if end is not None:
            covered, found = end, (m.start(), end)
    if found is None:
        return None
    start, end = found
    k = start
    while k > 0 and start - k < 24 and (text[k - 1].isdigit() or text[k - 1] == "."):
        k -= 1
    if k > 0 and text[k - 1] == "-":
        k -= 1
    return end, text[k:end]


def _bare_answer(text: str) -> str | None:
    """The whole response when it is itself an answer: one short line of math with no prose in it
    ("\\frac{1}{2}", "x^2 + 2x + 1", "3+2", "y = 2x + 1", "-15", "[$\\sqrt{4}$]"); "5 cm" -> "5"."""
    s = text.strip()
    if not s or len(s) > MAX_ANSWER_CHARS or "\n" in s:
        return None
    if s.startswith("[") and s.endswith("]") and s.count("[") == 1 and s.count("]") == 1 and "," not in s:
        s = s[1:-1]  # "[90]": one value in brackets
    s = _unwrap(s).rstrip(".").strip()
    if not s:
        return None
    quantity = _QUANTITY.fullmatch(s)
    if quantity:
        return quantity.group(1)
    if "$" in s or any(_is_prose_word(w) for w in _words(s)):
        return None
    return s


def _last_expression(text: str) -> str | None:
    """The whole response if it is one line of math; otherwise whichever ends last of the last math span,
    the last bare `\\frac`/`\\sqrt`, and the last number that stands on its own; otherwise a response of a
    single word ("odd"). A span too long to be an answer (a displayed derivation) is passed over."""
    bare = _bare_answer(text)
    if bare is not None:
        return bare
    candidates = []
    span = _last_math_span(text)
    if span is not None and span[1].strip() and len(span[1].strip()) <= MAX_ANSWER_CHARS:
        candidates.append((span[0], _unwrap(span[1])))
    for found in (_last_bare_latex(text), _last_number(text)):
        if found is not None:
            candidates.append(found)
    if candidates:
        return max(candidates, key=lambda c: c[0])[1] or None
    word = text.strip().rstrip(".")
    return word if word and len(word) <= 40 and not any(c.isspace() for c in word) else None


def extract_answer(response: str) -> str | None:
    """The model's final answer as a string, or None when the response has none (order: boxes, unless an
    "answer is" follows the last one -> "answer is" -> `####` line -> the whole response if it is math ->
    the last number or expression; see the module docstring)."""
    boxes = _boxes(response)
    if boxes:
        # "... \\boxed{255} ... The final answer is $10,455$.": a statement after the last box supersedes it
        later = _answer_phrase(response, boxes[-1][2])
        if later and _MATHY.search(later):  # ("... the answer is correct." keeps the box)
            return later
        return boxed_answer(response)
    phrase = _answer_phrase(response)
    if phrase:
        return phrase
    gsm = _GSM8K.findall(response)
    if gsm and gsm[-1].strip():
        return gsm[-1].strip()
    return _last_expression(response)


_ANSWER_PREFIX = re.compile(r"(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*:?\s*", re.IGNORECASE)


def gold_answer(gold: str) -> str:
    """The final answer inside a gold string: its box ("... \\boxed{24}" -> "24"), the rest after "answer
    is", or the gold without math delimiters ("$10/9$" -> "10/9")."""
    gold = normalize_unicode(str(gold)).strip()
    boxes = _boxes(gold)
    gaps = [gold[left[2] + 1:right[0]] for left, right in zip(boxes, boxes[1:])]
    if gaps and not any(c.isalnum() for gap in gaps for c in gap):
        # several boxes with nothing but symbols between them: all of them are the gold answer
        return ", ".join(dict.fromkeys(gold[begin:end].strip() for _, begin, end in boxes))
    boxed = boxed_answer(gold)
    if boxed:
        return boxed
    phrase = _ANSWER_PREFIX.match(gold)
    if phrase:
        gold = gold[phrase.end():]
    return _unwrap(gold)



# ---------------------------------------------------------------------------------------------------
# 2. Equivalence
# ---------------------------------------------------------------------------------------------------

# Decorations that do not change a number: units and words in \text{...}, degrees, percent and currency
# signs, thin spaces and `{,}` between digit groups, \left / \right, \displaystyle.
_DECORATION = re.compile(
    r"\\(?:text|textrm|textnormal|mathrm|mbox|textbf|operatorname)\s*\{[^{}]*\}(?:\^\{?\d+\}?)?"
    r"|\^\s*\{?\s*\\circ\s*\}?"
    r"|\\?%|\\?\$|\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle"
)
_DIGIT_GROUPS = re.compile(r"\{,\}|\\[,!;: ]")
_INT = r"\d+"
_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"  # 12, 3.5, 1,234, .5
_ARG = rf"(?:\{{\s*(-?{_INT})\s*\}}|(\d))"  # a LaTeX argument holding an integer: {12} or one digit
_FORMS = {
    # 1 000 too, and a decimal comma where the comma cannot group thousands: 1,22 0,111 1000,99
    "plain": re.compile(rf"({_DEC}|\d{{1,3}}(?: \d{{3}})+(?:\.\d+)?|\d+,\d{{1,2}}|0,\d+|\d{{4,}},\d+)"),
    "fraction": re.compile(rf"\(?\s*({_INT})\s*\)?\s*/\s*\(?\s*({_INT})\s*\)?|\\frac\s*{_ARG}\s*{_ARG}"),
    "mixed": re.compile(rf"({_INT})\s+({_INT})\s*/\s*({_INT})|({_INT})\s*\\frac\s*{_ARG}\s*{_ARG}"),
    "scientific": re.compile(rf"({_DEC})\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*(?:\{{\s*([-+]?\d+)\s*\}}|(\d))"
                             rf"|({_DEC})[eE]([-+]?\d+)"),
    "power": re.compile(rf"\(?\s*({_INT})\s*\)?\s*\^\s*(?:\{{\s*([-+]?\d+)\s*\}}|(\d))"),
    "root": re.compile(rf"\\sqrt\s*{_ARG}"),
    "repeating": re.compile(r"(\d*)\.(\d*)\\overline\s*\{\s*(\d{1,20})\s*\}"),  # 0.1\overline{6}
}


_THOUSANDS = re.compile(r"[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # 1,234 (0,111 is a decimal comma)


class _Form:
    """A number written in a form whose value a human reads directly. `parts` are the numbers it is
    written with (the restatement check compares them with the question's operands)."""

    def __init__(self, kind: str, value: Fraction, parts: tuple = (), decimal: bool = False):
        self.kind, self.value, self.parts, self.decimal = kind, value, parts, decimal
        self.percent = False  # written with a percent sign: 25% is 25, or 0.25


def _strip_decoration(s: str) -> str:
    s = _DIGIT_GROUPS.sub("", s.strip()).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\cfrac", "\\frac")
    whole_text = _TEXT_GROUP.fullmatch(s)
    if whole_text:  # "\text{42}": the whole answer written as text
        s = whole_text.group(1)
    quantity = _QUANTITY.fullmatch(s.strip())
    if quantity:  # "18 dollars"
        s = quantity.group(1)
    return _DECORATION.sub(" ", s).strip()


def _direct_form(s: str) -> _Form | None:
    form = _direct_form_of(s)
    if form is not None and "%" in s:
        form.percent = True
    return form


def _direct_form_of(s: str) -> _Form | None:
    """The value of `s` when it is a plain number or a form a human reads directly: a fraction (a/b,
    (a)/(b), \\frac{a}{b}), a mixed number (3 1/2, 3\\frac{1}{2}), scientific notation (2.5 \\times 10^{3},
    2.5e3), an integer power (10^3, 2^{10}, 2^{-1}), the root of a perfect square (\\sqrt{16}) or a repeating
    decimal (0.\\overline{3}); each with a sign. None for anything else (a sum, a product, a function, a
    variable)."""
    s = _strip_decoration(s)
    if not s:
        return None
    while s.startswith("(") and s.endswith(")") and s.count("(") == 1:
        s = s[1:-1].strip()  # "(-3)"
    sign = 1
    if s[:1] in "+-":
        sign, s = (-1 if s[0] == "-" else 1), s[1:].strip()
        while s.startswith("(") and s.endswith(")") and s.count("(") == 1:
            s = s[1:-1].strip()  # "-(3/4)"
    if len(s) > 60:
        return None
    for kind, pattern in _FORMS.items():
        m = pattern.fullmatch(s)
        if m:
            break
    else:
        return None
    g = [x for x in m.groups() if x is not None]
    if kind == "plain":
        number = g[0].replace(" ", "")
        if "," in number and not _THOUSANDS.fullmatch(number):
            number = number.replace(",", ".")  # a decimal comma
        return _Form(kind, sign * Fraction(number.replace(",", "")), (), "." in number)
    if kind == "fraction":
        a, b = int(g[0]), int(g[1])
        return None if b == 0 else _Form(kind, sign * Fraction(a, b), (a, b))
    if kind == "mixed":
        whole, a, b = (int(x) for x in g)
        if b == 0 or a >= b:
            return None  # 3 5/2 is not a mixed number
        return _Form(kind, sign * (whole + Fraction(a, b)), (whole, a, b))
    if kind == "scientific":
        mantissa, exponent = g[0], int(g[1])
        if abs(exponent) > 400:
            return None
        return _Form(kind, sign * Fraction(mantissa.replace(",", "")) * Fraction(10) ** exponent,
                     (Fraction(mantissa.replace(",", "")), exponent), True)
    if kind == "power":
        base, exponent = int(g[0]), int(g[1])
        if base == 0 and exponent < 0 or abs(exponent) > 4000 or len(g[0]) * abs(exponent) > 1200:
            return None  # too large to be an answer anyone reads
        return _Form(kind, sign * Fraction(base) ** exponent, (base, exponent))
    if kind == "repeating":
        whole, fixed, cycle = m.group(1) or "0", m.group(2), m.group(3)
        value = int(whole) + Fraction(int(fixed or "0"), 10 ** len(fixed))
        value += Fraction(int(cycle), 10 ** len(fixed) * (10 ** len(cycle) - 1))
        return _Form(kind, sign * value, (int(cycle),))
    n = int(g[0])  # root
    if n < 0:
        return None
    r = math.isqrt(n)
    return _Form(kind, Fraction(sign * r), (n,)) if r * r == n else None


def _values_match(pred: _Form, gold: _Form) -> bool:
    """The same value; a percentage matches both its number and its fraction (25% is 25 and 0.25)."""
    if _same_value(pred, gold):
        return True
    if pred.percent != gold.percent:
        percent, other = (pred, gold) if pred.percent else (gold, pred)
        return _same_value(_Form(percent.kind, percent.value / 100, percent.parts, percent.decimal), other)
    return False


def _same_value(pred: _Form, gold: _Form) -> bool:
    """Exact equality, except that a decimal (0.333333) equals a value it rounds (1/3) to a relative
    1e-6. An integer gold answer written without a decimal point needs exactly that integer."""
    if pred.value == gold.value:
        return True
    if not (pred.decimal or gold.decimal):
        return False
    if gold.value.denominator == 1 and not gold.decimal:
        return False
    return abs(pred.value - gold.value) <= Fraction(1, 10**6) * max(abs(pred.value), abs(gold.value))


def _split_top(s: str, sep: str) -> list[str]:
    """`s` split at `sep` outside brackets and braces (an `=` in `\\le`, `<=`, `==` is no separator)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and s.startswith(sep, i):
            if sep != "=" or (s[i - 1:i] not in ("<", ">", "!", "=", ":") and s[i + 1:i + 2] != "="):
                parts.append(s[start:i])
                start = i + len(sep)
                i = start
                continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


_CONSTANT = re.compile(r"[\d]|\\pi|\\sqrt|\\frac")
_LONE_SYMBOL = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?(?:\([A-Za-z]\))?|\\[A-Za-z]+")


def _drop_approximation(s: str) -> str:
    """`\\frac{\\sqrt{3}}{3} \\approx 0.577` is the exact value, `x \\approx 3.01` the approximation."""
    parts = _split_top(s, "\\approx")
    if len(parts) == 1:
        return s
    exact = parts[0]
    last_side = _split_top(exact, "=")[-1]
    return exact if _CONSTANT.search(last_side) else parts[-1]


def _value_side(pred: str) -> str | None:
    """The side of an equation that is the answer to a numeric gold: the last side that is a plain
    number or a fraction in lowest terms ("3 \\times 4 = 12", value-first "1024 = 2^{10}", "x = 5"), else
    the last side in any other direct form, else the last side. None when two sides are plain numbers
    that differ ("5901 = 5900" states nothing true)."""
    sides = _split_top(pred, "=")
    if len(sides) == 1:
        return pred
    best, best_rank, plain = sides[-1], -1, set()
    for side in sides:
        form = _direct_form(side) if side else None
        rank = 0 if form is None else 2 if form.kind == "plain" or _lowest_terms(form) else 1
        if form is not None and form.kind == "plain":
            plain.add(form.value)
        if rank >= best_rank:
            best, best_rank = side, rank
    return best if len(plain) <= 1 else None


def _lowest_terms(form: _Form) -> bool:
    return form.kind == "fraction" and form.value.denominator != 1 and math.gcd(*form.parts) == 1


# The question's own calculation: numbers joined by an operator, or the operands of a function or root.
_Q_NUMBER = re.compile(_DEC)
_Q_JOIN = re.compile(
    r"[\s(){}\[\]|]*(?:[-+*/^:]|\\times|\\cdot|\\div|\\ast|\\bmod|\\pmod|\\%|%\s*of|mod|modulo|plus|minus|times"
    r"|multiplied\s+by|divided\s+by|over|to\s+the\s+power\s+of|raised\s+to(?:\s+the\s+power\s+of)?"
    r"|\}\s*\{)[\s(){}\[\]|-]*", re.IGNORECASE)
_Q_LIST = re.compile(r"\s*(?:,|and)\s*", re.IGNORECASE)  # "gcd(12, 18)", "the product of 59 and 100"
_Q_LIST_OPENER = re.compile(
    r"(?:sum|product|difference|quotient|ratio|gcd|lcm|greatest\s+common\s+(?:divisor|factor)|least\s+common"
    r"\s+multiple|max(?:imum)?|min(?:imum)?|between|binom|choose|C)(?:\s+of)?\W{0,12}$", re.IGNORECASE)
_Q_UNARY_BEFORE = re.compile(
    r"(?:\\sqrt|sqrt|square\s+root\s+of|cube\s+root\s+of|\\frac|\\log|log|\\ln|ln|\\exp|exp|\\sin|sin|\\cos|cos"
    r"|\\tan|tan|\\lfloor|floor|\\lceil|ceil|abs|\\binom|factorial\s+of|\|)[\s_{}\[\]()\d]{0,6}$",
    re.IGNORECASE)
_Q_UNARY_AFTER = re.compile(r"\s*(?:!|squared|cubed|factorial|\^)", re.IGNORECASE)


def question_operands(question: str) -> set[Fraction]:
    """The numbers of the question's own calculation: those joined to another number by an operator
    ("59 * 100", "59 times 100", "2^{10}", "\\frac{3}{4}", "17 mod 5"), listed in a function ("gcd(12, 18)",
    "the product of 59 and 100") or under one ("\\sqrt{16}", "log_2(8)", "5!", "12 squared"). Empty for a
    question without a calculation ("Each of 3 baskets holds 4 eggs; how many eggs?")."""
    q = normalize_unicode(question[-MAX_QUESTION_CHARS:])
    numbers = []
    for m in _Q_NUMBER.finditer(q):
        found = _standalone_number(q, m, exponents=True)
        if found is not None and len(found[2]) <= 40:
            numbers.append(found)
    operands = set()
    for i, (a, e, s) in enumerate(numbers):
        value = abs(Fraction(s.replace(",", "")))
        before = q[max(0, a - 40):a]
        if _Q_UNARY_BEFORE.search(before) or _Q_UNARY_AFTER.match(q, e):
            operands.add(value)
        if i + 1 < len(numbers):
            glue = q[e:numbers[i + 1][0]]
            if len(glue) <= 40 and (_Q_JOIN.fullmatch(glue) or (
                    _Q_LIST.fullmatch(glue) and _Q_LIST_OPENER.search(q[max(0, a - 60):a]))):
                operands.add(value)
                operands.add(abs(Fraction(numbers[i + 1][2].replace(",", ""))))
    return operands


_Q_ASKS = re.compile(r"(?:what\s+is|what's|compute|calculate|evaluate|simplify|find|determine|problem:)\s*"
                     r"(?:the\s+value\s+of\s+)?", re.IGNORECASE)
_Q_SEGMENT_END = re.compile(r"\?|\n|\.(?=\s|$)")


def question_expressions(question: str) -> set[str]:
    """The expressions the question itself writes (as _plain_text): its math spans and what follows
    "What is" / "Compute" / "Simplify" ... up to the end of the sentence, each whole and each side of an
    equation in it: "Simplify $\\sqrt{245}$." -> {"\\sqrt{245}"}; "What is 59 * 100?" -> {"59*100"}."""
    q = normalize_unicode(question[-MAX_QUESTION_CHARS:])
    texts, covered = {content for _, content in _math_spans(q)}, 0
    for m in _Q_ASKS.finditer(q):
        if m.start() < covered:
            continue  # inside the previous segment: every character is read once
        end = _Q_SEGMENT_END.search(q, m.end(), m.end() + 200)
        covered = end.start() if end else m.end() + 200
        texts.add(q[m.end():covered])
    found = set()
    for text in texts:
        for part in [text, *_split_top(text, "=")]:
            part = _plain_text(part).strip(".,:;")
            if part:
                found.add(part)
    return found


def restates_question(answer: str, question: str) -> bool:
    """True when `answer` (to a numeric gold) only restates the question's calculation instead of giving
    its value. With a question that has a calculation of its own, the answer must be a plain number, a
    fraction in lowest terms, or another form a human reads directly (mixed number, power of ten,
    scientific notation with a mantissa from 1 to 10, root of a perfect square, unreduced fraction that is
    not a whole number) that is not written with the question's operands: "59 \\cdot 100",
    "59 \\times 10^2", "\\max(5900, 1)", "|-5900|", "\\frac{590000}{100}" restate "What is 59 * 100?";
    "5900", "5.9 \\times 10^3" do not. A power of another base than 10 rewrites a calculation without
    doing it (4^5 for 2^10, 2^{10} for 32 * 32), so it counts only where the question has no calculation."""
    operands = question_operands(question)
    if not operands:
        return False  # nothing to restate: "3 \\cdot 4" answers "how many eggs" fine
    form = _direct_form(answer)
    if form is None:
        return True  # a calculation, in any notation, where the question asks for one's value
    if form.kind == "plain" or _lowest_terms(form):
        return False
    if form.kind == "fraction" and form.value.denominator == 1:
        return True  # a whole number as a fraction: the division not done
    known = operands | {Fraction(0), Fraction(1)}
    if form.kind == "power" and (form.parts[0] != 10 or form.parts[1] in (0, 1)):
        return True  # 4^5 for 2^10, 2^{10} for 32 * 32: rewritten, not evaluated; 5900^1: dressed up
    if form.kind == "scientific":
        mantissa, exponent = form.parts
        if exponent == 0 or not 1 <= abs(mantissa) < 10:
            return True  # 5900 \times 10^0, 0.59 \times 10^4: not the value's own scientific notation
        power = Fraction(10) ** exponent
        written_with_operands = abs(power) in known or {Fraction(10), Fraction(abs(exponent))} <= known
        return abs(mantissa) in known and written_with_operands
    return all(abs(Fraction(p)) in known for p in form.parts)


_MATRIX = re.compile(r"\\(begin|end)\s*\{(?:bmatrix|Bmatrix|matrix|smallmatrix)\}")


def _same_matrices(s: str) -> str:
    """`\\begin{bmatrix}` and the other bracket styles as `\\begin{pmatrix}` (not `vmatrix`: a determinant)."""
    return _MATRIX.sub(lambda m: f"\\{m.group(1)}{{pmatrix}}", s)


def _plain_text(s: str) -> str:
    """Text for an identity check: no spaces, delimiters, \\left/\\right, \\text{} wrappers or frac styles."""
    s = _TEXT_GROUP.sub(lambda m: m.group(1), s)
    s = re.sub(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[,!;: ]|\\displaystyle|\s|\$", "", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _lone_symbol_rhs(s: str) -> str | None:
    """The right-hand side of `y = ...` / `f(x) = ...` (a single symbol on the left), else None."""
    sides = _split_top(s, "=")
    if len(sides) == 2 and _LONE_SYMBOL.fullmatch(sides[0]) and sides[1]:
        return sides[1]
    return None


def _parse(s: str):
    return parse(f"${s}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=TIMEOUT_S)


def _equivalent(pred: str, gold: str) -> float:
    """math-verify's verdict on two answer strings. Needs the main thread (signal-based timeouts)."""
    gold_parsed = _parse(gold)
    if not gold_parsed:  # nothing in the gold answer that math-verify recognises: compare as text
        warnings.warn(f"math-verify cannot parse the gold answer {gold!r}; it is compared as text")
        return float(pred.replace(" ", "") == gold.replace(" ", ""))
    pred_parsed = _parse(pred)
    if not pred_parsed:  # the model's answer is not math (or timed out): only identical text counts
        return float(pred.replace(" ", "") == gold.replace(" ", ""))
    # allow_set_relation_comp: "x \geq 5" equals "[5, \infty)" whichever of the two is the gold answer.
    return float(verify(gold_parsed, pred_parsed, timeout_seconds=TIMEOUT_S, allow_set_relation_comp=True))


def grade(response: str, gold: str, question: str | None = None) -> float:
    """1.0 if the final answer of `response` equals `gold` (the data loader's final answer), else 0.0.

    With `question` (the problem the response answers), an answer that only restates the question's
    calculation scores 0.0 (see restates_question); without it, any form of the right value counts."""
    gold = gold_answer(gold)
    if not gold:
        raise ValueError("grade() needs a non-empty gold answer")
    pred = extract_answer(normalize_unicode(str(response)))
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0  # no answer, or one too long to be an answer
    pred, gold = _same_matrices(_drop_approximation(pred)), _same_matrices(_drop_approximation(gold))
    if _plain_text(pred) == _plain_text(gold):
        return 1.0  # the gold answer itself
    if question is not None and _plain_text(pred) in question_expressions(question):
        return 0.0  # the question's own expression handed back: "\\sqrt{245}" for "Simplify $\\sqrt{245}$"
    gold_form = _direct_form(gold)
    if gold_form is not None:  # a numeric gold answer: decided here when the answer is a number too
        pred = _value_side(pred)
        if pred is None or (question is not None and restates_question(pred, question)):
            return 0.0
        if _plain_text(pred) == _plain_text(gold):
            return 1.0
        form = _direct_form(pred)
        if form is not None:
            return float(_values_match(form, gold_form))
    else:  # `y = 2x + 1` against `2x + 1`, either way round
        if "=" not in gold:
            pred = _lone_symbol_rhs(pred) or pred
        elif "=" not in pred:
            gold = _lone_symbol_rhs(gold) or gold
    if os.name != "posix" or threading.current_thread() is threading.main_thread():
        # Main thread: math-verify's signal timeouts work. (Off POSIX, math-verify times out with a
        # subprocess instead of signals, which works on any thread.)
        return _equivalent(pred, gold)
    return _HELPERS.equivalent(pred, gold)


# ---------------------------------------------------------------------------------------------------
# 3. Helper processes for threads other than the main one
# ---------------------------------------------------------------------------------------------------


class _Helper:
    """A child Python process running `_serve` (below): one JSON line in, [pred, gold]; one line out, the
    grade. It is this file run as a script, so it needs nothing but math-verify."""

    command = [sys.executable, "-u", os.path.abspath(__file__), "--serve"]

    def __init__(self):
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as e:
            raise GradingError(f"cannot start the grading helper process: {e}") from e
        # A selector (epoll on Linux) waits for the answer with a deadline; select.select would fail on
        # the file descriptor numbers above 1024 that a large training process reaches.
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        if self._read_line(STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise GradingError("the grading helper process did not start (is math-verify importable?)")

    def _read_line(self, timeout: float) -> str | None:
        """One line from the helper, or None if it has not answered within `timeout` seconds."""
        if not self.selector.select(timeout):
            return None
        return self.proc.stdout.readline().decode().strip()  # the helper writes whole lines at once

    def ask(self, pred: str, gold: str) -> float | None:
        """The helper's grade, or None if it overran HARD_TIMEOUT_S (it is then killed)."""
        try:
            self.proc.stdin.write((json.dumps([pred, gold]) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            self.kill()
            raise GradingError(f"the grading helper process has died: {e}") from e
        line = self._read_line(HARD_TIMEOUT_S)
        if line is None:
            self.kill()
            return None
        try:
            return float(json.loads(line))
        except (TypeError, ValueError):  # "" at end of file: the helper exited
            self.kill()
            raise GradingError(f"the grading helper process failed (exit code {self.proc.poll()})") from None

    def _close_pipes(self):
        """Close this process's ends of the pipes (a dead helper's input may not flush: that is fine)."""
        self.selector.close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def disown(self):
        """In a forked child: close this process's copies of the pipes; the helper is the parent's."""
        self._close_pipes()

    def close(self):
        """Ask the helper to stop: it exits when its input ends."""
        self._close_pipes()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _HelperPool:
    """Idle helpers, reused across threads; each call holds one helper, MAX_HELPERS at most at once."""

    def __init__(self):
        self.lock, self.slots, self.idle = threading.Lock(), threading.BoundedSemaphore(MAX_HELPERS), []

    def equivalent(self, pred: str, gold: str) -> float:
        with self.slots:
            with self.lock:
                helper = self.idle.pop() if self.idle else None
            if helper is not None and helper.proc.poll() is not None:  # it died while idle
                helper.kill()  # (only closes its pipes now)
                helper = None
            if helper is None:
                helper = _Helper()
            result = helper.ask(pred, gold)
            if result is None:
                warnings.warn(f"math-verify overran {HARD_TIMEOUT_S} s on the answer {pred[:60]!r}; "
                              "its helper process was killed and the answer scores 0.0")
                return 0.0
            with self.lock:
                self.idle.append(helper)
            return result

    def close(self):
        with self.lock:
            idle, self.idle = self.idle, []
        for helper in idle:
            helper.close()

    def forget(self):
        """In a forked child (a data loader worker, say): the helpers, and the lock's state, are the
        parent's. Drop them, so that the child starts its own and the parent's helpers still see their
        input end when the parent exits."""
        for helper in self.idle:
            helper.disown()
        self.__init__()


_HELPERS = _HelperPool()
atexit.register(_HELPERS.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPERS.forget)


def _serve():
    """The helper's loop: grade [pred, gold] lines on this process's main thread until input ends."""
    out = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything else printed goes to stderr
    os.dup2(2, 1)
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        pred, gold = json.loads(line)
        print(json.dumps(_equivalent(pred, gold)), file=out, flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
