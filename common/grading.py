"""Grade a model's math answer against a gold final answer: 1.0 if equivalent, else 0.0.

    grade("... so the answer is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}")  ->  1.0

Extraction: the model's final answer is the FIRST of these that the response has
  1. boxes: the last balanced `\\boxed{...}` / `\\fbox{...}` (nested braces handled). Boxes just before it
     that are separated from it only by separators (spaces, `$`, commas, semicolons, "and", "or",
     `\\quad`, `\\text{ and }`, line breaks, labels such as `x =`) belong to the same answer:
     `$x = \\boxed{-2}$ and $x = \\boxed{1}$` is the answer "-2, 1". A box followed by more reasoning and
     then another box is superseded: the last box wins.
  2. "answer is ...": the rest of the sentence after the last "answer is" (case-insensitive); a number
     followed only by words is that number ("The answer is 18 dollars." -> "18");
  3. GSM8K: the text after the last `####` that starts a line;
  4. the last number or expression: the last number (with a fraction `a/b` kept whole), unless a math
     span (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`) ends after it, in which case that span:
     "... is 2/3." -> "2/3", "... is $(7, 6)$." -> "(7, 6)", "so $x \\geq 5$." -> "x \\geq 5".

Equivalence: two plain numbers are compared directly (relative tolerance 1e-6); everything else goes to
math-verify (fractions, roots, LaTeX forms, sets, intervals, tuples, relations, units, percentages). An
equation such as "x = 5" or "3 \\times 4 = 12" counts by its right-hand side when the gold is not an
equation, and a relation such as "x \\geq 5" equals the interval "[5, \\infty)". Against a gold answer that
is a number, the model's answer must be a number too: "\\boxed{59 * 100}" is the question restated, not
5900, and scores 0.0 (math-verify alone would evaluate it; a policy learns to exploit that, see
_is_calculation).

Safety and time:
- Nothing is ever executed: math-verify parses LaTeX into sympy without `eval`.
- Every regular expression here runs in linear time on any input: no `\\s*` that can cross the lines a
  MULTILINE pattern starts from, no repetition that can match the same text two ways (the one pattern
  with nested alternatives, _SEPARATORS, only ever sees at most _MAX_GAP characters), and the brace and
  math-delimiter pairing is one pass. Extracting the answer takes about 0.1-0.3 s of CPU per MB
  (tests/test_grading.py floods 1 MB of each kind: newlines, spaces, braces, `#`, digits, `$`, ...).
- An extracted answer over MAX_ANSWER_CHARS is not an answer and scores 0.0 without being parsed.
- math-verify's parse and comparison run under its own timeouts (TIMEOUT_S each), and an answer it cannot
  check in time scores 0.0 (math-verify logs a warning).

Threads: math-verify's timeouts use `signal.alarm`, which works only on the main thread. Called from any
other thread, `grade` sends the math-verify step to a helper Python process (started on first use, then
reused) that runs the very same function on ITS main thread, so the grade is the same on every thread and
the timeouts still hold; a helper that overruns HARD_TIMEOUT_S anyway is killed and that answer scores 0.0
with a warning.

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

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MAX_ANSWER_CHARS = 300  # a longer "final answer" is not an answer; refuse it before parsing
TIMEOUT_S = 2  # per math-verify parse and per comparison (signal-based: main thread only)
HARD_TIMEOUT_S = 30.0  # off the main thread: kill the helper if one math-verify call overruns this
STARTUP_TIMEOUT_S = 120.0  # off the main thread: time allowed for the helper to import math-verify
MAX_HELPERS = max(2, os.cpu_count() or 2)  # helper processes at most, however many threads grade at once


class GradingError(RuntimeError):
    """The grader itself failed (not the model's answer): no grade could be given."""


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
    r"|\\(?:text|textrm|textnormal|mbox)\{\s*(?:and|or|,)?\s*\}"  # the same inside \text{...}
    r"|(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w{1,8}\}?)?\s*&?=(?!=)"  # a label: `x =`, `x_1 &=`, `\theta =`
    r")*"
)
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_GSM8K = re.compile(r"^[ \t]*####[ \t]*([^\n]*)", re.MULTILINE)  # `[ \t]`, not `\s`: stays on its line
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"  # 12, -3.5, 1,234,567, .5
_NUMBER = re.compile(rf"(?:{_NUM})(?: ?/ ?(?:{_NUM}))?")  # a number, or a fraction 2/3 kept whole
# "18 dollars", "12 eggs per day": a number then plain words (a unit; math-verify knows only some units).
_QUANTITY = re.compile(rf"({_NUM})\s+[A-Za-z]{{3,}}(?:[\s,'-]+[A-Za-z]+)*")
_PLAIN_NUMBER = re.compile(r"^\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*\$?$")
# Math delimiters for the last-expression fallback: `\$` is an escaped dollar (currency), not math.
_MATH_DELIM = re.compile(r"\\\$|\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_CLOSER = {"$$": "$$", "\\(": "\\)", "\\[": "\\]"}


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


def _answer_phrase(text: str) -> str | None:
    """The rest of the sentence after the last "answer is" ("The answer is: $\\frac{2}{3}$." -> ...)."""
    last = None
    for last in _ANSWER_IS.finditer(text):
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
    """Drop the math delimiters and Markdown emphasis around an answer: `$x$`, `\\(x\\)`, `**x**`."""
    s = s.strip().strip("*").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)]
    return s.strip().strip("$").strip()


def _last_math_span(text: str) -> tuple[int, str] | None:
    """(end, content) of the last closed math span: `$...$`, `$$...$$`, `\\(...\\)` or `\\[...\\]`.

    One pass over the delimiters. A single `$` follows Pandoc's rule so that prices are not math: it
    opens only before a non-space, and closes only after a non-space and not before a digit
    ("$5 and $10" is two prices; "$x = 5$" is math)."""
    last, open_delim, open_end = None, None, 0
    for m in _MATH_DELIM.finditer(text):
        d, a, b = m.group(), m.start(), m.end()
        if d == "\\$":
            continue  # an escaped dollar sign
        if open_delim is None:
            if d == "$" and (b == len(text) or text[b].isspace()):
                continue  # "$ " does not open math
            if d in ("$", "$$", "\\(", "\\["):
                open_delim, open_end = d, b
        elif open_delim == "$":
            if d == "$" and not text[a - 1].isspace() and not (b < len(text) and text[b].isdigit()):
                last, open_delim = (b, text[open_end:a]), None
            elif d == "$":  # "$5 and $10": the first dollar was a price; this one may open math
                if b < len(text) and not text[b].isspace():
                    open_end = b
        elif d == _CLOSER[open_delim]:
            last, open_delim = (b, text[open_end:a]), None
    return last


def _last_expression(text: str) -> str | None:
    """The last number in the text (a fraction 2/3 kept whole), or the last math span if one ends after
    it. A span too long to be an answer (a displayed derivation) gives way to the last number."""
    span = _last_math_span(text)
    after = 0 if span is None or len(span[1].strip()) > MAX_ANSWER_CHARS else span[0]
    numbers = _NUMBER.findall(text, after)
    if numbers:
        return numbers[-1]
    if after:
        return _unwrap(span[1]) or None
    return None


def extract_answer(response: str) -> str | None:
    """The model's final answer as a string, or None when the response has none (order: boxes ->
    "answer is" -> `####` line -> last number or expression; see the module docstring)."""
    boxed = boxed_answer(response)
    if boxed is not None:
        return boxed
    phrase = _answer_phrase(response)
    if phrase:
        return phrase
    gsm = _GSM8K.findall(response)
    if gsm and gsm[-1].strip():
        return gsm[-1].strip()
    return _last_expression(response)


# ---------------------------------------------------------------------------------------------------
# 2. Equivalence
# ---------------------------------------------------------------------------------------------------


def _as_number(s: str) -> float | None:
    m = _PLAIN_NUMBER.match(s.strip())
    return float(m.group(1).replace(",", "")) if m else None


# A numeric gold answer needs a number, not the calculation that leads to it. math-verify evaluates what
# it parses, so "59 * 100" equals 5900 to it, and a policy trained on the arithmetic task learns to box the
# question's own expression: measured, `ppo.py` (30 minutes, vLLM) answered "\boxed{59 * 100}" and
# "\boxed{5 * 9} 5 * 9 = 55" and scored 1.0 on every held-out problem; PRIME's jumps in the README's first
# side-by-side benchmark were the same. So when the gold answer is a number (12, -3.5, 1,234, 2/3,
# \frac{2}{3}), the model's answer, read after its last "=" as math-verify reads equations, must be one
# too: an arithmetic operation between numbers (+ - * / ^ \times \cdot \div, a root, a factorial)
# scores 0.0, and so does a fraction that is a whole number (590/10 is the division 590 / 10 not done;
# 2/4 against 1/2 still counts).
# Units, \text{...}, degrees, percent and currency signs are ignored; a x 10^n is a number.
_NUMERIC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_FRACTION = re.compile(r"^-?\s*(?:(\d+)\s*/\s*(\d+)|\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\})$")
_NUMERIC_GOLD = re.compile(rf"^\$?\s*-?\s*(?:{_NUMERIC})\s*\$?$")
_DECORATION = re.compile(
    r"\\(?:text|textrm|mathrm|mbox|textbf|operatorname)\s*\{[^{}]*\}(?:\^\{?\d+\}?)?"  # units: \text{cm}^2
    r"|\^\s*\{?\s*\\circ\s*\}?"  # degrees
    r"|\\[,!;: ]|\{,\}|\\?%|\\?\$|\\left|\\right"  # spacing, 1{,}000, percent, currency, \left( \right)
)
_SCIENTIFIC = re.compile(rf"^-?\s*(?:{_NUMERIC})\s*(?:\\times|\\cdot|\*|x|×)\s*10\s*\^\s*\{{?\s*-?\d+\s*\}}?$")
_OPERATION = re.compile(
    r"[\d}).]\s*(?:[-+*/^×÷·]|\\times|\\cdot|\\div|\\ast|\\pm|\\mp)\s*[-\d{(\\.]"  # 5 * 9, 2^{10}, (3)+(4)
    r"|\\sqrt|\\binom|\d\s*!"  # \sqrt{4}, \binom{5}{2}, 5!
)


def _is_numeric_gold(gold: str) -> bool:
    return bool(_NUMERIC_GOLD.match(gold.strip()) or _FRACTION.match(gold.strip()))


def _is_calculation(pred: str) -> bool:
    """True when `pred` (against a numeric gold answer) is an arithmetic expression rather than a number:
    "59 * 100", "2^{10}", "\\sqrt{16}", "590/10" and "\\frac{8}{4}" (fractions that are whole numbers).
    "3 \\times 4 = 12", "-7", "2/3", "\\frac{6}{4}", "1{,}000", "5 \\text{ cm}^2", "30^\\circ",
    "2.5 \\times 10^{3}" are not."""
    s = _DECORATION.sub(" ", re.split(r"=|\\approx", pred)[-1]).strip().strip("()").strip()
    fraction = _FRACTION.match(s)
    if fraction:
        a, b = (int(x) for x in fraction.groups() if x is not None)
        return b == 0 or a % b == 0
    if _SCIENTIFIC.match(s):
        return False
    return bool(_OPERATION.search(s))


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


def grade(response: str, gold: str) -> float:
    """1.0 if the final answer of `response` equals `gold` (the data loader's final answer), else 0.0."""
    gold = str(gold).strip()
    if not gold:
        raise ValueError("grade() needs a non-empty gold answer")
    pred = extract_answer(response)
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0  # no answer, or one too long to be an answer
    if _is_numeric_gold(gold) and _is_calculation(pred):
        return 0.0  # the calculation, not its result: see _is_calculation
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:  # the common case, decided without sympy
        return float(abs(a - b) <= 1e-6 * max(1.0, abs(b)))
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
