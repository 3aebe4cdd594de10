"""common.grading: answer extraction, equivalence, time on floods, and the same grade on any thread.

Every case below was worked out by hand (the expected grade is what a careful human grader gives).

| category (issue 16)                 | tests                                                       | result |
|-------------------------------------|-------------------------------------------------------------|--------|
| regression: GSM8K, boxed, last box  | 43 cases (REGRESSION)                                       | 43/43  |
| 1. several boxed answers            | 17 cases (MULTI_BOX) + test_boxes (7 checks)                | 24/24  |
| 2. linear time, floods of 1 MB      | 17 floods in one test: newlines, spaces, braces, `#`,       | 17/17  |
|                                     | digits, `$`, `\\(`, boxes, "answer is", fractions...;       |        |
|                                     | each graded right, all 17 together < 5 s of CPU (measured:  |        |
|                                     | about 1 s in all, 0.16 s at most for one MB)                |        |
| 3. the same grade on any thread     | all 113 graded cases on 2 worker threads + 4 tests: hostile  | 117/117|
|                                     | input stays bounded; a helper that cannot start or dies     |        |
|                                     | raises GradingError; one that hangs is killed and warns     |        |
| 4. unboxed answers                  | 24 cases (UNBOXED): 2/3, (7, 6), x >= 5, equations, prices, | 24/24  |
|                                     | "answer is 18 dollars"                                      |        |
| hostile input (towers, code, depth) | 7 cases                                                     | 7/7    |
| extraction order                    | test_extract_answer_priority (6 checks)                     | 6/6    |
| no silent 0.0                       | empty gold raises; an unparseable gold warns                | 2/2    |
| 5. a calculation is not a number    | 29 cases (CALCULATIONS): "\\boxed{59 * 100}" for 5900 (a    | 29/29  |
|                                     | reward hack ppo.py learned), 2^{10}, 590/10; numbers in     |        |
|                                     | any notation still count                                    |        |

130 pytest tests in all (`python -m pytest tests/test_grading.py -q`), all passing.
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import common.grading as grading
from common.grading import GradingError, boxed_answer, extract_answer, grade, last_boxed

REGRESSION = [
    # (response, gold, expected)
    # GSM8K style
    ("She has 5 + 3 = 8 apples.\n#### 8", "8", 1.0),
    ("Total is 1,234 dollars.\n#### 1,234", "1234", 1.0),
    ("#### 72", "72", 1.0),
    ("#### 71", "72", 0.0),
    ("The answer is 18.", "18", 1.0),
    ("So the answer is: 42", "42", 1.0),
    ("The answer is $1,000,000$.", "1000000", 1.0),
    ("We get 3 then 7", "7", 1.0),  # last number
    ("We get 7 then 3", "7", 0.0),
    ("The result is -12.", "-12", 1.0),
    ("It costs 2.50 each, 5.00 in total", "5", 1.0),
    ("It is 0.5", ".5", 1.0),
    # boxed answers
    ("\\boxed{8}", "8", 1.0),
    ("so \\boxed{-4}", "-4", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\tfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{18 \\text{ dollars}}", "18", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
    ("\\boxed{2^{1/2}}", "\\sqrt{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{3\\pi}", "3\\pi", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    # nested braces and several boxes with reasoning between them: the LAST box counts
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}", 1.0),
    ("first \\boxed{3} then \\boxed{5}", "5", 1.0),
    ("first \\boxed{5} then \\boxed{3}", "5", 0.0),
    ("\\boxed{3} and an unclosed \\boxed{5", "3", 1.0),  # unbalanced last box: the balanced one counts
    ("\\fbox{12}", "12", 1.0),
    # no answer at all
    ("I don't know.", "5", 0.0),
    ("", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
    # negative numbers
    ("\\boxed{-0.25}", "-\\frac{1}{4}", 1.0),
    ("The answer is -7", "7", 0.0),
]

# 1. Several boxes that only separators divide are one answer (a set: order is free).
MULTI_BOX = [
    ("$x = \\boxed{-2}$ and $x = \\boxed{1}$", "-2, 1", 1.0),  # the example
    ("$x = \\boxed{-2}$ and $x = \\boxed{1}$", "1, -2", 1.0),
    ("$x = \\boxed{-2}$ and $x = \\boxed{1}$", "-2", 0.0),  # half of the solutions is wrong
    ("\\boxed{1}, \\boxed{2}, and \\boxed{3}", "1, 2, 3", 1.0),
    ("\\boxed{2}\\quad\\boxed{3}", "2, 3", 1.0),
    ("$\\boxed{2}$; $\\boxed{3}$", "3, 2", 1.0),
    ("\\boxed{2} \\text{ or } \\boxed{3}", "2, 3", 1.0),
    ("$x_1 = \\boxed{\\frac{1}{2}}$, $x_2 = \\boxed{-3}$", "-3, \\frac{1}{2}", 1.0),
    ("\\boxed{x=2} \\text{and} \\boxed{x=3}", "2, 3", 1.0),
    ("\\boxed{(1, 2)}, \\boxed{(3, 4)}", "(1,2), (3,4)", 1.0),
    # more reasoning between two boxes: the last box wins
    ("So \\boxed{3}. Wait, that is wrong; redoing it gives \\boxed{5}", "5", 1.0),
    ("So \\boxed{3}. Wait, that is wrong; redoing it gives \\boxed{5}", "3, 5", 0.0),
    ("The area is \\boxed{6} and the perimeter is \\boxed{12}.", "12", 1.0),
    # the same box repeated counts once; listing every option is not rewarded
    ("The answer is $\\boxed{5}$\n\n$\\boxed{5}$", "5", 1.0),
    ("\\boxed{1}, \\boxed{2}, \\boxed{3}", "2", 0.0),
    ("\\boxed{1}, \\boxed{2}, \\boxed{3}", "1, 2, 3", 1.0),
    ("\\boxed{\\boxed{4}}", "4", 1.0),  # nested boxes are one answer
]

# 4. No box: the last number (fractions whole) or the last math span after it.
UNBOXED = [
    ("... so the probability is 2/3.", "\\frac{2}{3}", 1.0),  # the fraction, not 3
    ("... so the probability is 2/3.", "3", 0.0),
    ("The ratio is -3/4", "-0.75", 1.0),
    ("So the point is $(7, 6)$.", "(7, 6)", 1.0),  # the pair, not 6
    ("So the point is $(7, 6)$.", "6", 0.0),
    ("Therefore $x \\geq 5$.", "x \\ge 5", 1.0),  # the relation, not 5
    ("Therefore $x \\geq 5$.", "[5, \\infty)", 1.0),  # ... which is the interval
    ("Therefore $x \\geq 5$.", "5", 0.0),
    ("Thus $x + y = 7$.", "7", 1.0),  # an equation counts by its right-hand side
    ("Using $a = 3$ we get 7 in total", "7", 1.0),  # a number after the last span wins
    ("He had $5 and spent $3, leaving $2.", "2", 1.0),  # prices are not math spans
    ("Pears cost $7, apples $5", "5", 1.0),
    ("The price is \\$18.", "18", 1.0),
    ("Hence \\(\\sqrt{2}\\)", "\\sqrt{2}", 1.0),
    ("Therefore:\n\\[\n\\frac{3}{4}\n\\]", "\\frac34", 1.0),
    ("$$x = \\frac{1}{3}$$", "\\frac{1}{3}", 1.0),
    ("It takes 7 days/week", "7", 1.0),  # a slash before a word is no fraction
    ("The answer is **12**.", "12", 1.0),  # Markdown bold around the answer
    ("The answer is 5 apples.", "5", 1.0),
    ("The answer is 18 dollars.", "18", 1.0),  # a number then words: the words are a unit
    ("The answer is 12 eggs per day.", "12", 1.0),
    ("The answer is 3 and 4.", "3", 0.0),  # ... but not when another number follows
    ("The answer is $\\frac{2}{3}$.", "\\frac{2}{3}", 1.0),
    ("A long derivation $" + "1+" * 200 + "1$ so 9 remain", "9", 1.0),
]

# 5. Against a numeric gold answer, the calculation is not its result. The first two are what ppo.py learned
#    to write in 30 minutes on the arithmetic task (math-verify evaluates them to the gold answer).
CALCULATIONS = [
    ("\\boxed{59 * 100} 59 * 100 = 590", "5900", 0.0),
    ("\\boxed{5 * 9} 5 * 9 = 55", "45", 0.0),
    ("The answer is 88 + 44.", "132", 0.0),
    ("$\\boxed{12 - 7}$", "5", 0.0),
    ("\\boxed{3 \\times 4}", "12", 0.0),
    ("\\boxed{7 \\cdot 8}", "56", 0.0),
    ("\\boxed{2^{10}}", "1024", 0.0),
    ("\\boxed{\\sqrt{16}}", "4", 0.0),
    ("\\boxed{5!}", "120", 0.0),
    ("\\boxed{(3)+(4)}", "7", 0.0),
    ("\\boxed{5 - (-3)}", "8", 0.0),
    ("\\boxed{590/10}", "59", 0.0),  # a fraction that is a whole number: the division, not done
    ("\\boxed{\\frac{8}{4}}", "2", 0.0),
    ("\\boxed{12 = 3 \\times 4}", "12", 0.0),  # read after the last "=", as math-verify reads equations
    ("\\boxed{\\frac{6 \\times 2}{3}}", "4", 0.0),
    # ... while numbers, however written, still count
    ("$3 \\times 4 = \\boxed{12}$", "12", 1.0),
    ("\\boxed{3 \\times 4 = 12}", "12", 1.0),
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{2.5 \\times 10^{3}}", "2500", 1.0),  # scientific notation is a number
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{5 \\text{ cm}^2}", "5", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\frac{6}{4}}", "\\frac{3}{2}", 1.0),  # an unreduced fraction that is not whole is a number
    ("\\boxed{1/2}", "0.5", 1.0),
    # ... and a symbolic gold answer is math-verify's to judge, expressions included
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
]

ALL_CASES = REGRESSION + MULTI_BOX + UNBOXED + CALCULATIONS


@pytest.mark.parametrize("response,gold,expected", ALL_CASES)
def test_grade(response, gold, expected):
    assert grade(response, gold) == expected


def test_extract_answer_priority():
    assert extract_answer("answer is 4. \\boxed{5}") == "5"  # a box wins over a phrase
    assert extract_answer("the answer is 4.\n#### 6") == "4"  # a phrase wins over a #### line
    assert extract_answer("5 apples\n#### 6") == "6"  # a #### line wins over the last number
    assert extract_answer("So $x=2$.\n#### 6") == "6"
    assert extract_answer("no digits here") is None
    assert extract_answer("The answer is 3.5.") == "3.5"  # a decimal point does not end the sentence


def test_boxes():
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are characters
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"  # what common.data uses for gold answers
    assert boxed_answer("$x = \\boxed{-2}$ and $x = \\boxed{1}$") == "-2, 1"
    assert boxed_answer("x &= \\boxed{1} \\\\ y &= \\boxed{2}") == "1, 2"
    assert boxed_answer("\\boxed{1} so we now try \\boxed{2}") == "2"
    assert boxed_answer("no box") is None


# 2. Linear time: 1 MB floods of each kind, most with a real answer at the far end. The old `#### n`
# pattern (`^\s*` with MULTILINE) needed 13-47 s for 80,000 newlines and hours for 1 MB.
MB = 1_000_000
FLOODS = [
    ("newlines, then ####", "\n" * MB + "#### 7", "7", 1.0),
    ("newlines", "\n" * MB, "7", 0.0),
    ("spaces, then answer", " " * MB + "The answer is 7", "7", 1.0),
    ("open braces, then box", "{" * MB + "\\boxed{7}", "7", 1.0),
    ("box, then close braces", "\\boxed{7}" + "}" * MB, "7", 1.0),
    ("unclosed boxes", "\\boxed{" * (MB // 7), "7", 0.0),
    ("hashes", "#" * MB, "7", 0.0),
    ("hashes, then ####", "#" * MB + "\n#### 7", "7", 1.0),
    ("digits", "9" * MB, "7", 0.0),  # an answer that long is not an answer
    ("dollars", "$" * MB, "7", 0.0),
    ("prices", "$1 " * (MB // 3) + "so 7", "7", 1.0),
    ("\\( opens", "\\(" * (MB // 2), "7", 0.0),
    ("'answer is'", "answer is " * (MB // 10), "7", 0.0),
    ("'answer is' then words", "The answer is 7 " + "apples and " * (MB // 11) + "pears", "7", 1.0),
    ("boxes and commas", "\\boxed{1}, " * (MB // 11), "7", 0.0),
    ("fractions", "1/" * (MB // 2), "1", 0.0),  # its last number is the fraction 1/1: a division, not 1
    ("blank lines around ####", " \n" * (MB // 2) + "#### 7\n" + " \n" * (MB // 2), "7", 1.0),
]


def test_floods_take_linear_time():
    cpu, wall = {}, {}
    for name, text, gold, expected in FLOODS:
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        assert grade(text, gold) == expected, name
        cpu[name], wall[name] = time.process_time() - start_cpu, time.perf_counter() - start_wall
    print(f"\nfloods of 1 MB: CPU {sum(cpu.values()):.2f} s in all, {max(cpu.values()):.2f} s at most for one; "
          f"wall-clock {sum(wall.values()):.2f} s in all")
    # Linear code needs about 0.1-0.3 s of CPU per MB here, 2 s for all; quadratic code would need minutes to
    # hours. CPU time (of this process only) keeps the bound meaningful when other jobs share the machine.
    assert sum(cpu.values()) < 5.0


@pytest.mark.parametrize("response", [
    "\\boxed{9^{9^{9^{9}}}}",  # a power tower sympy would never finish evaluating
    "\\boxed{" * 5000,  # deep, unbalanced nesting
    "{" * 20000 + "\\boxed{1}" + "}" * 19999,
    "9" * 100_000,  # more digits than int() accepts by default
    "__import__('os').system('touch /tmp/graded_pwned')\n\\boxed{__import__('os').system('touch /tmp/graded_pwned')}",
    "\\boxed{" + "x+" * 5000 + "1}",
    "\\boxed{10^{10^{10}}!}",
])
def test_hostile_input_is_wrong_quickly_and_runs_nothing(response):
    start = time.time()
    assert grade(response, "3") == 0.0
    assert time.time() - start < 10  # generous: math-verify's own timeouts are 2 s each
    assert not os.path.exists("/tmp/graded_pwned")


# 3. The same grade on any thread.


@pytest.fixture
def helpers(monkeypatch):
    """A fresh pool of helper processes for the test, closed afterwards."""
    pool = grading._HelperPool()
    monkeypatch.setattr(grading, "_HELPERS", pool)
    yield pool
    pool.close()


def in_thread(fn, *args):
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(fn, *args).result()


def test_same_grade_on_worker_threads(helpers):
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda case: grade(case[0], case[1]), ALL_CASES))
    assert got == [expected for _, _, expected in ALL_CASES]
    assert helpers.idle  # the math-verify answers really went through a helper process


def test_hostile_input_off_the_main_thread_is_bounded(helpers):
    for response in ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{10^{10}}!}"]:
        start = time.time()
        assert in_thread(grade, response, "3") == 0.0
        assert time.time() - start < 30  # math-verify's 2 s timeouts hold in the helper (+ its start)


def test_helper_that_cannot_start_raises(helpers, monkeypatch):
    monkeypatch.setattr(grading._Helper, "command", [sys.executable, "-c", "pass"])
    with pytest.raises(GradingError):
        in_thread(grade, "\\boxed{\\frac{1}{2}}", "0.5")


def test_helper_that_dies_raises(helpers, monkeypatch):
    monkeypatch.setattr(grading._Helper, "command", [sys.executable, "-c", "print('ready', flush=True)"])
    with pytest.raises(GradingError):
        in_thread(grade, "\\boxed{\\frac{1}{2}}", "0.5")


def test_helper_that_hangs_is_killed_with_a_warning(helpers, monkeypatch):
    hang = "import time; print('ready', flush=True); time.sleep(60)"
    monkeypatch.setattr(grading._Helper, "command", [sys.executable, "-c", hang])
    monkeypatch.setattr(grading, "HARD_TIMEOUT_S", 0.5)
    with pytest.warns(UserWarning, match="overran"):
        assert in_thread(grade, "\\boxed{\\frac{1}{2}}", "0.5") == 0.0
    assert not helpers.idle  # the hung helper was not kept


# Failures of the grader are never a silent 0.0.


def test_empty_gold_raises():
    with pytest.raises(ValueError):
        grade("\\boxed{1}", "  ")


def test_unparseable_gold_warns_and_compares_text():
    with pytest.warns(UserWarning, match="gold answer"):
        assert grade("\\boxed{\\text{}}", "\\text{}") == 1.0
