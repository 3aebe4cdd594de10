"""sveb_eval.py: the cut, fields and tiers, the error arithmetic, each estimator's adapter on synthetic problems
with known answers, the build's file (round trip, resume, interruption) and the whole script end to end."""

import contextlib
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import sveb_eval
from conftest import run_script
from hista import hista_group_values
from sveb_eval import (Args, choose_cut, correlation, critic_state_values, grpo_value, hista_value, mae_with_se,
                       new_numbers, numca_value, paired_difference, pass_tier, problem_field, prm_state_values,
                       tokens_before)


# ---- the cut ----
def test_choose_cut_picks_every_space_and_only_spaces():
    text = "a bc d  e"
    spaces = {i for i, ch in enumerate(text) if ch == " "}
    rng = random.Random(0)
    picks = [choose_cut(text, rng) for _ in range(400)]
    assert set(picks) == spaces
    counts = [picks.count(i) for i in sorted(spaces)]
    assert min(counts) > 400 / len(spaces) * 0.6  # roughly uniform
    assert choose_cut("nospace", rng) is None
    assert choose_cut("x y", random.Random(3)) == choose_cut("x y", random.Random(3))  # seeded


def test_tokens_before():
    # tokens "The", " sum", " is", " 5": ends 3, 7, 10, 12; cutting at the space at char 7 keeps 2 tokens
    ends = [3, 7, 10, 12]
    assert tokens_before(ends, 7) == 2
    assert tokens_before(ends, 3) == 1
    assert tokens_before(ends, 0) == 0
    assert tokens_before(ends, 8) == 2  # a space inside a token: the prefix ends before that token


def test_cut_lands_on_a_token_boundary_with_the_real_tokenizer(tokenizer):
    from vineppo import token_char_ends

    text = "First, 12 + 7 = 19. Then 19 + 30 = 49. So the answer is \\boxed{49}."
    ids = tokenizer.encode(text, add_special_tokens=False)
    ends = token_char_ends(tokenizer, ids)
    for i, ch in enumerate(text):
        if ch == " ":
            t = tokens_before(ends, i)
            assert tokenizer.decode(ids[:t]) == text[:i]  # the state is exactly the text before the space


# ---- fields, tiers, statistics ----
def test_new_numbers_and_field_tagging():
    q = "What is 12 + 7 + 30?"
    assert new_numbers(q, "12 + 7 = 19, 19 + 30 = 49") == {"19", "49"}
    short = "12 + 7 = 19, then 19 + 30 = 49. \\boxed{49}"
    long = "12 = 10 + 2, 7 + 2 = 9, 10 + 9 = 19 and 19 + 30 = 49. \\boxed{49}"  # new: 10, 2, 9, 19, 49
    assert problem_field(q, [short], [1.0]) == "other"
    assert problem_field(q, [long], [1.0]) == "number"
    assert problem_field(q, [long, short], [0.0, 1.0]) == "other"  # wrong responses do not count
    # together: {19, 49} and {5, 44} make 4 distinct new numbers
    assert problem_field(q, [short, "7 - 2 = 5, 44 + 5 = 49"], [1.0, 1.0]) == "number"
    assert problem_field(q, [long], [0.0]) == "other"  # no correct response
    assert problem_field(q, [long], [1.0], min_count=6) == "other"


def test_pass_tiers():
    assert [pass_tier(p) for p in (0.0, 0.125, 0.49, 0.5, 0.875, 1.0)] == \
        ["none right", "below half", "below half", "half or more", "half or more", "all right"]


def test_mae_with_se_hand_worked_and_naive():
    mae, se, n = mae_with_se([0.5, 0.2, 0.9], [0.25, 0.2, 0.5])
    # errors .25, 0, .4: mean .65/3; deviations .0333, -.2167, .1833 -> var (ddof 1) = .04083; se = sqrt(.04083/3)
    assert n == 3 and mae == pytest.approx(0.65 / 3)
    assert se == pytest.approx(math.sqrt(0.0408333 / 3), rel=1e-4)
    rng = np.random.default_rng(0)
    est, tru = rng.random(17), rng.random(17)
    errs = [abs(a - b) for a, b in zip(est, tru)]
    mean = sum(errs) / len(errs)
    var = sum((e - mean) ** 2 for e in errs) / (len(errs) - 1)
    assert mae_with_se(est, tru)[:2] == pytest.approx((mean, math.sqrt(var / len(errs))))
    assert math.isnan(mae_with_se([], [])[0]) and math.isnan(mae_with_se([0.1], [0.3])[1])


def test_paired_difference():
    a, b = [0.3, 0.1, 0.5, 0.2], [0.1, 0.1, 0.2, 0.4]  # differences .2, 0, .3, -.2: mean .075
    d = np.array([0.2, 0.0, 0.3, -0.2])
    assert paired_difference(a, b) == pytest.approx((0.075, d.std(ddof=1) / 2))
    assert math.isnan(paired_difference([0.1], [0.2])[1])


def test_correlation():
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3]))


# ---- the model-free estimators ----
def test_grpo_value_is_the_group_mean():
    assert grpo_value([1, 0, 0, 1]) == 0.5


def test_numca_value_reads_the_table_at_the_cut():
    texts = ["3 + 4 = 7 and then 7 + 5 = 12, so \\boxed{12}",  # milestones at 3, 4, 7, 5 (merged, min_gap 0)
             "3 + 4 = 7 so 7 + 5 = 13, \\boxed{13}",
             "3 + 5 = 8 then 8 + 4 = 12 \\boxed{12}"]
    rewards = [1.0, 0.0, 1.0]
    # state after "3 + 4 = 7": {3, 4, 7}, passed by responses 0 and 1 -> 0.5
    cut = texts[0].index(" and")
    assert numca_value(texts, rewards, 0, cut, min_gap=0) == pytest.approx(0.5)
    # before any number the state is the empty set: the group mean
    assert numca_value(texts, rewards, 0, 0, min_gap=0) == pytest.approx(2 / 3)
    # after "3 + 5": {3, 5} only response 2 -> 1.0
    assert numca_value(texts, rewards, 2, texts[2].index(" = 8"), min_gap=0) == pytest.approx(1.0)
    # with the paper's 50-character merge every early milestone moves to the last one before the answer
    assert numca_value(texts, rewards, 0, cut, min_gap=50) == pytest.approx(2 / 3)


# ---- Hista ----
def test_hista_value_hand_worked():
    # two responses of 10 constant hidden states, a = 0 and b = 3 (distance 3); rewards 1 and 0
    hidden = [torch.zeros(10, 1), torch.full((10, 1), 3.0)]
    args = Args(interval=5, window=5, ema_alpha=0.7, k_max=66, k_min=66, d_min=1.0)
    # state: response 0 cut at 5 tokens. Pool: its own prefix of 5 (distance 0 -> floor 1, weight 1), and
    # response 1's prefixes of 5 and 10 (distance 3, weight 1/3 each); its own prefix of 10 is longer: out.
    assert hista_value(hidden, [1.0, 0.0], 0, 5, args) == pytest.approx(1 / (1 + 2 / 3))
    assert hista_value(hidden, [1.0, 0.0], 0, 0, args) == pytest.approx(0.5)  # the first state: group mean


def test_hista_value_matches_the_training_code_at_its_states():
    torch.manual_seed(0)
    hidden = [torch.randn(n, 8) for n in (23, 17, 30, 12)]
    rewards = [1.0, 0.0, 0.0, 1.0]
    args = Args(interval=10, window=5, k_max=4, k_min=4, d_min=0.5)  # a constant k: the schedules agree
    values, _ = hista_group_values(hidden, rewards, args.interval, args.ema_alpha, args.window, args.k_max,
                                   args.k_min, args.d_min)
    for g, h in enumerate(hidden):
        for s, start in enumerate(range(0, h.shape[0], args.interval)):
            assert hista_value(hidden, rewards, g, start, args) == pytest.approx(values[g][s], rel=1e-5)


def test_hista_value_ignores_tokens_after_the_cut():
    torch.manual_seed(1)
    hidden = [torch.randn(20, 4) for _ in range(3)]
    changed = [h.clone() for h in hidden]
    changed[0][13:] += 100.0  # the cut response's future, past the partial window that ends at token 12
    args = Args(interval=5, window=5, k_max=3, k_min=3, d_min=0.1)
    # the pool still holds response 0's own prefixes up to the state (windows 1 and 2); the future is unseen
    assert hista_value(hidden, [1.0, 0.0, 1.0], 0, 12, args) == \
        pytest.approx(hista_value(changed, [1.0, 0.0, 1.0], 0, 12, args))


# ---- PPO-1 and PRIME read at the cut ----
class PositionCritic(nn.Module):
    """A stand-in critic whose value at each position is its position id: shows where values are read."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, input_ids, attention_mask, position_ids):
        return position_ids.float()


def test_critic_is_read_at_the_last_token_of_the_state():
    states = [{"prompt_ids": [5, 6, 7], "token_ids": [8, 9, 10, 11], "cut_tokens": 2},
              {"prompt_ids": [5], "token_ids": [8, 9], "cut_tokens": 0}]
    values = critic_state_values(PositionCritic(), states, Args(micro_batch_size=1), 0, contextlib.nullcontext)
    # state 0: prompt (positions 0-2) + 2 response tokens (3-4): the value sits at position 4;
    # state 1: the bare prompt: its last token, position 0
    assert values == [4.0, 0.0]


def test_prm_value_is_one_half_when_the_prm_is_the_reference(tiny_model, tokenizer):
    states = [{"prompt_ids": [1, 2, 3], "token_ids": [4, 5, 6, 7], "cut_tokens": 3}]
    values = prm_state_values(tiny_model, tiny_model, states, Args(), 0.7, tokenizer.pad_token_id,
                              contextlib.nullcontext)
    assert values == [pytest.approx(0.5)]


def test_prm_value_depends_only_on_the_prefix(tiny_model, tokenizer):
    from common.models import TINY_MODEL, load_model

    prm = load_model(TINY_MODEL)
    with torch.no_grad():
        for p in prm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    states = [{"prompt_ids": [1, 2, 3], "token_ids": [4, 5, 6, 7, 8], "cut_tokens": 3},
              {"prompt_ids": [1, 2, 3], "token_ids": [4, 5, 6, 99, 98, 97], "cut_tokens": 3},
              {"prompt_ids": [1, 2, 3], "token_ids": [4, 5, 6, 7, 8], "cut_tokens": 4}]
    v = prm_state_values(prm, tiny_model, states, Args(), 0.7, tokenizer.pad_token_id, contextlib.nullcontext)
    assert v[0] == pytest.approx(v[1], abs=1e-6)
    assert v[0] != pytest.approx(v[2], abs=1e-6)
    assert v[0] != pytest.approx(0.5, abs=1e-6)


# ---- the build's cut and Monte Carlo values, with a generator whose outputs are known ----
class ScriptedGenerator:
    """Responses: one fixed correct solution. Continuations from a state: the j-th is right when j is even,
    so k continuations are worth ceil(k / 2) / k."""

    def __init__(self, tokenizer, prompts):
        self.tok, self.prompts = tokenizer, [tuple(p) for p in prompts]

    def completion(self, text):
        from common.generation import Completion

        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        return Completion(ids, text, True)

    def generate(self, inputs, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=None):
        if all(tuple(x) in self.prompts for x in inputs):
            return [[self.completion("2 + 3 = 5. So the answer is \\boxed{5}") for _ in range(n)] for _ in inputs]
        return [[self.completion(" \\boxed{5}" if j % 2 == 0 else " \\boxed{4}") for j in range(n)] for _ in inputs]


def test_build_chunk_cut_and_monte_carlo_values_are_exact(tokenizer):
    from common.data import Problem, prompt_ids

    problems = [Problem("What is 2 + 3?", "5"), Problem("What is 1 + 4?", "5")]
    args = Args(group_size=3, num_truth=4, mc_k=3, max_new_tokens=64)
    gen = ScriptedGenerator(tokenizer, [prompt_ids(tokenizer, p.question) for p in problems])
    records = sveb_eval.build_chunk([("bench", i, p) for i, p in enumerate(problems)], gen, tokenizer, args)
    for r in records:
        assert [x["reward"] for x in r["responses"]] == [1.0, 1.0, 1.0]
        text = r["responses"][0]["text"]
        assert r["cut_response"] == 0 and text[r["cut_space"]] == " "
        assert r["cut_text"] == text[: r["cut_space"]] and r["cut_char"] == r["cut_space"]
        assert (r["truth"], r["mc1"], r["mc2"], r["mck"]) == (0.5, 1.0, 0.5, pytest.approx(2 / 3))


# ---- the build file ----
def tiny_args(tmp_path, **kw):
    args = Args(model="tiny-random", dataset="arithmetic", output_dir=str(tmp_path), num_problems=2,
                group_size=2, num_truth=2, mc_k=2, num_train_problems=1, max_new_tokens=8, chunk_size=1, **kw)
    sveb_eval.check_args(args)
    return args


def test_build_round_trips_and_resumes(tmp_path, monkeypatch, capsys):
    args = tiny_args(tmp_path)
    sveb_eval.build(args)
    header, records = sveb_eval.read_bench(args.bench_file)
    assert header == sveb_eval.build_config(args)
    bench = [r for r in records if r["kind"] == "bench"]
    assert sorted(r["index"] for r in bench) == [0, 1] and sum(r["kind"] == "train" for r in records) == 1
    for r in bench:
        assert len(r["responses"]) == 2 and all(len(x["token_ids"]) > 0 for x in r["responses"])
        assert 0 <= r["cut_tokens"] <= len(r["responses"][r["cut_response"]]["token_ids"])
        assert all(0.0 <= r[k] <= 1.0 for k in ("truth", "mc1", "mc2", "mck"))
        if r["cut_space"] is not None:
            assert r["responses"][r["cut_response"]]["text"][r["cut_space"]] == " "
    full = open(args.bench_file).read()

    # a second run finds everything built and loads no model
    monkeypatch.setattr(sveb_eval, "load_model", lambda *a, **k: pytest.fail("the build redid work"))
    sveb_eval.build(args)
    assert open(args.bench_file).read() == full
    monkeypatch.undo()

    # interrupted after the first problem, mid-line: the resumed build writes exactly what was missing
    lines = full.splitlines(keepends=True)
    with open(args.bench_file, "w") as f:
        f.write("".join(lines[:2]) + lines[2][:40])
    sveb_eval.build(args)
    assert open(args.bench_file).read() == full


def test_build_refuses_a_file_made_with_other_settings(tmp_path):
    args = tiny_args(tmp_path)
    sveb_eval.build(args)
    other = tiny_args(tmp_path, temperature=0.9)
    with pytest.raises(SystemExit, match="other settings"):
        sveb_eval.build(other)


def test_end_to_end_on_the_tiny_model(tmp_path):
    proc = run_script("sveb_eval.py", "--model", "tiny-random", "--dataset", "arithmetic", "--output-dir",
                      str(tmp_path), "--num-problems", "3", "--group-size", "2", "--num-truth", "2", "--mc-k", "2",
                      "--num-train-problems", "2", "--max-new-tokens", "8", "--steps-batch", "2",
                      "--minibatch-size", "2", "--micro-batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "sveb_results.json").read_text())
    assert set(results["mae"]) == set(sveb_eval.ESTIMATORS)
    for name, m in results["mae"].items():
        assert m["all"][2] == 3 and 0 <= m["all"][0] <= 1, name
    assert "PPO-1/lam1" in results["critic_collapse"]
    assert (tmp_path / "sveb_mae.png").stat().st_size > 1000
    assert "| GRPO |" in (tmp_path / "sveb_table.md").read_text()
    # eval alone, a subset of estimators, from the same file
    proc = run_script("sveb_eval.py", "--stage", "eval", "--output-dir", str(tmp_path), "--estimators", "GRPO", "Numca")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads((tmp_path / "sveb_results.json").read_text())["mae"]) == {"GRPO", "Numca"}


def test_clear_errors(tmp_path):
    proc = run_script("sveb_eval.py", "--stage", "eval", "--output-dir", str(tmp_path))
    assert proc.returncode != 0 and "run the build stage first" in proc.stderr
    proc = run_script("sveb_eval.py", "--stage", "build", "--group-size", "0", "--output-dir", str(tmp_path))
    assert proc.returncode != 0 and "--group-size must be >= 1" in proc.stderr
    proc = run_script("sveb_eval.py", "--estimators", "Numca", "Oracle", "--output-dir", str(tmp_path))
    assert proc.returncode != 0 and "unknown estimator(s) ['Oracle']" in proc.stderr
    assert not (tmp_path / "bench.jsonl").exists()  # refused before any build
