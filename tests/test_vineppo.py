"""vineppo.py: the step splitter, step advantages, the token mapping, the Monte Carlo estimate, end to end."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.generation import Completion
from conftest import run_tiny
from vineppo import estimate_values, split_into_steps, step_advantages, token_char_ends, token_step_index

SPLIT_CASES = [
    # (text, style, expected steps)
    ("Step 1: 3+4=7.\nStep 2: 7*2=14.\n#### 14", "newline", ["Step 1: 3+4=7.\n", "Step 2: 7*2=14.\n#### 14"]),
    ("one line only", "newline", ["one line only"]),
    ("a\n\nb\n", "newline", ["a\n\n", "b\n"]),
    ("a\r\nb\r\nc", "newline", ["a\r\n", "b\r\n", "c"]),
    ("\n\nstarts with blank lines\nthen", "newline", ["\n\nstarts with blank lines\n", "then"]),
    ("1. First item\n2. Second item\n3. Third", "newline", ["1. First item\n", "2. Second item\n", "3. Third"]),
    ("def f(x):\n    return x + 1\n", "newline", ["def f(x):\n", "    return x + 1\n"]),
    ("", "newline", [""]),
    ("", "math", [""]),
    ("We compute the sum first. Then we divide by two. So the answer is \\boxed{4}.", "math",
     ["We compute the sum first. ", "Then we divide by two. ", "So the answer is \\boxed{4}."]),
    ("Let $x = 1. 5$ hold here. Then we are done.", "math", ["Let $x = 1. 5$ hold here. ", "Then we are done."]),
    ("Use \\[ a. b = c \\] to see it. And finish now!", "math", ["Use \\[ a. b = c \\] to see it. ", "And finish now!"]),
    ("\\begin{align} x &= 1. \\\\ y &= 2. \\end{align} Both hold.", "math",
     ["\\begin{align} x &= 1. \\\\ y &= 2. \\end{align} Both hold."]),
    ("Ok. So. We get the sum of all the terms here.", "math", ["Ok. So. We get the sum of all the terms here."]),
    ("First line of the work\nSecond line of the work\n", "math", ["First line of the work\n", "Second line of the work\n"]),
    ("The answer is 7.\n#### 7", "math", ["The answer is 7.\n#### 7"]),
    ("no punctuation and no newline at all", "math", ["no punctuation and no newline at all"]),
]


@pytest.mark.parametrize("text,style,expected", SPLIT_CASES)
def test_split_into_steps(text, style, expected):
    assert split_into_steps(text, style) == expected


def test_math_style_splits_long_pieces_near_the_middle():
    text = ("This sentence has many words, and it keeps going on and on without a single full stop anywhere "
            "so that it is longer than one hundred characters in total")
    steps = split_into_steps(text, "math")
    assert "".join(steps) == text and len(steps) == 2
    assert all(len(s) <= 100 for s in steps)
    assert abs(len(steps[0]) - len(text) / 2) < 40


def test_math_span_longer_than_the_limit_is_not_split():
    text = "$" + " + ".join(["x"] * 60) + "$"
    assert split_into_steps(text, "math") == [text]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .!?,=$\\[](){}\n\r#0123456789")) | st.characters(), max_size=400),
       st.sampled_from(["newline", "math"]))
def test_split_join_property(text, style):
    steps = split_into_steps(text, style)
    assert "".join(steps) == text and len(steps) >= 1


def test_step_advantages_hand_worked():
    assert step_advantages([0.5, 0.75, 0.25], 1.0) == [0.25, -0.5, 0.75]
    assert step_advantages([0.4], 0.0) == [-0.4]
    # past the cap, states take V = R: the advantages there are 0
    assert step_advantages([0.5, 1.0, 1.0], 1.0) == [0.5, 0.0, 0.0]


def test_token_mapping_with_a_straddling_token():
    # Steps "ab\n" | "cd": characters 0-2 and 3-4. Token texts: "a", "b\nc" (straddles), "d", EOS "".
    ends = [1, 4, 5, 5]
    assert token_step_index(ends, [3, 2]) == [0, 1, 1, 1]
    # A token ending exactly at the boundary stays in the first step.
    assert token_step_index([1, 3, 5, 5], [3, 2]) == [0, 0, 1, 1]
    # An empty token at the very start belongs to step 0.
    assert token_step_index([0, 2], [1, 1]) == [0, 1]


def test_token_char_ends_on_the_real_tokenizer(tokenizer):
    text = "Step one: 12+3=15.\nStep two: done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ends = token_char_ends(tokenizer, ids)
    assert ends[-1] == len(text) and ends == sorted(ends)
    steps = split_into_steps(text, "newline")
    owner = token_step_index(ends, [len(s) for s in steps])
    # every token of "Step two: done" and the EOS is in step 1; the tokens before the newline are in step 0
    first_of_step_1 = owner.index(1)
    assert tokenizer.decode(ids[:first_of_step_1]) in (steps[0], steps[0].rstrip("\n"))
    assert owner[-1] == 1


class ScriptedGenerator:
    """Stands in for common.generation: each prefix's continuations are fixed, so the estimate is known."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, inputs, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        self.calls.append([tuple(x) for x in inputs])
        out = []
        for ids in inputs:
            texts = self.script[tuple(ids)]
            assert len(texts) == n
            out.append([Completion(self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id],
                                   t, True) for t in texts])
        return out


def test_mc_estimate_is_the_mean_reward_and_prefixes_are_sampled_once(tokenizer):
    prompt = [1, 2, 3]
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    r1 = enc("x = 2\n") + enc("\\boxed{4}")
    r2 = enc("y = 9\n") + enc("\\boxed{5}")
    k1 = len(enc("x = 2\n"))
    script = {
        tuple(prompt): ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}"],  # 3 of 4 right
        tuple(prompt + r1[:k1]): ["\\boxed{4}", "\\boxed{4}", "\\boxed{4}", "\\boxed{1}"],  # "x = 2\n\\boxed{4}"
        tuple(prompt + r2[: len(enc("y = 9\n"))]): ["oops", "\\boxed{4}", "no", "no"],
    }
    gen = ScriptedGenerator(tokenizer, script)
    values, num_prefixes = estimate_values(
        gen, tokenizer, [prompt, prompt], [r1, r2], [[0, k1], [0, len(enc("y = 9\n"))]], ["4", "4"], k=4,
        max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0)
    assert values == [[0.75, 0.75], [0.75, 0.25]]
    assert num_prefixes == 3 and len(gen.calls) == 1  # the shared prompt state was sampled once, in one call
    assert sorted(map(len, gen.calls[0])) == sorted(map(len, script))


def test_continuation_past_the_budget_scores_zero(tokenizer):
    prompt = [1, 2]
    response = tokenizer("a\nb", add_special_tokens=False)["input_ids"]
    cont = "\\boxed{4}" + " pad" * 10
    gen = ScriptedGenerator(tokenizer, {tuple(prompt + response[:1]): [cont]})
    values, _ = estimate_values(gen, tokenizer, [prompt], [response], [[1]], ["4"], k=1,
                                max_new_tokens=5, temperature=1.0, top_p=1.0, seed=0)
    assert values == [[0.0]]


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12",
        "--num-mc-rollouts", "2", "--eval-every", "1"]


def test_vineppo_end_to_end(tmp_path):
    _, records = run_tiny("vineppo.py", tmp_path, *TINY)
    train = [r for r in records if "vine/continuations" in r]
    assert len(train) == 2 and all(r["vine/continuations"] >= 2 * 2 for r in train)  # >= the 2 prompt states x K
