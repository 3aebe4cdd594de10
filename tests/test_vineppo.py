"""vineppo.py: the step splitter, step advantages, the token mapping, the Monte Carlo estimate (one budget per
prefix), the shared PPO pieces (KL, loss, schedule, chunked log-probs, fixed micro-batches), end to end.
Checkpoint/resume and the range checks of every flag: tests/test_trainers.py."""

import math
import random
import re

import pytest
import torch
import tyro
from hypothesis import given, settings
from hypothesis import strategies as st

from common.generation import Completion
from conftest import run_tiny
from vineppo import (GSM8K_MAX_BOUNDARIES, MATH_SPAN, Args, check_args, estimate_values, in_micro_batches, kl_k3,
                     lr_multiplier, make_batch, ppo_policy_loss, response_logprobs, split_into_steps, state_starts,
                     step_advantages, token_char_ends, token_step_index)

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


# Structured pieces for the property test: math delimiters, escapes, abbreviations, line breaks.
PIECES = ["$", "$$", "\\$", "\\[", "\\]", "\\(", "\\)", "\\begin{align*}", "\\end{align*}", "\\\\", "\n", "\n\n",
          ". ", "! ", "? ", ".$ ", "e.g. ", "Dr. ", "The ", "and ", "x = 3", ", ", "=", "word ", "#### 4", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES) | st.text(max_size=8), max_size=80))
def test_math_split_join_property_on_latex_like_text(parts):
    text = "".join(parts)
    steps = split_into_steps(text, "math")
    assert "".join(steps) == text and len(steps) >= 1


def test_escaped_dollar_is_money_not_math():
    """`\\$` never opens or closes math: the sentences around prices are found, and the real span stays whole."""
    text = ("Apples cost \\$1.25 each. She buys 3 of them. So she pays $3 \\times 1.25 = 3.75$ dollars. "
            "Then she has \\$6.25 left.")
    assert [m.group() for m in MATH_SPAN.finditer(text) if m.group("escape") is None] == ["$3 \\times 1.25 = 3.75$"]
    assert split_into_steps(text, "math") == [
        "Apples cost \\$1.25 each. ", "She buys 3 of them. ", "So she pays $3 \\times 1.25 = 3.75$ dollars. ",
        "Then she has \\$6.25 left."]
    # inside math, an escaped dollar does not close the span
    spans = [m.group() for m in MATH_SPAN.finditer("Total: $\\$5 + \\$3 = \\$8$. Done") if m.group("escape") is None]
    assert spans == ["$\\$5 + \\$3 = \\$8$"]


def test_no_cut_after_abbreviations_or_before_lowercase():
    text = ("We use a known bound, e.g. AM-GM on the terms. That is, i.e. Cauchy works too. Ask Dr. Smith about "
            "it. Add apples, pears, etc. The sum is 12. It is 12. and so it stays.")
    assert split_into_steps(text, "math") == [
        "We use a known bound, e.g. AM-GM on the terms. ", "That is, i.e. Cauchy works too. ",
        "Ask Dr. Smith about it. ", "Add apples, pears, etc. The sum is 12. ", "It is 12. and so it stays."]


def test_sentence_that_ends_inside_math_is_a_boundary():
    assert split_into_steps("The value is $x = 5.$ Then we stop here.", "math") == [
        "The value is $x = 5.$ ", "Then we stop here."]


def test_long_piece_split_leaves_no_short_step():
    # 111 characters; the only "and " is 8 from the end. The earlier splitter cut there and left "then" alone
    # (4 characters, 9 continuations); now a cut keeps 20 characters on each side, so the space nearest the
    # middle (55.5) is taken: after "on " at 55.
    text = ("Now we count every one of the little boxes that sit on the long shelf in the room next to the big door "
            "and then")
    steps = split_into_steps(text, "math")
    assert steps == ["Now we count every one of the little boxes that sit on ",
                     "the long shelf in the room next to the big door and then"]
    # No step under 20 characters from the long-piece splitter, on long texts without sentence ends.
    rng = random.Random(0)
    words = ["a", "and", "to", "x,", "=", "the", "number", "is", "of", "counting", "y:"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
        steps = split_into_steps(text, "math")
        assert "".join(steps) == text
        assert len(steps) == 1 or all(len(s) >= 20 for s in steps), steps


ALIGN = ("We expand both sides and collect the terms:\n\\begin{align*}\n"
         "(x+1)^2 + (x-2)^2 &= x^2 + 2x + 1 + x^2 - 4x + 4 \\\\\n"
         "&= 2x^2 - 2x + 5 \\\\\n"
         "2x^2 - 2x + 5 &= 3x^2 - 6x + 9 \\\\\n"
         "0 &= x^2 - 4x + 4 \\\\\n"
         "0 &= (x - 2)^2 \\\\\n"
         "x &= 2 \\\\\n"
         "\\text{check: } (2+1)^2 + (2-2)^2 &= 9 + 0 = 9 \\\\\n"
         "3 \\cdot 2^2 - 6 \\cdot 2 + 9 &= 12 - 12 + 9 = 9\n"
         "\\end{align*}\nSo the answer is $\\boxed{2}$.")


def test_long_display_math_is_cut_at_its_line_breaks():
    """A 278-character align* block was one step (VinePPO's splitter: 9 lines). Now one step per line, the
    opening line with the first row, the closing line with the last, short rows (under 10) with the next."""
    assert split_into_steps(ALIGN, "math") == [
        "We expand both sides and collect the terms:\n",
        "\\begin{align*}\n(x+1)^2 + (x-2)^2 &= x^2 + 2x + 1 + x^2 - 4x + 4 \\\\\n",
        "&= 2x^2 - 2x + 5 \\\\\n",
        "2x^2 - 2x + 5 &= 3x^2 - 6x + 9 \\\\\n",
        "0 &= x^2 - 4x + 4 \\\\\n",
        "0 &= (x - 2)^2 \\\\\n",
        "x &= 2 \\\\\n\\text{check: } (2+1)^2 + (2-2)^2 &= 9 + 0 = 9 \\\\\n",
        "3 \\cdot 2^2 - 6 \\cdot 2 + 9 &= 12 - 12 + 9 = 9\n\\end{align*}\n",
        "So the answer is $\\boxed{2}$.",
    ]
    # $$ ... $$ over three lines: its only content line carries both delimiters' lines, so it is one piece.
    assert split_into_steps("$$\n a^2 + b^2 = c^2 \n$$\nThus the answer is 5.", "math") == [
        "$$\n a^2 + b^2 = c^2 \n$$\n", "Thus the answer is 5."]
    # A sentence end inside display math is still no boundary.
    text = "\\[\nx = 1. Then y = 2\n\\]\nSo we are done with it."
    assert all(not re.fullmatch(r"\s*(\\\[|\\\])\s*", s) for s in split_into_steps(text, "math"))
    assert split_into_steps(text, "math") == ["\\[\nx = 1. Then y = 2\n\\]\n", "So we are done with it."]


def test_state_starts_and_the_gsm8k_cap():
    # 3 steps of 2, 1, 2 tokens: states end at token 0 (the prompt), 2 and 3; the last step has no state after it
    token_step = [0, 0, 1, 2, 2]
    assert state_starts(token_step, 3, None) == [0, 2, 3]
    assert state_starts(token_step, 3, 1) == [0, 2] and state_starts(token_step, 3, 0) == [0]
    # VinePPO's GSM8K cap: the prompt + 25 boundaries (steps 1..25), so a 40-step response has 26 states
    many = [i // 2 for i in range(80)]  # 40 steps of 2 tokens
    assert GSM8K_MAX_BOUNDARIES == 25
    assert state_starts(many, 40, GSM8K_MAX_BOUNDARIES) == [2 * i for i in range(26)]
    assert len(state_starts(many, 40, None)) == 40
    # a step with no token (its text ends inside a straddling token) starts where the next step does
    assert state_starts([0, 2, 2], 3, None) == [0, 1, 1]


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


def token_char_ends_by_prefixes(tokenizer, token_ids):
    """The reference (vineppo.py's earlier implementation): decode every prefix, quadratic."""
    text_len = len(tokenizer.decode(token_ids, skip_special_tokens=True))
    ends, last = [], 0
    for i in range(len(token_ids)):
        last = max(last, min(text_len, len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True))))
        ends.append(last)
    return ends


REAL_TEXTS = [
    "Step one: 12+3=15.\nStep two: done",
    "Le café coûte 3,50 € ; naïve façade. 日本語のテキストです。 Emoji: 🙂👍🏽 and 𝔽 (a 4-byte letter).",
    "So $x^2 = 9$, i.e. $x = \\pm 3$.\n\\begin{align*}\ny &= 2x \\\\\n&= 6\n\\end{align*}\n#### 6",
    "",
]


def test_token_char_ends_matches_decoding_every_prefix(tokenizer):
    """The linear version gives exactly the reference's output: on real texts (multi-byte characters split
    across byte-level tokens), on random token lists, on lists of single-byte tokens (characters cut and bytes
    that never form one) and with special tokens in between (skipped by decode)."""
    for text in REAL_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert token_char_ends(tokenizer, ids) == token_char_ends_by_prefixes(tokenizer, ids)
    rng = random.Random(0)
    vocab = len(tokenizer)
    single_bytes = [i for i in range(vocab) if len(tokenizer.convert_ids_to_tokens(i)) == 1]  # one byte each
    specials = list(tokenizer.added_tokens_decoder)
    for trial in range(600):
        n = rng.randint(0, 40)
        pool = [lambda: rng.randrange(vocab), lambda: rng.choice(single_bytes),
                lambda: rng.choice([rng.choice(single_bytes), rng.choice(specials), rng.randrange(vocab)])][trial % 3]
        ids = [pool() for _ in range(n)]
        assert token_char_ends(tokenizer, ids) == token_char_ends_by_prefixes(tokenizer, ids), ids


def test_token_char_ends_is_linear_and_falls_back_elsewhere(tokenizer):
    """On the byte-level tokenizer the whole text is decoded once, not once per prefix; a tokenizer without a
    ByteLevel decoder gets the reference (every prefix decoded), with the same result."""

    class Counting:
        def __init__(self, tok, hide_backend):
            self.tok, self.calls = tok, 0
            if not hide_backend:
                self.backend_tokenizer = tok.backend_tokenizer
            self.added_tokens_decoder, self.convert_ids_to_tokens = tok.added_tokens_decoder, tok.convert_ids_to_tokens

        def decode(self, ids, skip_special_tokens=False):
            self.calls += 1
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer(REAL_TEXTS[1] * 8, add_special_tokens=False)["input_ids"]
    fast, slow = Counting(tokenizer, hide_backend=False), Counting(tokenizer, hide_backend=True)
    assert token_char_ends(fast, ids) == token_char_ends(slow, ids) == token_char_ends_by_prefixes(tokenizer, ids)
    assert fast.calls == 1 and slow.calls == len(ids) + 1


class ScriptedGenerator:
    """Stands in for common.generation: each prefix's continuations are fixed, so the estimate is known. Like
    the real generators it takes one budget or one per input, records them, and cuts a continuation at its
    input's budget (then unfinished: no EOS)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls, self.budgets = tokenizer, script, [], []

    def generate(self, inputs, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        self.calls.append([tuple(x) for x in inputs])
        budgets = [max_new_tokens] * len(inputs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        assert len(budgets) == len(inputs)
        self.budgets.append(dict(zip(self.calls[-1], budgets)))
        out = []
        for ids, budget in zip(inputs, budgets):
            texts = self.script[tuple(ids)]
            assert len(texts) == n
            row = []
            for t in texts:
                tokens = self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                cut = tokens[:budget]
                text = self.tokenizer.decode(cut, skip_special_tokens=True)
                row.append(Completion(cut, text, len(cut) == len(tokens)))  # finished: its EOS fitted
            out.append(row)
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
        max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0, questions=["What is 2 + 2?"] * 2)
    assert values == [[0.75, 0.75], [0.75, 0.25]]
    assert num_prefixes == 3 and len(gen.calls) == 1  # the shared prompt state was sampled once, in one call
    assert sorted(map(len, gen.calls[0])) == sorted(map(len, script))
    # each prefix with its own budget: 64 minus its response tokens (the prompt state: all 64)
    assert gen.budgets[0] == {key: 64 - (len(key) - len(prompt)) for key in script}


def test_each_continuation_gets_exactly_its_own_budget(tokenizer):
    """Three prefixes of one response (0, 1 and 3 response tokens) with max_new_tokens 12: budgets 12, 11, 9.
    A continuation that fits its own budget exactly (EOS as its last allowed token) is graded; one token more
    and it is cut by the budget, unfinished, and scores 0, even where a longer budget (another prefix's)
    would have let it finish."""
    prompt = [1, 2]
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    response = enc("a\nb\nc\nd")
    assert len(response) >= 4
    right = "\\boxed{4}"
    n_right = len(enc(right)) + 1  # with its EOS
    pad = lambda k: right + " x" * k  # noqa: E731  a right answer taking k more tokens (" x" is one token)
    assert len(enc(pad(2))) == len(enc(right)) + 2
    budget = {0: 12, 1: 11, 3: 9}
    assert n_right <= 9
    # from each prefix: one that ends exactly at its budget, one a token longer
    script = {tuple(prompt + response[:s]): [pad(b - n_right), pad(b - n_right + 1)] for s, b in budget.items()}
    gen = ScriptedGenerator(tokenizer, script)
    values, num_prefixes = estimate_values(gen, tokenizer, [prompt], [response], [[0, 1, 3]], ["4"], k=2,
                                           max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0, questions=[None])
    assert gen.budgets == [{tuple(prompt + response[:s]): b for s, b in budget.items()}]
    assert values == [[0.5, 0.5, 0.5]] and num_prefixes == 3


def test_continuation_past_the_budget_scores_zero(tokenizer):
    prompt = [1, 2]
    response = tokenizer("a\nb", add_special_tokens=False)["input_ids"]
    cont = "\\boxed{4}" + " pad" * 10
    gen = ScriptedGenerator(tokenizer, {tuple(prompt + response[:1]): [cont]})
    values, _ = estimate_values(gen, tokenizer, [prompt], [response], [[1]], ["4"], k=1,
                                max_new_tokens=5, temperature=1.0, top_p=1.0, seed=0, questions=[None])
    assert values == [[0.0]] and gen.budgets == [{tuple(prompt + response[:1]): 4}]


def test_real_generator_gives_each_prefix_its_own_budget(tiny_model, tokenizer):
    """With common.generation's hf backend on the tiny model: every continuation from a prefix of r response
    tokens holds at most max_new_tokens - r tokens, exactly that many when it did not finish (the random
    model almost never says EOS), in one batched call whatever the mix of budgets."""
    from common.generation import make_generator

    generator = make_generator("hf", tiny_model, tokenizer, "unused", batch_size=4)
    seen = []

    class Recording:
        def generate(self, inputs, n, max_new_tokens, **kw):
            out = generator.generate(inputs, n=n, max_new_tokens=max_new_tokens, **kw)
            budgets = [max_new_tokens] * len(inputs) if isinstance(max_new_tokens, int) else max_new_tokens
            seen.extend(zip(inputs, budgets, out))
            return out

    prompt = tokenizer("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    response = list(range(100, 110))  # 10 response tokens; states after 0, 2, 5 and 9 of them
    estimate_values(Recording(), tokenizer, [prompt], [response], [[0, 2, 5, 9]], ["4"], k=3, max_new_tokens=12,
                    temperature=1.0, top_p=1.0, seed=0, questions=["What is 2 + 2?"])
    assert [budget for _, budget, _ in seen] == [12, 10, 7, 3]
    for ids, budget, conts in seen:
        assert len(conts) == 3
        for c in conts:
            assert len(c.token_ids) <= budget and (c.finished or len(c.token_ids) == budget)


# ---- the pieces shared with ppo.py (copies of its functions, tested here on their own) ----
def test_kl_k3():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ones = torch.ones(3)
    assert torch.allclose(kl_k3(lp, lp, ones), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    r = ref - lp
    assert torch.allclose(kl_k3(lp, ref, ones), torch.exp(r) - r - 1)
    # Clamped at 10 per token (exp(4) - 4 - 1 = 49.6), and 0 outside the mask.
    assert kl_k3(torch.tensor([-4.0]), torch.tensor([0.0]), torch.ones(1)).item() == 10.0
    assert kl_k3(lp, ref, torch.tensor([1.0, 0.0, 1.0]))[1].item() == 0.0



def test_policy_loss_clipping():
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    # ratio e^0.5 = 1.65 with positive advantage: clipped at 1.2, so the loss is -1.2 and clipfrac 1.
    loss, clipfrac, _, ratio = ppo_policy_loss(torch.full((1, 2), 0.5), old, torch.ones(1, 2), mask, 0.2)
    assert loss.item() == pytest.approx(-1.2) and clipfrac.item() == 1.0
    assert ratio.item() == pytest.approx(math.exp(0.5))
    # Same ratio, negative advantage: the unclipped term is the max, -(-1) * 1.65.
    loss, clipfrac, _, _ = ppo_policy_loss(torch.full((1, 2), 0.5), old, -torch.ones(1, 2), mask, 0.2)
    assert loss.item() == pytest.approx(math.exp(0.5), rel=1e-5) and clipfrac.item() == 0.0


def test_lr_multiplier_warmup_then_linear_decay():
    # 100 optimizer steps, 3% warm-up: 3 steps at 1/3, 2/3, 1, then (100 - s) / 97 down to 1/97.
    f = [lr_multiplier(s, 100, 0.03, "linear") for s in range(100)]
    assert f[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 97 / 97])
    assert f[50] == pytest.approx(50 / 97) and f[99] == pytest.approx(1 / 97)
    assert [lr_multiplier(s, 10, 0.25, "constant") for s in range(10)] == pytest.approx([1 / 3, 2 / 3] + [1.0] * 8)
    assert lr_multiplier(12, 10, 0.0, "linear") == 0.0


def test_chunked_logprobs_and_fixed_micro_batches(tiny_model, tokenizer):
    """Chunked log-probs equal the full-vocabulary softmax (same values for any chunk size); in_micro_batches
    puts each micro-batch's rows back in place, whatever the partition."""
    torch.manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (5, 2, 7, 3)]
    responses = [torch.randint(3, 1000, (n,)).tolist() for n in (4, 9, 1, 6)]
    batch = make_batch(prompts, responses, tokenizer.pad_token_id)
    m = batch.response_mask
    with torch.no_grad():
        logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).logits
        T, P = m.shape[1], batch.prompt_width
        want = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float() / 0.6, -1)
        want = want.gather(-1, batch.input_ids[:, P:, None]).squeeze(-1)
        lp = response_logprobs(tiny_model, batch, 0.6)
        assert torch.allclose(lp * m, want * m, atol=1e-5)
        assert torch.equal(response_logprobs(tiny_model, batch, 0.6, chunk=5), lp)
        for partition in (torch.arange(4).split(4), torch.tensor([2, 0, 3, 1]).split(2)):
            out = in_micro_batches(lambda b: response_logprobs(tiny_model, b, 0.6), batch, partition)
            assert torch.allclose(out * m, lp * m, atol=1e-5)


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12",
        "--num-mc-rollouts", "2", "--eval-every", "1"]


def test_max_estimated_steps_zero_is_allowed():
    args = tyro.cli(Args, args=TINY + ["--max-estimated-steps", "0"])
    check_args(args)
    assert args.max_estimated_steps == 0 and args.batch_size == 4


def test_vineppo_end_to_end(tmp_path):
    _, records = run_tiny("vineppo.py", tmp_path, *TINY)
    train = [r for r in records if "vine/continuations" in r]
    assert len(train) == 2 and all(r["vine/continuations"] >= 2 * 2 for r in train)  # >= the 2 prompt states x K
    # 2 steps x 2 epochs x 2 minibatches = 8 optimizer steps, the first of them warm-up (1/1). Each step logs the
    # lr of its first optimizer step: step 0 (the default rate), then step 4, decayed to (8 - 4) / (8 - 1) of it.
    lr = Args().learning_rate
    assert [r["charts/learning_rate"] for r in train] == pytest.approx([lr, lr * 4 / 7])
    assert all(r["losses/skipped"] == 0 for r in train)
