"""hista.py: MinDistance, the batched prefix distances, kNN values, the EMA, one forward pass, end to end."""

import math

import pytest
import torch

from conftest import run_tiny
from hista import (Batch, ema_smooth, hista_group_values, knn_value, linear_k, make_batch, min_distance,
                   prefix_distances, response_logprobs, window_means)


def brute_min_distance(a, b):
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    total = 0.0
    for row in longer:
        total += min(float(torch.linalg.norm(row - other)) for other in shorter)
    return total / len(longer)


def test_min_distance_hand_worked():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 0.0]])
    assert min_distance(a, b) == pytest.approx(2.5)  # rows of the longer: 0 and 5, over 2
    assert min_distance(b, a) == pytest.approx(2.5)


def test_min_distance_matches_brute_force():
    torch.manual_seed(0)
    for la, lb in [(5, 3), (1, 7), (4, 4)]:
        a, b = torch.randn(la, 6), torch.randn(lb, 6)
        assert min_distance(a, b) == pytest.approx(brute_min_distance(a, b), rel=1e-5)


def test_prefix_distances_match_every_pair():
    torch.manual_seed(1)
    reps = [torch.randn(n, 4) for n in (3, 5, 1)]
    D = prefix_distances(reps)
    assert D.shape == (3, 3, 5, 5)
    for g, a in enumerate(reps):
        for h, b in enumerate(reps):
            for i in range(1, len(a) + 1):
                for j in range(1, len(b) + 1):
                    assert D[g, h, i - 1, j - 1].item() == pytest.approx(brute_min_distance(a[:i], b[:j]), rel=1e-4)
    assert math.isinf(D[2, 0, 1, 0].item())  # rollout 2 has no prefix of 2 windows


def test_knn_value_hand_worked():
    d = torch.tensor([0.5, 2.0, 4.0, float("inf")])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # clamped to 1, 2, 4; the 2 nearest: weights 1 and 0.5 on rewards 1 and 0
    assert knn_value(d, r, k=2, d_min=1.0) == pytest.approx(1 / 1.5)
    # k larger than the pool: all 3 finite ones: (1 + 0 + 0.25) / (1 + 0.5 + 0.25)
    assert knn_value(d, r, k=10, d_min=1.0) == pytest.approx(1.25 / 1.75)


def test_ema_bias_correction():
    const = torch.full((7, 3), 2.5)
    assert torch.allclose(ema_smooth(const, 0.7), const)
    h = torch.tensor([[1.0], [3.0]])
    # m0 = 0.5 -> 0.5 / 0.5 = 1; m1 = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75
    assert torch.allclose(ema_smooth(h, 0.5), torch.tensor([[1.0], [1.75 / 0.75]]))


def test_window_means():
    h = torch.arange(7.0)[:, None]
    assert window_means(h, 3).flatten().tolist() == [1.0, 4.0, 6.0]


def test_linear_k():
    assert [linear_k(i, 4, 66, 6) for i in range(4)] == [66, 46, 26, 6]


def test_first_state_is_the_group_mean_and_own_longer_prefixes_are_excluded():
    torch.manual_seed(2)
    hidden = [torch.randn(23, 8), torch.randn(9, 8), torch.randn(15, 8)]
    rewards = [1.0, 0.0, 0.0]
    values, kth = hista_group_values(hidden, rewards, interval=5, alpha=0.7, window=5, k_max=66, k_min=6, d_min=0.0)
    assert [len(v) for v in values] == [5, 2, 3]  # states at tokens 0, 5, 10, ... below the length
    assert all(v[0] == pytest.approx(1 / 3) for v in values)
    assert all(0.0 <= x <= 1.0 for v in values for x in v) and len(kth) == 4 + 1 + 2


def test_identical_rollouts_take_each_others_rewards():
    h = torch.randn(12, 4)
    values, _ = hista_group_values([h, h.clone(), torch.randn(12, 4) * 100], [1.0, 1.0, 0.0], interval=4,
                                   alpha=0.7, window=2, k_max=2, k_min=2, d_min=1e-3)
    # the two nearest of a prefix of rollout 0 are its own prefix and rollout 1's: both rewarded 1
    assert values[0][1:] == pytest.approx([1.0, 1.0])


def test_hidden_states_come_from_the_log_prob_forward(tiny_model, tokenizer):
    batch: Batch = make_batch([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], tokenizer.pad_token_id)
    calls = []
    handle = tiny_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            logprobs, hidden = response_logprobs(tiny_model, batch, 1.0, with_hidden=True)
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward pass gives both
    assert logprobs.shape == (2, 3) and hidden.shape == (2, 3, tiny_model.config.hidden_size)
    with torch.no_grad():
        alone = tiny_model(torch.tensor([[8, 9, 13]]), output_hidden_states=True).hidden_states[-1][0, 2]
    assert torch.allclose(hidden[1, 0], alone, atol=1e-4)


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "16",
        "--eval-every", "1", "--interval", "4"]


@pytest.mark.parametrize("flags", [[], ["--no-hista"]])
def test_hista_end_to_end(tmp_path, flags):
    _, records = run_tiny("hista.py", tmp_path, *TINY, *flags)
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2 and ("hista/states_per_response" in train[0]) == (not flags)
