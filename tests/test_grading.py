import time

import pytest

from common.grading import extract_answer, grade, last_boxed

CASES = [
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
    # nested braces and several boxes: the LAST box counts
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


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_grade(response, gold, expected):
    assert grade(response, gold) == expected


@pytest.mark.parametrize("response", [
    "\\boxed{9^{9^{9^{9}}}}",  # a power tower sympy would never finish evaluating
    "\\boxed{" * 5000,  # deep, unbalanced nesting
    "{" * 20000 + "\\boxed{1}" + "}" * 19999,
    "9" * 100_000,  # more digits than int() accepts by default
    "__import__('os').system('touch /tmp/graded_pwned')\n\\boxed{__import__('os').system('touch /tmp/graded_pwned')}",
    "\\boxed{" + "x+" * 5000 + "1}",
    "\\boxed{10^{10^{10}}!}",
])
def test_hostile_input_is_wrong_quickly_and_runs_nothing(response, tmp_path):
    start = time.time()
    assert grade(response, "3") == 0.0
    assert time.time() - start < 10  # generous: math-verify's own timeouts are 2 s each
    import os

    assert not os.path.exists("/tmp/graded_pwned")


def test_extract_answer_priority():
    assert extract_answer("answer is 4. \\boxed{5}") == "5"  # a box wins over a phrase
    assert extract_answer("the answer is 4.\n#### 6") == "4"  # a phrase wins over a #### line
    assert extract_answer("5 apples\n#### 6") == "6"
    assert extract_answer("no digits here") is None
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
