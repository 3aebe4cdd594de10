"""common.grading: answer extraction, equivalence, time on floods, and the same grade on any thread.

Every case below was worked out by hand (the expected grade is what a careful human grader gives).

| category (issues 16, 26)           | tests                                                       | result |
|-------------------------------------|-------------------------------------------------------------|--------|
| regression: GSM8K, boxed, last box  | 43 cases (REGRESSION)                                       | 43/43  |
| 1. several boxed answers            | 17 cases (MULTI_BOX) + test_boxes (7 checks)                | 24/24  |
| 2. linear time, floods of 1 MB      | 21 floods in one test: newlines, spaces, braces, `#`,       | 21/21  |
|                                     | digits, `$`, `$ 1 `, `\\(`, boxes, "answer is", fractions, |        |
|                                     | `\\frac{1}{`, `\\sqrt`, `x_2`...; each graded right, all    |        |
|                                     | together < 25 s of CPU, none over 6 s (measured: 4-7 s in   |        |
|                                     | all, 1.2 s at most for one MB alone, 2.3 s once inside the  |        |
|                                     | full suite); 5 hostile questions of                         |        |
|                                     | 1 MB < 5 s together (measured: 0.3 s)                       |        |
| 3. the same grade on any thread     | all 169 + 50 graded cases on 2 worker threads + 4 tests:    | 223/223|
|                                     | hostile input stays bounded; a helper that cannot start or  |        |
|                                     | dies raises GradingError; one that hangs is killed and warns|        |
| 4. unboxed answers                  | 24 cases (UNBOXED): 2/3, (7, 6), x >= 5, equations, prices, | 24/24  |
|                                     | "answer is 18 dollars"                                      |        |
| hostile input (towers, code, depth) | 7 cases                                                     | 7/7    |
| extraction order                    | test_extract_answer_priority (8 checks)                     | 8/8    |
| no silent 0.0                       | empty gold raises; an unparseable gold warns                | 2/2    |
| 5. equivalent forms (no question)   | 39 cases (EQUIVALENT_FORMS): 10^3, 2^{10}, \\sqrt{4}, 2^{-1}, | 39/39  |
|                                     | 1024 = 2^{10}, (3)/(4), 3 1/2, 5.9e3, 0.\\overline{3} ...     |        |
| 6. wrong values stay wrong          | 11 cases (WRONG_VALUES): +-, "or", 5901 = 5900, 0.33 ...    | 11/11  |
| 7. unboxed LaTeX read whole         | 17 cases (UNBOXED_LATEX): `$ \\frac{1}{9} $`, bare \\dfrac,    | 17/17  |
|                                     | matrices, mixed numbers, answer-only responses              |        |
| 8. no digit out of a word or index  | 9 cases (DIGITS_IN_WORDS): B2, x_2, H2O, CO2, x^2; 2nd, 5cm | 9/9    |
| 9. Unicode operators and symbols    | 9 cases (UNICODE): minus, ½, ², √, °, π, ≥, ×               | 9/9    |
| 10. restating the question          | 45 cases (RESTATEMENTS) with the question: 59 ⋅ 100,        | 45/45  |
|                                     | 59 \\times 10^2, \\exp(\\ln 5900), \\max(5900, 1), -(-5900) |        |
|                                     | score 0.0; 5900, 5.9 \\times 10^3, value-first still count |        |
| 11. questions without a calculation | 5 cases (NO_CALCULATION_IN_QUESTION): 3 \\cdot 4 for eggs    | 5/5    |
|                                     | + test_question_operands (9 checks)                         | 9/9    |

Every case of tables 5-11 carries a one-line reason for its label. 238 pytest tests in all
(`python -m pytest tests/test_grading.py -q`), all passing.
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import common.grading as grading
from common.grading import GradingError, boxed_answer, extract_answer, grade, last_boxed, question_operands

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

# 5. Without the question, any form of the right value counts, as a careful human grader reads it (issue 26:
#    the old rule "a calculation is not a number" refused about half of these).
EQUIVALENT_FORMS = [
    ("\\boxed{10^3}", "1000", 1.0),  # a power of ten is read as its value
    ("\\boxed{10^{6}}", "1000000", 1.0),  # braces around the exponent change nothing
    ("\\boxed{2^{10}}", "1024", 1.0),  # a small power: 1024 at a glance
    ("\\boxed{2^{-1}}", "0.5", 1.0),  # a negative exponent is the reciprocal
    ("\\boxed{10^{-2}}", "0.01", 1.0),
    ("\\boxed{\\sqrt{4}}", "2", 1.0),  # the root of a perfect square
    ("\\boxed{1024 = 2^{10}}", "1024", 1.0),  # value first, then where it comes from
    ("\\boxed{12 = 3 \\times 4}", "12", 1.0),  # the same with a product
    ("\\boxed{(3)/(4)}", "0.75", 1.0),  # a parenthesised fraction
    ("\\boxed{(-3)/4}", "-0.75", 1.0),  # ... with the sign inside
    ("\\boxed{3 1/2}", "3.5", 1.0),  # a mixed number is three and a half, not 3 * 1/2
    ("\\boxed{3\\frac{1}{2}}", "\\frac{7}{2}", 1.0),  # the LaTeX mixed number
    ("\\boxed{-2\\tfrac{1}{4}}", "-9/4", 1.0),  # a negative mixed number
    ("\\boxed{5.9 \\times 10^3}", "5900", 1.0),  # scientific notation
    ("\\boxed{1.2e-3}", "0.0012", 1.0),  # ... as a program prints it
    ("\\boxed{0.\\overline{3}}", "\\frac{1}{3}", 1.0),  # a repeating decimal is exact
    ("\\boxed{3 \\cdot 4}", "12", 1.0),  # a product of the right value: nothing to restate without a question
    ("\\boxed{59 * 100} 59 * 100 = 590", "5900", 1.0),  # the box is the answer, and its value is right
    ("The answer is 88 + 44.", "132", 1.0),
    ("\\boxed{5!}", "120", 1.0),  # a factorial
    ("\\boxed{\\frac{8}{4}}", "2", 1.0),  # an unreduced fraction of the right value
    ("\\boxed{\\frac{6}{4}}", "\\frac{3}{2}", 1.0),
    # numbers in any notation
    ("$3 \\times 4 = \\boxed{12}$", "12", 1.0),
    ("\\boxed{3 \\times 4 = 12}", "12", 1.0),  # the work, then the value
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),  # LaTeX thousands separators
    ("\\boxed{1\\,000}", "1000", 1.0),
    ("\\boxed{2.5 \\times 10^{3}}", "2500", 1.0),
    ("\\boxed{30^\\circ}", "30", 1.0),  # degrees
    ("\\boxed{5 \\text{ cm}^2}", "5", 1.0),  # a unit
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\frac{-3}{4}}", "-3/4", 1.0),  # the sign in the numerator
    ("\\boxed{0.333333}", "\\frac{1}{3}", 1.0),  # six figures: 1/3 rounded
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),  # a symbolic gold answer is math-verify's to judge
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),  # an equation counts by its value side
    ("\\boxed{25\\%}", "0.25", 1.0),  # a percentage is its fraction ...
    ("\\boxed{25\\%}", "25", 1.0),  # ... or its number, as the gold answer writes it
    ("The rate falls to 0.5%.", "0.005", 1.0),  # the percent sign stays with the last number
]

# 6. Wrong answers stay wrong, however they are dressed.
WRONG_VALUES = [
    ("\\boxed{5900 \\pm 1}", "5900", 0.0),  # two values, not one
    ("\\boxed{5900 \\text{ or } 5901}", "5900", 0.0),  # hedging between two values
    ("\\boxed{5901 = 5900}", "5900", 0.0),  # an equation between two different numbers states nothing true
    ("\\boxed{1234567.4}", "1234567", 0.0),  # an integer gold answer needs exactly that integer
    ("\\boxed{0.0000002}", "0.0000001", 0.0),  # small numbers are compared relatively, not to 1e-6
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),  # two figures are not 1/3
    ("\\boxed{3 5/2}", "5.5", 0.0),  # 5/2 is improper: not a mixed number, so not 5.5
    ("\\boxed{\\frac{1}{9}}", "9", 0.0),  # a fraction is not its denominator
    ("\\boxed{2^{10}}", "1000", 0.0),
    ("\\boxed{1,2}", "12", 0.0),  # a list of two numbers is not twelve
    ("\\boxed{0.25}", "25", 0.0),  # a fraction without a percent sign is not its percentage
]

# 7. The fallback without a box reads `$...$` with spaces inside, `\(...\)`, `\[...\]` and bare LaTeX whole.
UNBOXED_LATEX = [
    ("Hence the probability is $ \\frac{1}{9} $.", "\\frac{1}{9}", 1.0),  # spaces inside the dollars: still math
    ("Hence the probability is $ \\frac{1}{9} $.", "9", 0.0),  # ... so its denominator is not the answer
    ("The probability is \\frac{1}{9}.", "\\frac19", 1.0),  # bare LaTeX is read as one expression
    ("The probability is \\frac{1}{9}.", "9", 0.0),
    ("so we get $\\dfrac{1}{3} $", "1/3", 1.0),
    ("so we get $\\dfrac{1}{3} $", "3", 0.0),  # the example: not 3
    ("The matrix is $ \\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix} $", "4", 0.0),  # not its last entry
    ("The matrix is $ \\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix} $",
     "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", 1.0),  # the matrix itself, in any bracket style
    ("We need 3\\frac{1}{2} cups", "3.5", 1.0),  # a bare mixed number, whole
    ("The side is 2\\sqrt{3}", "2\\sqrt{3}", 1.0),  # the coefficient glued to the root
    ("The side is 2\\sqrt{3}", "3", 0.0),
    ("Answer \\( \\frac{5}{7} \\)", "5/7", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),  # a response that is only an answer is read whole
    ("x^2 + 2x + 1", "(x+1)^2", 1.0),  # ... not as its last number
    ("-\\frac{3}{4}", "-0.75", 1.0),
    ("It costs $5 and then $x = 3$.", "3", 1.0),  # a price does not swallow the math after it
    ("... \\boxed{200} ... \\boxed{255}. The final answer is $10,455$.", "10455", 1.0),  # a later statement wins
]

# 8. A digit inside a word or an index is not a number.
DIGITS_IN_WORDS = [
    ("The answer is B2.", "2", 0.0),  # an option or cell name
    ("We pick cell B2", "2", 0.0),
    ("so the index is x_2", "2", 0.0),  # a subscript
    ("Water is H2O", "2", 0.0),  # a chemical formula
    ("It releases CO2", "2", 0.0),
    ("we square it: x^2", "2", 0.0),  # an exponent
    ("She finished 2nd", "2", 1.0),  # an ordinal is its number
    ("The rope is 5cm long", "5", 1.0),  # a unit glued to the number
    ("Tom has B2 and 7 apples", "7", 1.0),  # the word is skipped; the number after it counts
]

# 9. Unicode operators and symbols are normalised first.
UNICODE = [
    ("\\boxed{\u22123}", "-3", 1.0),  # U+2212 minus sign
    ("\\boxed{\u00bd}", "0.5", 1.0),  # vulgar fraction one half
    ("\\boxed{3\u00bd}", "3.5", 1.0),  # ... as part of a mixed number
    ("\\boxed{x\u00b2+1}", "x^2+1", 1.0),  # superscript two
    ("\\boxed{3\u221a2}", "3\\sqrt{2}", 1.0),  # square root sign
    ("\\boxed{90\u00b0}", "90", 1.0),  # degree sign
    ("\\boxed{2\u03c0}", "2\\pi", 1.0),  # pi
    ("\\boxed{x \u2265 5}", "[5, \\infty)", 1.0),  # greater-or-equal
    ("\\boxed{6 \u00d7 7}", "42", 1.0),  # a multiplication sign (no question: its value counts)
]

# 10. With the question: an answer that only restates the question's calculation scores 0.0, in any notation.
#     The first two are what ppo.py learned to write in 30 minutes on the arithmetic task.
Q59 = "What is 59 * 100?"
RESTATEMENTS = [
    # (response, gold, question, expected)
    ("\\boxed{59 * 100} 59 * 100 = 590", "5900", Q59, 0.0),  # the question boxed
    ("\\boxed{5 * 9} 5 * 9 = 55", "45", "Calculate 5 * 9.", 0.0),
    ("The answer is 88 + 44.", "132", "Calculate 88 + 44.", 0.0),  # unboxed
    ("\\boxed{59 \\cdot 100}", "5900", Q59, 0.0),  # another multiplication sign
    ("\\boxed{59 \u22c5 100}", "5900", Q59, 0.0),  # Unicode dot operator
    ("\\boxed{59 \u2217 100}", "5900", Q59, 0.0),  # Unicode asterisk operator
    ("\\boxed{59 \u00d7 100}", "5900", Q59, 0.0),  # multiplication sign
    ("\\boxed{100 \\times 59}", "5900", Q59, 0.0),  # the operands swapped
    ("\\boxed{(59)(100)}", "5900", Q59, 0.0),  # juxtaposition
    ("\\boxed{59 \\times 10^2}", "5900", Q59, 0.0),  # 100 as 10^2: a calculation dressed as scientific notation
    ("\\boxed{59e2}", "5900", Q59, 0.0),  # ... the same in e-notation
    ("\\boxed{\\exp(\\ln 5900)}", "5900", Q59, 0.0),  # the value wrapped in inverse functions
    ("\\boxed{\\operatorname{lcm}(59, 100)}", "5900", Q59, 0.0),  # a function of the operands
    ("\\boxed{\\max(5900, 1)}", "5900", Q59, 0.0),  # the value wrapped in a function
    ("\\boxed{\\lfloor 5900.5 \\rfloor}", "5900", Q59, 0.0),
    ("\\boxed{|-5900|}", "5900", Q59, 0.0),
    ("\\boxed{-(-5900)}", "5900", Q59, 0.0),  # a double negation
    ("\\boxed{5900 \\cdot 1}", "5900", Q59, 0.0),  # a neutral factor
    ("\\boxed{5900^1}", "5900", Q59, 0.0),  # a trivial power
    ("\\boxed{\\frac{590000}{100}}", "5900", Q59, 0.0),  # a whole number as a fraction: the division not done
    ("\\boxed{59 \\times 100 \\text{ dollars}}", "5900", Q59, 0.0),  # a unit does not make it a number
    ("\\boxed{59 * 100}", "5900", "What is 59 times 100?", 0.0),  # the question in words
    ("\\boxed{59 \\cdot 100}", "5900", "What is the product of 59 and 100?", 0.0),
    ("\\boxed{2^{10}}", "1024", "What is 2^10?", 0.0),  # a power restating the question's power
    ("\\boxed{1 \\times 10^3}", "1000", "What is 10^3?", 0.0),  # ... dressed with a neutral mantissa
    ("\\boxed{\\sqrt{16}}", "4", "What is sqrt(16)?", 0.0),
    ("\\boxed{\\frac{6}{8}}", "\\frac{3}{4}", "Simplify 6/8.", 0.0),  # the unreduced fraction handed back
    ("\\boxed{\\sqrt{245}}", "7\\sqrt{5}", "Simplify $\\sqrt{245}$.", 0.0),  # a symbolic answer handed back
    ("\\boxed{0.5}", "\\frac{1}{2}", "Write $0.5$ as a common fraction.", 0.0),  # the given number handed back
    # ... while the value, in a form a human reads directly, still counts
    ("\\boxed{5900}", "5900", Q59, 1.0),
    ("\\boxed{5{,}900}", "5900", Q59, 1.0),
    ("\\boxed{5900 = 59 \\times 100}", "5900", Q59, 1.0),  # value first: the value is what counts
    ("$59 \\times 100 = \\boxed{5900}$", "5900", Q59, 1.0),  # the work, then the boxed value
    ("\\boxed{59 \\times 100 = 5900}", "5900", Q59, 1.0),  # the work and the value in one box
    ("\\boxed{5.9 \\times 10^3}", "5900", Q59, 1.0),  # scientific notation not built from 59 and 100
    ("\\boxed{5900 \\text{ dollars}}", "5900", Q59, 1.0),
    ("\\boxed{1024}", "1024", "What is 2^10?", 1.0),
    ("\\boxed{2^{10}}", "1024", "What is 32 * 32?", 0.0),  # a power of 2: rewritten, not evaluated
    ("\\boxed{0.59 \\times 10^4}", "5900", Q59, 0.0),  # a mantissa off 1-10: the digits shifted, not the value
    ("\\boxed{10^3}", "1000", "What is 10 * 100?", 1.0),  # a power of ten is read directly
    ("\\boxed{3\\frac{1}{2}}", "3.5", "Write 7/2 as a mixed number.", 1.0),  # a mixed number of other numbers
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}", "Simplify 6/8.", 1.0),
    ("\\boxed{3/4}", "0.75", "Calculate 3 / 4.", 0.0),  # the question's own expression, verbatim
    ("\\boxed{7\\sqrt{5}}", "7\\sqrt{5}", "Simplify $\\sqrt{245}$.", 1.0),
    ("\\boxed{5901}", "5900", Q59, 0.0),  # a wrong value is wrong with a question too
]

# 11. A question without a calculation of its own has nothing to restate: a calculation of the right value
#     is a fine answer to it.
NO_CALCULATION_IN_QUESTION = [
    ("\\boxed{3 \\cdot 4}", "12", "Each of 3 baskets holds 4 eggs. How many eggs are there?", 1.0),
    ("\\boxed{(16 - 3 - 4) \\times 2}", "18", "Ducks lay 16 eggs a day. Jo eats 3 and bakes with 4, and sells the "
     "rest at $2 each. How many dollars does she make a day?", 1.0),  # "$2" is a price, not math
    ("\\boxed{2^{10}}", "1024", "How many subsets does a set of 10 elements have?", 1.0),
    ("\\boxed{\\binom{5}{2}}", "10", "In how many ways can 2 of 5 books be chosen?", 1.0),
    ("\\boxed{3 \\cdot 4}", "13", "Each of 3 baskets holds 4 eggs. How many eggs are there?", 0.0),  # wrong value
]

QUESTION_CASES = RESTATEMENTS + NO_CALCULATION_IN_QUESTION

ALL_CASES = (REGRESSION + MULTI_BOX + UNBOXED + EQUIVALENT_FORMS + WRONG_VALUES + UNBOXED_LATEX + DIGITS_IN_WORDS
             + UNICODE)


@pytest.mark.parametrize("response,gold,expected", ALL_CASES)
def test_grade(response, gold, expected):
    assert grade(response, gold) == expected


@pytest.mark.parametrize("response,gold,question,expected", QUESTION_CASES)
def test_grade_with_question(response, gold, question, expected):
    assert grade(response, gold, question=question) == expected
    assert grade(response, gold, question) == expected  # the question may be passed positionally


def test_question_operands():
    assert question_operands("Calculate 88 * 94.") == {88, 94}
    assert question_operands("What is 12 divided by 3?") == {12, 3}
    assert question_operands("What is the sum of 3 and 4?") == {3, 4}
    assert question_operands("What is $\\frac{3}{4}$ of 20?") == {3, 4}
    assert question_operands("What is gcd(12, 18)?") == {12, 18}
    assert question_operands("What is 12 squared?") == {12}
    assert question_operands("Each of 3 baskets holds 4 eggs. How many eggs?") == set()  # no calculation
    assert question_operands("Solve x^2 + x - 6 = 0.") == set()  # algebra, not arithmetic on numbers
    assert question_operands("Cell B2 holds 7, cell x_3 holds 9.") == set()


def test_extract_answer_priority():
    assert extract_answer("answer is 4. \\boxed{5}") == "5"  # a box wins over a phrase
    assert extract_answer("the answer is 4.\n#### 6") == "4"  # a phrase wins over a #### line
    assert extract_answer("5 apples\n#### 6") == "6"  # a #### line wins over the last number
    assert extract_answer("So $x=2$.\n#### 6") == "6"
    assert extract_answer("no digits here") is None
    assert extract_answer("The answer is 3.5.") == "3.5"  # a decimal point does not end the sentence
    assert extract_answer("\\boxed{200} so the final answer is $10,455$.") == "10,455"  # a later statement wins
    assert extract_answer("\\boxed{5}. I think the answer is correct.") == "5"  # ... only if it is math


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
    ("fractions", "1/" * (MB // 2), "7", 0.0),  # its last number is the fraction 1/1
    ("bare fractions", "\\frac{1}{" * (MB // 8) + "so 7", "7", 1.0),  # unclosed LaTeX, then the answer
    ("subscripts", "x_2 " * (MB // 4), "2", 0.0),  # no digit is taken out of an index
    ("spaced dollars", "$ 1 " * (MB // 4), "1", 1.0),  # `$ ... $` spans with spaces inside
    ("\\sqrt", "\\sqrt" * (MB // 5), "1", 0.0),
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
    # Linear code needs about 0.05-1.2 s of CPU per MB here (measured alone on 2 cores: 'bare fractions' and '\\sqrt'
    # take 1.1-1.2 s, and half of that at half a MB), about 7 s for all; inside the full suite, with models loaded,
    # one took 2.3 s (the cause not measured: a larger heap for the garbage collector to walk is a likely one). Quadratic code would need minutes to
    # hours, so the bounds below leave room for that noise and still catch it. CPU time (of this process only)
    # keeps them meaningful when other jobs share the machine.
    assert sum(cpu.values()) < 25.0
    assert max(cpu.values()) < 6.0


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


def test_hostile_question_takes_linear_time():
    start = time.process_time()
    for question, expected in [("1 + " * (MB // 4), 0.0), ("What is " * (MB // 8), 1.0), ("$1$ " * (MB // 4), 1.0),
                               ("sqrt(" * (MB // 5), 1.0), ("9" * MB, 1.0)]:
        assert grade("\\boxed{59 \\cdot 100}", "5900", question=question) == expected
    assert time.process_time() - start < 5.0  # the question is read in its last 20,000 characters


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
        got_q = list(ex.map(lambda case: grade(case[0], case[1], question=case[2]), QUESTION_CASES))
    assert got == [expected for _, _, expected in ALL_CASES]
    assert got_q == [expected for _, _, _, expected in QUESTION_CASES]
    assert helpers.idle  # the math-verify answers really went through a helper process


def test_hostile_input_off_the_main_thread_is_bounded(helpers):
    for response in ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{10^{10}}!}"]:
        start = time.time()
        assert in_thread(grade, response, "3") == 0.0
        assert time.time() - start < 30  # math-verify's 2 s timeouts hold in the helper (+ its start)


def test_helper_that_cannot_start_raises(helpers, monkeypatch):
    monkeypatch.setattr(grading._Helper, "command", [sys.executable, "-c", "pass"])
    with pytest.raises(GradingError):
        in_thread(grade, "\\boxed{2\\sqrt{2}}", "\\sqrt{8}")


def test_helper_that_dies_raises(helpers, monkeypatch):
    monkeypatch.setattr(grading._Helper, "command", [sys.executable, "-c", "print('ready', flush=True)"])
    with pytest.raises(GradingError):
        in_thread(grade, "\\boxed{2\\sqrt{2}}", "\\sqrt{8}")


def test_helper_that_hangs_is_killed_with_a_warning(helpers, monkeypatch):
    hang = "import time; print('ready', flush=True); time.sleep(60)"
    monkeypatch.setattr(grading._Helper, "command", [sys.executable, "-c", hang])
    monkeypatch.setattr(grading, "HARD_TIMEOUT_S", 0.5)
    with pytest.warns(UserWarning, match="overran"):
        assert in_thread(grade, "\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 0.0
    assert not helpers.idle  # the hung helper was not kept


# Failures of the grader are never a silent 0.0.


def test_empty_gold_raises():
    with pytest.raises(ValueError):
        grade("\\boxed{1}", "  ")


def test_unparseable_gold_warns_and_compares_text():
    with pytest.warns(UserWarning, match="gold answer"):
        assert grade("\\boxed{\\text{a}}", "\\text{}") == 0.0
    assert grade("\\boxed{\\text{}}", "\\text{}") == 1.0  # the gold answer's own text needs no parsing
