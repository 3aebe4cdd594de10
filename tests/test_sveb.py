"""sveb_eval.py: the cut, the population and tiers, fields, MCS@k, the error arithmetic, each estimator's adapter on
synthetic problems with known answers, the paper's critic protocol piece by piece, the build's file (round trip,
resume, interruption, refusal), the whole script end to end, and bad input (every out-of-range flag, a missing,
empty or wrong file or model: one line that starts with "error:", a non-zero exit, nothing written)."""

import contextlib
import dataclasses
import json
import math
import random
import typing
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tyro
from torch import nn

import prime_implicit_prm as prime
import sveb_eval
from conftest import run_script
from hista import hista_group_values
from sveb_eval import (Args, BestCheckpoint, CriticOnHidden, choose_cut, correlation, cosine_lr_multiplier,
                       critic_problem, critic_state_values, critic_values, grpo_value, heldout_split, hista_value,
                       mae_with_se, masked_mse, mcs_value, new_numbers, numca_value, paired_difference, pass_tier,
                       problem_field, prm_state_values, tokens_before, value_targets)


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


# ---- population, tiers, training filters, the split ----
def test_pass_tier_boundaries_exactly_as_the_paper():
    # (0.07, 0.17] -> "0717", (0.17, 0.37] -> "1737", (0.37, 0.77] -> "3777"; lower ends open, upper ends closed
    assert pass_tier(0.07) is None and pass_tier(0.0) is None
    assert pass_tier(0.0700001) == "0717" and pass_tier(0.17) == "0717"
    assert pass_tier(0.1700001) == "1737" and pass_tier(0.37) == "1737"
    assert pass_tier(0.3700001) == "3777" and pass_tier(0.77) == "3777"
    assert pass_tier(0.7700001) is None and pass_tier(1.0) is None
    # with the paper's 20 pre-samples: k right out of 20
    tiers = [pass_tier(k / 20) for k in range(21)]
    assert tiers == [None, None] + ["0717"] * 2 + ["1737"] * 4 + ["3777"] * 8 + [None] * 5


def test_critic_problem_filter():
    # (0, 0.77]: problems with some right answer, not too easy
    assert [critic_problem(p) for p in (0.0, 0.05, 0.5, 0.77, 0.8, 1.0)] == [False, True, True, True, False, False]


def test_heldout_split():
    train, held = heldout_split(20, 0.2, seed=3)
    assert len(train) == 16 and len(held) == 4 and sorted(train + held) == list(range(20))
    assert heldout_split(20, 0.2, seed=3) == (train, held)  # seeded
    assert heldout_split(20, 0.2, seed=4) != (train, held)
    assert [len(x) for x in heldout_split(2, 0.2, 0)] == [1, 1]  # at least one on each side
    assert [len(x) for x in heldout_split(4, 0.2, 0)] == [3, 1]  # (the official len // 5 * 4 would train on none)
    assert [len(x) for x in heldout_split(29, 0.2, 0)] == [23, 6]


def test_training_sets_apply_each_estimators_filter():
    def problem(index, right):  # 10 pre-samples, `right` of them correct
        return {"index": index, "prompt_ids": [index], "pass_rate": right / 10,
                "responses": [{"token_ids": [j], "reward": float(j < right)} for j in range(10)]}

    train = [problem(i, right) for i, right in enumerate([0, 1, 2, 5, 8, 9, 10])]
    sets = sveb_eval.training_sets(train, Args(seed=0))
    # PPO-1: pass rate in (0, 0.77]: 0.1, 0.2, 0.5 -> 3 problems; PRIME: [0.2, 0.8]: 0.2, 0.5, 0.8 -> 3 problems
    assert sets["critic_problems"] == 3 and sets["prm_problems"] == 3
    assert {r["prompt_ids"][0] for r in sets["critic_train"] + sets["critic_heldout"]} == {1, 2, 3}
    assert not {r["prompt_ids"][0] for r in sets["critic_train"]} & {r["prompt_ids"][0] for r in sets["critic_heldout"]}
    assert len(sets["critic_train"]) + len(sets["critic_heldout"]) == 30  # every sample, right and wrong
    assert {r["prompt_ids"][0] for r in sets["prm"]} == {2, 3, 4} and len(sets["prm"]) == 30
    everything = sveb_eval.training_sets(train, Args(seed=0, train_filters=False))
    assert everything["critic_problems"] == everything["prm_problems"] == 7


# ---- MCS@k ----
def test_mcs_value_subsamples_the_truths_own_continuations():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0]
    rng = random.Random(7)
    picked = random.Random(7).sample(range(5), 2)
    assert mcs_value(rewards, 2, rng) == pytest.approx(np.mean([rewards[i] for i in picked]))
    assert mcs_value(rewards, 5, random.Random(0)) == pytest.approx(0.6)  # k = n: the ground truth itself
    assert mcs_value([1.0, 1.0, 1.0], 2, random.Random(0)) == 1.0
    assert mcs_value(rewards, 1, random.Random(1)) in (0.0, 1.0)
    # hand-worked distribution of MCS@2 over [1, 1, 0, 0]: of the 6 pairs, 1 gives 1.0, 4 give 0.5, 1 gives 0.0
    draws = [mcs_value([1.0, 1.0, 0.0, 0.0], 2, random.Random(s)) for s in range(3000)]
    for value, share in ((1.0, 1 / 6), (0.5, 4 / 6), (0.0, 1 / 6)):
        assert draws.count(value) / len(draws) == pytest.approx(share, abs=0.03)
    # without replacement: MCS@2 of [1, 0] is always exactly 0.5 (with replacement it would be 0 or 1 half the time)
    assert {mcs_value([1.0, 0.0], 2, random.Random(s)) for s in range(20)} == {0.5}


# ---- fields, statistics ----
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


def test_numca_table_counts_the_unmerged_states():
    # A writes 5, then 6 far away: it reads the state {5}. B writes "5 6" close together: with a 50-character
    # merge it READS only {5, 6}, but it PASSED {5}, and the table counts that: V({5}) = mean(1, 0).
    a = "5 is where we start" + " and then a long sentence without any digit in it at all" + " 6 next, \\boxed{11}"
    b = "5 6 so \\boxed{11}"
    cut = a.index(" where")
    assert numca_value([a, b], [1.0, 0.0], 0, cut, min_gap=50) == pytest.approx(0.5)



# ---- Hista ----
def test_hista_value_hand_worked():
    # no prompt; two responses of 10 constant hidden states, a = 0 and b = 3 (distance 3); rewards 1 and 0
    hidden = [torch.zeros(10, 1), torch.full((10, 1), 3.0)]
    args = Args(interval=5, window=5, ema_alpha=0.7, k_max=66, k_min=66, d_min=1.0)
    # state: response 0 cut at 5 tokens. Pool: its own prefix of 5 (distance 0 -> floor 1, weight 1), and
    # response 1's prefixes of 5 and 10 (distance 3, weight 1/3 each); its own prefix of 10 is longer: out.
    assert hista_value(hidden, 0, [1.0, 0.0], 0, 5, args) == pytest.approx(1 / (1 + 2 / 3))
    assert hista_value(hidden, 0, [1.0, 0.0], 0, 0, args) == pytest.approx(0.5)  # the first state: group mean


def test_hista_value_matches_the_training_code_at_its_states():
    torch.manual_seed(0)
    prompt = torch.randn(7, 8)
    hidden = [torch.cat([prompt, torch.randn(n, 8)]) for n in (23, 17, 30, 12)]  # (P + T_g, D), the same prompt
    rewards = [1.0, 0.0, 0.0, 1.0]
    args = Args(interval=10, window=5, k_max=4, k_min=4, d_min=0.5)  # a constant k: the schedules agree
    values, _ = hista_group_values(hidden, 7, rewards, args.interval, args.ema_alpha, args.window, args.k_max,
                                   args.k_min, args.d_min)
    for g, h in enumerate(hidden):
        for s, start in enumerate(range(0, h.shape[0] - 7, args.interval)):
            assert hista_value(hidden, 7, rewards, g, start, args) == pytest.approx(values[g][s], rel=1e-5)


def test_hista_value_ignores_tokens_after_the_cut():
    torch.manual_seed(1)
    hidden = [torch.randn(24, 4) for _ in range(3)]  # 4 prompt tokens (different here: only the cut matters)
    changed = [h.clone() for h in hidden]
    changed[0][4 + 13 :] += 100.0  # the cut response's future, past the partial window that ends at token 12
    args = Args(interval=5, window=5, k_max=3, k_min=3, d_min=0.1)
    # the pool still holds response 0's own prefixes up to the state (windows 1 and 2); the future is unseen
    assert hista_value(hidden, 4, [1.0, 0.0, 1.0], 0, 12, args) == \
        pytest.approx(hista_value(changed, 4, [1.0, 0.0, 1.0], 0, 12, args))

# ---- PPO-1: the official critic, piece by piece ----
def test_zero_initialised_bias_free_head_gives_zero_before_training(tiny_model, tokenizer):
    from common.models import TINY_MODEL, load_model

    critic = CriticOnHidden(load_model(TINY_MODEL).get_decoder(), tiny_model.config.hidden_size)
    assert critic.head.bias is None and torch.all(critic.head.weight == 0)
    batch = sveb_eval.ppo.make_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]], tokenizer.pad_token_id)
    values = critic_values(critic, tiny_model, batch)
    assert values.shape == batch.input_ids.shape and torch.all(values == 0)
    # the value head is the only path to V; the backbone reads the frozen policy's hidden states, not token ids
    assert critic_values(critic, tiny_model, batch).requires_grad


def gae_targets_loop(values, mask, scores, lam):
    """GAE targets (gamma 1) one row at a time over its contiguous real columns, in plain Python."""
    out = [[0.0] * len(values[0]) for _ in values]
    for i, (v, m) in enumerate(zip(values, mask)):
        cols = [j for j, x in enumerate(m) if x]
        adv = 0.0
        for n, j in reversed(list(enumerate(cols))):
            reward = scores[i] if n == len(cols) - 1 else 0.0
            next_v = v[cols[n + 1]] if n + 1 < len(cols) else 0.0
            adv = reward + next_v - v[j] + lam * adv
            out[i][j] = adv + v[j]
    return out


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.5])
def test_value_targets_over_every_non_padding_token(lam):
    torch.manual_seed(0)
    # left-padded prompts, right-padded responses: real columns 2-5, 0-6, 3-4
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]])
    values = torch.randn(3, 7)  # junk on padding must not leak in
    scores = torch.tensor([1.0, 0.0, 1.0])
    targets = value_targets(values, mask, scores, lam)
    assert torch.allclose(targets, torch.tensor(gae_targets_loop(values.tolist(), mask.tolist(), scores.tolist(), lam)),
                          atol=1e-5)
    assert torch.all(targets[mask == 0] == 0)
    if lam == 1.0:  # gamma = lambda = 1: the outcome at every real token, prompt included
        assert torch.allclose(targets, scores[:, None] * mask, atol=1e-5)


def test_value_targets_hand_worked():
    # one row, 3 real tokens after one pad, values .5 .25 .75, outcome 1; lambda 0: one-step TD targets
    # V(t+1) at t, the outcome at the last token: .25, .75, 1
    targets = value_targets(torch.tensor([[9.0, 0.5, 0.25, 0.75]]), torch.tensor([[0, 1, 1, 1]]), torch.tensor([1.0]),
                            0.0)
    assert torch.allclose(targets, torch.tensor([[0.0, 0.25, 0.75, 1.0]]))


def test_masked_mse_against_a_naive_loop():
    torch.manual_seed(1)
    values, targets = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    errors = [(values[i, j].item() - targets[i, j].item()) ** 2 for i in range(3) for j in range(6) if mask[i, j]]
    assert masked_mse(values, targets, mask).item() == pytest.approx(sum(errors) / len(errors), rel=1e-6)


def test_critic_loss_is_the_batch_token_mean_whatever_the_micro_batches(tiny_model, tokenizer):
    from common.models import TINY_MODEL, load_model

    torch.manual_seed(0)
    critic = CriticOnHidden(load_model(TINY_MODEL).get_decoder(), tiny_model.config.hidden_size)
    with torch.no_grad():
        critic.head.weight.normal_(std=0.1)
    batch = sveb_eval.ppo.make_batch([[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11, 12], [13]], tokenizer.pad_token_id)
    scores = torch.tensor([1.0, 0.0, 1.0])
    grads = []
    for micro in (1, 3):
        critic.zero_grad()
        sse, tokens = sveb_eval.critic_loss_sums(critic, tiny_model, batch, scores, 0.95, micro, contextlib.nullcontext,
                                                 backward_scale=float(batch.attention_mask.sum()))
        grads.append(critic.head.weight.grad.clone())
        assert tokens == int(batch.attention_mask.sum()) == 3 + 2 + 1 + 4 + 2 + 1
    # the same loss and gradient, one row at a time or all three at once
    values = critic_values(critic, tiny_model, batch).detach()
    whole = masked_mse(values, value_targets(values, batch.attention_mask, scores, 0.95), batch.attention_mask)
    assert sse / tokens == pytest.approx(float(whole), rel=1e-4)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_cosine_schedule_hand_worked():
    # 20 steps, 5% warm-up: w = 1 step at full lr, then a half cosine from 1 to 0.1 over the remaining 19
    f = [cosine_lr_multiplier(s, 20, 0.05, 0.1) for s in range(20)]
    assert f[0] == 1.0 and f[1] == pytest.approx(1.0)
    assert f[1 + 19 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 19)))
    assert f[19] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 18 / 19)))
    assert all(a >= b for a, b in zip(f[1:], f[2:]))  # falls after the warm-up
    # 100 steps: 5 warm-up steps 0.2, 0.4, ..., 1
    assert [cosine_lr_multiplier(s, 100, 0.05, 0.1) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert cosine_lr_multiplier(100, 100, 0.05, 0.1) == pytest.approx(0.1)  # the floor


def test_best_checkpoint_keeps_the_lowest_held_out_loss():
    layer, best = nn.Linear(2, 1), BestCheckpoint()
    for step, (weight, loss) in enumerate([(1.0, 0.5), (2.0, 0.3), (3.0, 0.4), (4.0, 0.3), (5.0, float("nan"))], 1):
        with torch.no_grad():
            layer.weight.fill_(weight)
        best.update(loss, step, layer)
    best.restore(layer)
    assert best.step == 2 and best.loss == 0.3 and torch.all(layer.weight == 2.0)  # a tie keeps the earlier one


def test_train_critic_restores_its_best_held_out_checkpoint(tiny_model, tokenizer):
    from common.models import TINY_MODEL, load_model

    torch.manual_seed(0)
    rows = [{"prompt_ids": [1, 2, i], "token_ids": [3 + i, 4, 5][: 1 + i % 3], "reward": float(i % 2)}
            for i in range(10)]
    held = [{"prompt_ids": [2, 1], "token_ids": [6, 7], "reward": 1.0},
            {"prompt_ids": [9], "token_ids": [8], "reward": 0.0}]
    critic = CriticOnHidden(load_model(TINY_MODEL).get_decoder(), tiny_model.config.hidden_size)
    args = Args(critic_batch_size=4, critic_learning_rate=1e-2, critic_eval_every=1, micro_batch_size=2)
    info = sveb_eval.train_critic(critic, tiny_model, rows, held, 1.0, args, tokenizer.pad_token_id,
                                  contextlib.nullcontext)
    assert info["optimizer_steps"] == 3 and [s for s, _ in info["heldout_loss"]] == [1, 2, 3]  # ceil(10 / 4)
    losses = dict(info["heldout_loss"])
    assert info["best_step"] == min(losses, key=losses.get) and info["best_heldout_loss"] == min(losses.values())
    # the critic left behind is the best one: its held-out loss is the best recorded
    batch = sveb_eval.ppo.make_batch([r["prompt_ids"] for r in held], [r["token_ids"] for r in held],
                                     tokenizer.pad_token_id)
    sse, tokens = sveb_eval.critic_loss_sums(critic, tiny_model, batch, torch.tensor([1.0, 0.0]), 1.0, 2,
                                             contextlib.nullcontext)
    assert sse / tokens == pytest.approx(info["best_heldout_loss"], rel=1e-5)
    assert not torch.all(critic.head.weight == 0)  # it trained


class PositionPolicy:
    """A stand-in frozen policy whose 'hidden state' at each column is its position id."""

    def get_decoder(self):
        return lambda input_ids, attention_mask, position_ids, use_cache: SimpleNamespace(
            last_hidden_state=position_ids.float()[..., None])


class PositionCritic(nn.Module):
    """A stand-in critic that returns its input: shows where values are read."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, hidden, attention_mask, position_ids):
        return hidden[..., 0]


def test_critic_is_read_at_the_last_token_of_the_state():
    states = [{"prompt_ids": [5, 6, 7], "token_ids": [8, 9, 10, 11], "cut_tokens": 2},
              {"prompt_ids": [5], "token_ids": [8, 9], "cut_tokens": 0}]
    for micro in (1, 2):
        values = critic_state_values(PositionCritic(), PositionPolicy(), states, Args(micro_batch_size=micro), 0,
                                     contextlib.nullcontext)
        # state 0: prompt (positions 0-2) + 2 response tokens (3-4): the value sits at position 4;
        # state 1: the bare prompt: its last token, position 0
        assert values == [4.0, 0.0]


# ---- PRIME ----
def test_prm_value_is_one_half_when_the_prm_is_the_reference(tiny_model, tokenizer):
    states = [{"prompt_ids": [1, 2, 3], "token_ids": [4, 5, 6, 7], "cut_tokens": 3}]
    values = prm_state_values(tiny_model, tiny_model, states, Args(), tokenizer.pad_token_id, contextlib.nullcontext)
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
    v = prm_state_values(prm, tiny_model, states, Args(), tokenizer.pad_token_id, contextlib.nullcontext)
    assert v[0] == pytest.approx(v[1], abs=1e-6)
    assert v[0] != pytest.approx(v[2], abs=1e-6)
    assert v[0] != pytest.approx(0.5, abs=1e-6)
    # log-probs at T = 1, as prime_implicit_prm.py reads them: beta times the raw log-ratio over the prefix
    batch = prime.make_batch([s["prompt_ids"] for s in states], [s["token_ids"] for s in states],
                             tokenizer.pad_token_id)
    with torch.no_grad():
        log_ratio = prime.response_logprobs(prm, batch, 1.0) - prime.response_logprobs(tiny_model, batch, 1.0)
    ratio = log_ratio[0, :3].sum()
    assert v[0] == pytest.approx(float(torch.sigmoid(Args().beta * ratio)), abs=1e-5)


def test_train_prm_uses_primes_settings(tiny_model, tokenizer, monkeypatch):
    from common.models import TINY_MODEL, load_model

    seen = {}
    adamw = torch.optim.AdamW

    def spy_adamw(params, **kw):
        seen.update(kw)
        return adamw(params, **kw)

    clips = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.optim, "AdamW", spy_adamw)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda p, max_norm: clips.append(max_norm) or clip(p, max_norm))
    rows = [{"prompt_ids": [1, 2, i], "token_ids": [3, 4 + i], "reward": float(i % 2)} for i in range(6)]
    info = sveb_eval.train_prm(load_model(TINY_MODEL), tiny_model, rows, Args(prm_batch_size=4, prm_minibatch_size=2,
                               micro_batch_size=1), tokenizer.pad_token_id, contextlib.nullcontext)
    assert seen == {"lr": prime.Args.prm_learning_rate, "eps": 1e-8, "weight_decay": 0.0}
    assert clips == [10.0] * 3  # batches of 4 and 2, minibatches of 2: 3 optimizer steps, clipped at 10
    assert info["prm_steps"] == 2 and len(info["prm_accuracy_per_step"]) == 2
    assert all(0 <= a <= 1 for a in info["prm_accuracy_per_step"])


# ---- the build: pre-samples, population, cut and ground truth, with a generator whose outputs are known ----
class ScriptedGenerator:
    """Responses to a prompt: the j-th of n is right when j < round(rate * n), with `rate` set per prompt.
    Continuations from a state: the j-th is right when j is even, so k continuations are worth ceil(k / 2) / k."""

    def __init__(self, tokenizer, rates: dict[tuple, float]):
        self.tok, self.rates = tokenizer, rates

    def completion(self, text):
        from common.generation import Completion

        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        return Completion(ids, text, True)

    def generate(self, inputs, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=None):
        if all(tuple(x) in self.rates for x in inputs):
            return [[self.completion(f"2 + 3 = {5 if j < round(self.rates[tuple(x)] * n) else 6}. So the answer is "
                                     f"\\boxed{{{5 if j < round(self.rates[tuple(x)] * n) else 6}}}") for j in range(n)]
                    for x in inputs]
        return [[self.completion(" \\boxed{5}" if j % 2 == 0 else " \\boxed{4}") for j in range(n)] for _ in inputs]


def scripted(tokenizer, rates):
    from common.data import Problem, prompt_ids

    problems = [Problem(f"What is 2 + 3? ({i})", "5") for i in range(len(rates))]
    prompts = [tuple(prompt_ids(tokenizer, p.question)) for p in problems]
    return problems, ScriptedGenerator(tokenizer, dict(zip(prompts, rates)))


def test_build_chunk_population_cut_and_ground_truth_are_exact(tokenizer):
    # pre-sample pass rates 1/20, 4/20, 16/20: only the middle one is in (0.07, 0.77]
    problems, gen = scripted(tokenizer, [0.05, 0.2, 0.8])
    args = Args(num_presamples=20, group_size=5, num_truth=4, max_new_tokens=64)
    records = sveb_eval.build_chunk([("bench", i, p) for i, p in enumerate(problems)], gen, tokenizer, args)
    assert [r["pass_rate"] for r in records] == [0.05, 0.2, 0.8]
    assert [r["tier"] for r in records] == [None, "1737", None]
    assert [("responses" in r, "truth" in r) for r in records] == [(False, False), (True, True), (False, False)]
    r = records[1]
    assert len(r["presample_rewards"]) == 20 and sum(r["presample_rewards"]) == 4
    assert [x["reward"] for x in r["responses"]] == [1.0, 0.0, 0.0, 0.0, 0.0]  # G = 5 fresh responses, 1 right
    text = r["responses"][0]["text"]
    assert r["cut_response"] == 0 and text[r["cut_space"]] == " "
    assert r["cut_text"] == text[: r["cut_space"]] and r["cut_char"] == r["cut_space"]
    assert r["truth_rewards"] == [1.0, 0.0, 1.0, 0.0] and r["truth"] == 0.5
    # --population all builds every problem
    everything = sveb_eval.build_chunk([("bench", i, p) for i, p in enumerate(problems)], gen, tokenizer,
                                       Args(num_presamples=20, group_size=5, num_truth=4, max_new_tokens=64,
                                            population="all"))
    assert all("truth" in r for r in everything) and [r["tier"] for r in everything] == [None, "1737", None]
    # training problems keep their pre-samples as their responses, and nothing else is sampled for them
    train = sveb_eval.build_chunk([("train", i, p) for i, p in enumerate(problems)], gen, tokenizer, args)
    assert [sum(x["reward"] for x in t["responses"]) for t in train] == [1, 4, 16]
    assert all("truth" not in t and "tier" not in t for t in train)


def test_continuation_rewards_follow_vineppos_rule(tokenizer):
    from vineppo import estimate_values

    problems, gen = scripted(tokenizer, [0.5])
    prompt = list(next(iter(gen.rates)))
    response = tokenizer.encode("2 + 3 = 5. So the answer is", add_special_tokens=False)
    for k in (1, 2, 5):
        rewards = sveb_eval.continuation_rewards(gen, tokenizer, [prompt], [response[:4]], ["5"], ["What is 2 + 3?"], k,
                                                 64, 0.7, 1.0, 0)
        values, _ = estimate_values(gen, tokenizer, [prompt], [response], [[4]], ["5"], k, 64, 0.7, 1.0, 0,
                                    questions=["What is 2 + 3?"])
        assert len(rewards[0]) == k and np.mean(rewards[0]) == pytest.approx(values[0][0])


# ---- the build file ----
def tiny_args(tmp_path, **kw):
    settings = dict(model="tiny", dataset="arithmetic", output_dir=str(tmp_path), num_problems=2,
                    num_presamples=2, group_size=2, num_truth=2, mc_k=2, num_train_problems=1, max_new_tokens=8,
                    chunk_size=1, population="all")
    args = Args(**(settings | kw))
    sveb_eval.check_args(args)
    return args


def test_build_round_trips_and_resumes(tmp_path, monkeypatch):
    args = tiny_args(tmp_path)
    sveb_eval.build(args)
    header, records = sveb_eval.read_bench(args.bench_file)
    assert header == sveb_eval.build_config(args)
    bench = [r for r in records if r["kind"] == "bench"]
    assert sorted(r["index"] for r in bench) == [0, 1] and sum(r["kind"] == "train" for r in records) == 1
    for r in bench:
        assert len(r["presample_rewards"]) == 2 and r["pass_rate"] == np.mean(r["presample_rewards"])
        assert len(r["responses"]) == 2 and all(len(x["token_ids"]) > 0 for x in r["responses"])
        assert 0 <= r["cut_tokens"] <= len(r["responses"][r["cut_response"]]["token_ids"])
        assert len(r["truth_rewards"]) == 2 and r["truth"] == np.mean(r["truth_rewards"])
        if r["cut_space"] is not None:
            assert r["responses"][r["cut_response"]]["text"][r["cut_space"]] == " "
    (train,) = [r for r in records if r["kind"] == "train"]
    assert len(train["responses"]) == 2 and train["pass_rate"] == np.mean([x["reward"] for x in train["responses"]])
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
    for change in (dict(temperature=0.9), dict(num_presamples=3), dict(population="paper")):
        with pytest.raises(SystemExit, match="other settings"):
            sveb_eval.build(tiny_args(tmp_path, **change))


def test_build_and_eval_refuse_a_file_of_the_previous_format(tmp_path):
    args = tiny_args(tmp_path)
    old = {k: v for k, v in sveb_eval.build_config(args).items() if k not in ("format", "num_presamples", "population")}
    with open(args.bench_file, "w") as f:
        f.write(json.dumps({"kind": "header", "config": old | {"mc_k": 2}}) + "\n")
    with pytest.raises(SystemExit, match=r"other settings \(format: file None vs now 2"):
        sveb_eval.build(args)
    with pytest.raises(SystemExit, match="another version of sveb_eval.py"):
        sveb_eval.evaluate(args)


def test_end_to_end_on_the_tiny_model(tmp_path):
    # the tiny random model solves nothing: build every problem and train on every training problem
    proc = run_script("sveb_eval.py", "--model", "tiny", "--dataset", "arithmetic", "--output-dir",
                      str(tmp_path), "--num-problems", "3", "--num-presamples", "2", "--population", "all",
                      "--group-size", "2", "--num-truth", "3", "--mc-k", "3", "--num-train-problems", "2",
                      "--max-new-tokens", "8", "--no-train-filters", "--critic-batch-size", "2",
                      "--critic-eval-every", "1", "--prm-batch-size", "2", "--prm-minibatch-size", "2",
                      "--micro-batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "sveb_results.json").read_text())
    assert set(results["mae"]) == set(sveb_eval.ESTIMATORS)
    for name, m in results["mae"].items():
        assert m["all"][2] == 3 and 0 <= m["all"][0] <= 1, name
    assert results["population"]["candidates"] == 3 and "outside" in results["tiers"]
    assert results["mae"]["MCS@K"]["all"][0] == 0.0  # MCS@3 of 3 continuations is the ground truth itself
    c = results["training"]["PPO-1/lam1"]
    assert c["train_responses"] == 2 and c["heldout_responses"] == 2 and c["optimizer_steps"] == 1  # 1 of 2 problems
    assert "PPO-1/lam1" in results["critic_collapse"]
    assert (tmp_path / "sveb_mae.png").stat().st_size > 1000
    table = (tmp_path / "sveb_table.md").read_text()
    assert "| GRPO |" in table and "Population: 0 of 3 pre-sampled problems" in table
    # eval alone, a subset of estimators, from the same file
    proc = run_script("sveb_eval.py", "--stage", "eval", "--output-dir", str(tmp_path), "--estimators", "GRPO", "Numca",
                      "MCS@1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads((tmp_path / "sveb_results.json").read_text())["mae"]) == {"GRPO", "Numca", "MCS@1"}
    # with the training filters on, this model's problems (none right) cannot train PPO-1: one clear line
    proc = run_script("sveb_eval.py", "--stage", "eval", "--output-dir", str(tmp_path), "--estimators", "PPO-1/lam1")
    assert proc.returncode != 0 and "PPO-1 needs at least 2 training problems" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- bad input: one line that starts with "error:", a non-zero exit, nothing written ----
TINY = ["--model", "tiny", "--dataset", "arithmetic", "--num-problems", "2", "--num-presamples", "2",
        "--group-size", "2", "--num-truth", "2", "--mc-k", "2", "--num-train-problems", "1", "--max-new-tokens", "8",
        "--population", "all", "--no-train-filters"]


@pytest.fixture
def bad_files(tmp_path):
    """Placeholder -> a path: files and folders a user might pass by mistake."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "noanswer.jsonl").write_text('{"question": "What is 1 + 1?", "hint": "2"}\n')
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_text("")
    # a benchmark file built with other settings, and a data file with no trailing newline (not a benchmark file:
    # its last line must not be dropped as if a build had been interrupted)
    (tmp_path / "other.jsonl").write_text(json.dumps({"kind": "header", "config": {"format": 2, "temperature": 0.5}})
                                          + "\n")
    (tmp_path / "data.jsonl").write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}')
    return {"EMPTY": tmp_path / "empty.jsonl", "NOANSWER": tmp_path / "noanswer.jsonl",
            "NOCONFIG": tmp_path / "noconfig", "OTHER": tmp_path / "other.jsonl", "NOTBENCH": tmp_path / "data.jsonl",
            "FILE": tmp_path / "data.jsonl", "FOLDER": tmp_path / "noconfig"}


# Refused by check_args before anything is loaded: checked in-process (fast). Every ranged field is here.
OUT_OF_RANGE = [
    (["--num-problems", "0"], "--num-problems must be >= 1 (got 0)"),
    (["--num-presamples", "0"], "--num-presamples must be >= 1"),
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--num-truth", "-2"], "--num-truth must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1"),
    (["--gen-batch-size", "0"], "--gen-batch-size must be >= 1"),
    (["--vllm-max-model-len", "0"], "--vllm-max-model-len must be >= 1"),
    (["--mc-k", "0"], "--mc-k must be >= 1"),
    (["--number-min-count", "0"], "--number-min-count must be >= 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--interval", "0"], "--interval must be >= 1"),
    (["--window", "0"], "--window must be >= 1"),
    (["--k-max", "0"], "--k-max must be >= 1"),
    (["--k-min", "0"], "--k-min must be >= 1"),
    (["--critic-batch-size", "0"], "--critic-batch-size must be >= 1"),
    (["--critic-epochs", "0"], "--critic-epochs must be >= 1"),
    (["--critic-eval-every", "0"], "--critic-eval-every must be >= 1"),
    (["--prm-batch-size", "0"], "--prm-batch-size must be >= 1"),
    (["--prm-minibatch-size", "0"], "--prm-minibatch-size must be >= 1"),
    (["--prm-passes", "0"], "--prm-passes must be >= 1"),
    (["--num-train-problems", "-1"], "--num-train-problems must be >= 0"),
    (["--min-gap-chars", "-1"], "--min-gap-chars must be >= 0"),
    (["--critic-learning-rate", "-1e-6"], "--critic-learning-rate must be >= 0"),
    (["--prm-learning-rate", "-1e-6"], "--prm-learning-rate must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--d-min", "0"], "--d-min must be > 0"),
    (["--beta", "-0.05"], "--beta must be > 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--vllm-gpu-memory-utilization", "0"], "--vllm-gpu-memory-utilization must be in (0, 1]"),
    (["--critic-heldout", "0"], "--critic-heldout must be in (0, 1]"),
    (["--critic-heldout", "1"], "--critic-heldout must be < 1"),
    (["--ema-alpha", "-0.1"], "--ema-alpha must be in [0, 1]"),
    (["--ema-alpha", "1"], "--ema-alpha must be < 1"),
    (["--critic-warmup-ratio", "1.5"], "--critic-warmup-ratio must be in [0, 1]"),
    (["--critic-min-lr-ratio", "-0.1"], "--critic-min-lr-ratio must be in [0, 1]"),
    (["--temperature", "nan"], "--temperature is NaN"),
    (["--beta", "nan"], "--beta is NaN"),
    (["--k-min", "9", "--k-max", "3"], "--k-min 9 must be at most --k-max 3"),
    (["--estimators", "GRPO", "Oracle"], "unknown estimator(s) ['Oracle']"),
    (["--num-truth", "4", "--mc-k", "9"], "--mc-k 9 must be at most --num-truth 4"),
    (["--num-train-problems", "0"], "need training problems"),
    (["--prm-minibatch-size", "8", "--micro-batch-size", "3"], "--micro-batch-size 3 must divide"),
    (["--output-dir", "FILE"], "is a file: pass a folder"),
    (["--bench-file", "FOLDER"], "is a folder: pass a file"),
]
if not torch.cuda.is_available():
    OUT_OF_RANGE.append((["--device", "cuda"], "no CUDA device"))
# vLLM runs on the first visible GPU only, whatever the index says: refused on any machine, GPU or not
OUT_OF_RANGE.append((["--device", "cuda:1", "--backend", "vllm"], "CUDA_VISIBLE_DEVICES=1 and --device cuda"))


@pytest.mark.parametrize("argv,message", OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_out_of_range_flag_is_one_line(argv, message, bad_files):
    args = tyro.cli(Args, args=TINY + [str(bad_files.get(a, a)) for a in argv])
    with pytest.raises(SystemExit) as exc:
        sveb_eval.check_args(args)
    assert str(exc.value).startswith("error: ") and message in str(exc.value) and "\n" not in str(exc.value)


def test_every_numeric_flag_has_a_range(monkeypatch):
    rules = {}
    monkeypatch.setattr(sveb_eval, "check_ranges", lambda args, r: rules.update(r))
    sveb_eval.check_args(Args())
    ranged = [name for names in rules.values() for name in names]
    hints = typing.get_type_hints(Args)

    def numeric(hint):  # int, float, int | None, float | None (not bool, not a Literal or a tuple)
        parts = set(typing.get_args(hint)) - {type(None)} if typing.get_args(hint) else {hint}
        return parts <= {int, float}

    assert len(ranged) == len(set(ranged))  # one rule per field
    assert set(ranged) == {f.name for f in dataclasses.fields(Args) if numeric(hints[f.name])} - {"seed"}


def test_boundary_values_are_accepted(bad_files):
    args = tyro.cli(Args, args=TINY + ["--stage", "build", "--num-train-problems", "0", "--min-gap-chars", "0",
                                       "--top-p", "1", "--ema-alpha", "0", "--critic-warmup-ratio", "1",
                                       "--critic-min-lr-ratio", "0", "--critic-learning-rate", "0",
                                       "--prm-learning-rate", "0", "--k-min", "5", "--k-max", "5",
                                       "--vllm-gpu-memory-utilization", "1", "--critic-heldout", "0.99"])
    sveb_eval.check_args(args)
    assert args.bench_file.endswith("bench.jsonl")


def test_no_training_problems_loads_no_training_split(tmp_path, monkeypatch):
    # load_problems(size=0) would mean the whole split (10,000 generated problems): it must not be asked at all
    calls = []
    monkeypatch.setattr(sveb_eval, "load_problems",
                        lambda dataset, split, size, seed: calls.append((split, size)) or [])
    sveb_eval.build(tiny_args(tmp_path, num_train_problems=0, estimators=("GRPO",), stage="build"))
    assert calls == [("test", 2)]


# Found when a file or the model is read. In-process through main(), as __main__ reports them; the ones marked
# True also as a user sees them, in a subprocess.
BAD_FILES = [
    (["--model", "/no/such/model"], "does not exist", True),
    (["--model", "NOCONFIG"], "has no config.json", False),
    (["--dataset", "nowhere.jsonl"], "does not exist", False),
    (["--dataset", "EMPTY"], "is empty", True),
    (["--dataset", "NOANSWER"], "has no answer (answer/final_answer/solution) field", True),
    (["--dataset", "what"], "unknown dataset 'what'", False),
    (["--bench-file", "OTHER"], "was built with other settings (model: file None vs now 'tiny'", True),
    (["--bench-file", "NOTBENCH"], "is not an SVEB benchmark file", False),
    (["--stage", "eval"], "does not exist; run the build stage first", True),
]


@pytest.mark.parametrize("argv,message,subprocess", BAD_FILES, ids=[" ".join(a) for a, _, _ in BAD_FILES])
def test_bad_file_or_model_is_one_line_and_writes_nothing(argv, message, subprocess, bad_files, tmp_path):
    out = tmp_path / "out"
    argv = TINY + ["--output-dir", str(out)] + [str(bad_files.get(a, a)) for a in argv]
    before = {k: p.read_bytes() for k, p in bad_files.items() if p.is_file()}
    try:
        sveb_eval.main(tyro.cli(Args, args=argv))
        pytest.fail("accepted")
    except (sveb_eval.ModelLoadError, sveb_eval.DataError) as e:  # what __main__ prints as "error: ..."
        line = f"error: {e}"
    except SystemExit as e:
        line = str(e)
    assert line.startswith("error: ") and message in line and "\n" not in line
    if subprocess:
        proc = run_script("sveb_eval.py", *argv)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]
    assert not out.exists()
    assert {k: p.read_bytes() for k, p in bad_files.items() if p.is_file()} == before  # nothing touched


def test_frozen_policy_is_float32_on_a_gpu(monkeypatch):
    """SVEB's frozen policy (PRIME's reference, Hista's hidden states) is float32 under autocast on CUDA too, as the
    PRM and the policy hista.py trains: checked without a GPU, at the load it asks for."""
    class Stop(Exception):
        pass

    asked = {}

    def load_model(name, dtype="float32", device="cpu", **kwargs):
        asked.update(dtype=dtype, device=device)
        raise Stop

    monkeypatch.setattr(sveb_eval, "load_model", load_model)
    args = tyro.cli(Args, args=["--device", "cuda", "--estimators", "Hista", "PRIME"])
    with pytest.raises(Stop):
        sveb_eval.evaluate_estimators(args, {"model": "tiny", "temperature": 0.7}, [], [])
    assert asked == {"dtype": "float32", "device": "cuda"}
