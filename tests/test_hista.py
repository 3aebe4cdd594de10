"""hista.py: the EMA, the prompt-and-response representation, MinDistance, the batched prefix distances, the
k schedule, the neighbour pool, the kNN values, one forward pass for log-probs and hidden states, end to end.
Resuming a killed run and the range checks of every flag: tests/test_trainers.py."""

import math
import random

import pytest
import torch
import tyro

from conftest import run_tiny
from hista import (Args, Batch, candidate_prefixes, check_args, ema_smooth, hista_group_values, in_micro_batches, knn_value, linear_k,
                   make_batch, min_distance, prefix_distances, response_logprobs, state_representation, window_means)


def brute_min_distance(a, b):
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    total = 0.0
    for row in longer:
        total += min(float(torch.linalg.norm(row - other)) for other in shorter)
    return total / len(longer)


def loop_ema(h, alpha):
    """The loop this file had before: one step per token."""
    out = torch.empty_like(h)
    m = torch.zeros_like(h[..., 0, :])
    for t in range(h.shape[-2]):
        m = alpha * m + (1 - alpha) * h[..., t, :]
        out[..., t, :] = m / (1 - alpha ** (t + 1))
    return out


def reference_prefix_distances(reps):
    """The CPU implementation this file had before (a broadcast cdist over (G, G, L, D))."""
    L = max(r.shape[0] for r in reps)
    lengths = torch.tensor([r.shape[0] for r in reps])
    X = torch.stack([torch.nn.functional.pad(r.float(), (0, 0, 0, L - r.shape[0])) for r in reps])
    M = torch.cdist(X[:, None], X[None, :])
    valid = torch.arange(L)[None, :] < lengths[:, None]
    M = M.masked_fill(~(valid[:, None, :, None] & valid[None, :, None, :]), float("inf"))
    rows = torch.cumsum(torch.cummin(M, dim=3).values, dim=2)
    cols = torch.cumsum(torch.cummin(M, dim=2).values, dim=3)
    i = torch.arange(1, L + 1, dtype=torch.float32)[:, None]
    j = torch.arange(1, L + 1, dtype=torch.float32)[None, :]
    return torch.where(i >= j, rows / i, cols / j)


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


def test_prefix_distances_equal_the_previous_implementation():
    torch.manual_seed(2)
    for lengths, dim in [((40, 17, 33, 40), 64), ((9,), 8), ((25, 3, 12, 30, 30, 1, 7, 19), 576)]:
        shared = torch.randn(5, dim) * 3  # the rows of a shared prompt: identical across the group
        reps = [torch.cat([shared, torch.randn(n, dim) * 3]) for n in lengths]
        new, old = prefix_distances(reps), reference_prefix_distances(reps)
        assert torch.equal(torch.isinf(new), torch.isinf(old))
        finite = torch.isfinite(old)
        assert torch.allclose(new[finite], old[finite], rtol=1e-4, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_prefix_distances_on_the_gpu_match_the_cpu():
    torch.manual_seed(3)
    reps = [torch.randn(n, 64) for n in (30, 12, 30)]
    D = prefix_distances([r.cuda() for r in reps])
    assert D.device.type == "cuda"
    assert torch.allclose(D.cpu(), prefix_distances(reps), rtol=1e-4, atol=1e-3)


def test_knn_value_hand_worked():
    d = torch.tensor([0.5, 2.0, 4.0, float("inf")])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # clamped to 1, 2, 4; the 2 nearest: weights 1 and 0.5 on rewards 1 and 0
    assert knn_value(d, r, k=2, d_min=1.0) == pytest.approx(1 / 1.5)
    # k larger than the pool: all 3 finite ones: (1 + 0 + 0.25) / (1 + 0.5 + 0.25)
    assert knn_value(d, r, k=10, d_min=1.0) == pytest.approx(1.25 / 1.75)
    # ties (here all three below d_min) keep the earlier candidates
    assert knn_value(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.0, 1.0, 1.0]), k=1, d_min=1.0) == 0.0
    assert knn_value(torch.tensor([0.3, 0.2, 0.1]), torch.tensor([1.0, 0.0, 0.0]), k=1, d_min=1.0) == 1.0


def test_ema_bias_correction():
    const = torch.full((7, 3), 2.5)
    assert torch.allclose(ema_smooth(const, 0.7), const)
    h = torch.tensor([[1.0], [3.0]])
    # m0 = 0.5 -> 0.5 / 0.5 = 1; m1 = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75
    assert torch.allclose(ema_smooth(h, 0.5), torch.tensor([[1.0], [1.75 / 0.75]]))


def test_ema_vectorised_equals_the_loop():
    torch.manual_seed(4)
    for shape in [(1, 3), (31, 5), (32, 5), (33, 5), (300, 16), (3, 130, 8)]:
        h = torch.randn(shape) * 40
        for alpha in (0.0, 0.5, 0.7, 0.97):
            assert torch.allclose(ema_smooth(h, alpha), loop_ema(h, alpha), rtol=1e-4, atol=1e-3), (shape, alpha)
            assert torch.allclose(ema_smooth(h, alpha, chunk=7), loop_ema(h, alpha), rtol=1e-4, atol=1e-3)


def test_window_means():
    h = torch.arange(7.0)[:, None]
    assert window_means(h, 3).flatten().tolist() == [1.0, 4.0, 6.0]


def test_state_representation_prompt_windows_end_at_the_response():
    # alpha 0: no smoothing. Prompt of 7 tokens, windows of 5: prompt windows [0, 2) and [2, 7), then the
    # response's [7, 12) and [12, 13).
    h = torch.arange(13.0)[:, None] ** 2
    rep = state_representation(h, 7, 0.0, 5).flatten()
    assert rep.tolist() == pytest.approx([h[0:2].mean(), h[2:7].mean(), h[7:12].mean(), h[12:13].mean()])
    # with smoothing: the EMA runs from the first prompt token through the response
    torch.manual_seed(5)
    h = torch.randn(13, 4)
    smooth = loop_ema(h, 0.7)
    want = torch.stack([smooth[0:2].mean(0), smooth[2:7].mean(0), smooth[7:12].mean(0), smooth[12:13].mean(0)])
    assert torch.allclose(state_representation(h, 7, 0.7, 5), want, atol=1e-5)
    assert state_representation(h, 10, 0.7, 5).shape == (2 + 1, 4)


def test_linear_k_is_the_official_schedule():
    assert [linear_k(i, 4, 66, 6) for i in range(4)] == [66, 51, 36, 21]
    assert [linear_k(i, 7, 66, 6) for i in range(7)] == [66, 58, 50, 42, 34, 26, 18]  # never reaches 6
    assert {linear_k(i, 61, 66, 6) for i in range(61)} == {66}  # n > k_max - k_min: k_max throughout
    assert linear_k(0, 1, 66, 6) == 66 and linear_k(0, 1, 5, 5) == 5
    assert [linear_k(i, 5, 66, 6) for i in range(5)] == [66, 54, 42, 30, 18]  # step 60 // 5 = 12
    assert [linear_k(i, 13, 66, 6) for i in range(0, 13, 4)] == [66, 50, 34, 18]  # step 60 // 13 = 4
    assert [linear_k(i, 3, 10, 2) for i in range(3)] == [10, 8, 6]  # step 8 // 3 = 2
    for n in range(1, 80):  # never below k_min, never rising along a response
        ks = [linear_k(i, n, 66, 6) for i in range(n)]
        assert min(ks) >= 6 and ks == sorted(ks, reverse=True)


def test_candidate_prefixes_with_the_prompt_only_prefix():
    g, w = candidate_prefixes([23, 9], interval=10, window=5, prompt_windows=3)
    # rollout 0: prompt only (3 rows), 10, 20 and 23 response tokens (2, 4, 5 windows); rollout 1: prompt, 9
    assert g.tolist() == [0, 0, 0, 0, 1, 1] and w.tolist() == [3, 5, 7, 8, 3, 5]
    g, w = candidate_prefixes([23, 9], interval=10, window=5)  # no prompt rows: no prompt-only prefix
    assert g.tolist() == [0, 0, 0, 1] and w.tolist() == [2, 4, 5, 2]


def naive_group_values(hidden, prompt_len, rewards, interval, alpha, window, k_max, k_min, d_min):
    """hista_group_values written as plain loops over the rules, on prefix_distances' values (tested against
    brute force above): the pool (every rollout's prompt-only prefix, a prefix every `interval` response
    tokens, the whole response; of the scored rollout only prefixes no longer than the state), the official
    k schedule, ties to the earlier candidate, 1/d weights."""
    reps = [state_representation(h, prompt_len, alpha, window) for h in hidden]
    D = prefix_distances(reps)
    wp = math.ceil(prompt_len / window)
    pool = []
    for g, h in enumerate(hidden):
        T = h.shape[0] - prompt_len
        pool += [(g, wp + math.ceil(p / window)) for p in [0] + list(range(interval, T, interval)) + [T]]
    values = []
    for g, h in enumerate(hidden):
        starts = list(range(0, h.shape[0] - prompt_len, interval))
        n = len(starts) - 1
        row = [sum(rewards) / len(rewards)]
        for i in range(n):
            w = wp + math.ceil(starts[i + 1] / window)
            cands = sorted((max(float(D[g, c, w - 1, cw - 1]), d_min), index, rewards[c])
                           for index, (c, cw) in enumerate(pool) if not (c == g and cw > w))
            top = cands[: k_max - (k_max - k_min) // n * i]  # the official k_i
            row.append(sum(r / d for d, _, r in top) / sum(1 / d for d, _, _ in top))
        values.append(row)
    return values


def test_group_values_match_a_naive_loop():
    torch.manual_seed(6)
    for G, lengths, k_max, k_min in [(3, (23, 9, 15), 66, 6), (4, (17, 30, 4, 22), 9, 2), (2, (41, 41), 5, 1)]:
        prompt = torch.randn(7, 6)  # a group shares its prompt, hence its prompt rows
        hidden = [torch.cat([prompt, torch.randn(T, 6)]) for T in lengths]
        rewards = [float(random.Random(g).random() < 0.5) for g in range(G)]
        for d_min in (0.05, 0.5):
            got, kth = hista_group_values(hidden, 7, rewards, interval=4, alpha=0.7, window=2, k_max=k_max,
                                          k_min=k_min, d_min=d_min)
            want = naive_group_values(hidden, 7, rewards, 4, 0.7, 2, k_max, k_min, d_min)
            assert all(a == pytest.approx(b, rel=1e-6) for a, b in zip(got, want))
            assert [len(v) for v in got] == [math.ceil(T / 4) for T in lengths]
            assert len(kth) == sum(math.ceil(T / 4) - 1 for T in lengths)


def per_state_group_values(hidden, prompt_len, rewards, interval, alpha, window, k_max, k_min, d_min):
    """hista_group_values as it was before its states were batched: one distance gather, one knn_value and one
    k-th-neighbour read per state, on the distances' device."""
    reps = [state_representation(h, prompt_len, alpha, window) for h in hidden]
    D = prefix_distances(reps)
    R = torch.tensor(rewards)
    lengths = [h.shape[0] - prompt_len for h in hidden]
    wp = math.ceil(prompt_len / window)
    cand_g, cand_w = candidate_prefixes(lengths, interval, window, wp)
    values, kth = [], []
    for g, T in enumerate(lengths):
        starts = list(range(0, T, interval))
        n = len(starts) - 1
        row = [float(R.mean())]
        for s in range(1, len(starts)):
            w = wp + math.ceil(starts[s] / window)
            dist = D[g, cand_g, w - 1, cand_w - 1]
            dist = torch.where((cand_g == g) & (cand_w > w), torch.full_like(dist, float("inf")), dist)
            k = linear_k(s - 1, n, k_max, k_min)
            row.append(knn_value(dist, R[cand_g], k, d_min))
            finite = dist[torch.isfinite(dist)].clamp(min=d_min)
            kth.append(float(finite.sort().values[min(k, len(finite)) - 1]))
        values.append(row)
    return values, kth


def test_batched_states_give_exactly_the_per_state_loop():
    """On the CPU the batched gather changes no bit of the values or the k-th distances."""
    torch.manual_seed(11)
    for G, lengths, k_max, k_min in [(3, (23, 9, 15), 66, 6), (4, (17, 30, 4, 22), 9, 2), (2, (3, 2), 5, 1)]:
        prompt = torch.randn(5, 8)
        hidden = [torch.cat([prompt, torch.randn(T, 8)]) for T in lengths]
        rewards = [float(random.Random(g + 3).random() < 0.5) for g in range(G)]
        for d_min in (0.05, 2.0):
            settings = dict(interval=4, alpha=0.7, window=2, k_max=k_max, k_min=k_min, d_min=d_min)
            assert hista_group_values(hidden, 5, rewards, **settings) == \
                per_state_group_values(hidden, 5, rewards, **settings)


def test_first_state_is_the_group_mean_and_own_longer_prefixes_are_excluded():
    torch.manual_seed(2)
    prompt = torch.randn(4, 8)
    hidden = [torch.cat([prompt, torch.randn(T, 8)]) for T in (23, 9, 15)]
    rewards = [1.0, 0.0, 0.0]
    values, kth = hista_group_values(hidden, 4, rewards, interval=5, alpha=0.7, window=5, k_max=66, k_min=6,
                                     d_min=0.0)
    assert [len(v) for v in values] == [5, 2, 3]  # states at tokens 0, 5, 10, ... below the length
    assert all(v[0] == pytest.approx(1 / 3) for v in values)
    assert all(0.0 <= x <= 1.0 for v in values for x in v) and len(kth) == 4 + 1 + 2


def test_identical_rollouts_take_each_others_rewards():
    prompt, h = torch.randn(3, 4), torch.randn(12, 4)
    hidden = [torch.cat([prompt, h]), torch.cat([prompt, h.clone()]), torch.cat([prompt, torch.randn(12, 4) * 100])]
    values, _ = hista_group_values(hidden, 3, [1.0, 1.0, 0.0], interval=4, alpha=0.7, window=2, k_max=2, k_min=2,
                                   d_min=1e-3)
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
    assert logprobs.shape == (2, 3) and hidden.shape == (2, 3 + 3, tiny_model.config.hidden_size)
    with torch.no_grad():
        alone = tiny_model(torch.tensor([[8, 9, 13]]), output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(hidden[1, 1:4], alone, atol=1e-4)  # row 1: one pad column, prompt 8 9, response 13


def test_in_micro_batches_returns_each_rows_prompt_and_response_states(tiny_model, tokenizer):
    prompts, responses = [[5, 6, 7], [8, 9], [4]], [[10, 11, 12], [13], [14, 15]]
    batch = make_batch(prompts, responses, tokenizer.pad_token_id)
    partition = [torch.tensor([2, 0]), torch.tensor([1])]
    with torch.no_grad():
        logprobs, hidden = in_micro_batches(lambda b: response_logprobs(tiny_model, b, 1.0, with_hidden=True),
                                            batch, partition)
        plain = in_micro_batches(lambda b: response_logprobs(tiny_model, b, 1.0), batch, partition)
        for r, (p, resp) in enumerate(zip(prompts, responses)):
            alone = tiny_model(torch.tensor([p + resp]), output_hidden_states=True).hidden_states[-1][0]
            assert hidden[r].shape == alone.shape and torch.allclose(hidden[r], alone, atol=1e-4)
    assert torch.equal(logprobs, plain) and logprobs.shape == (3, 3)
    assert logprobs[1, 1:].tolist() == [0.0, 0.0]  # past row 1's response


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "16",
        "--eval-every", "1", "--interval", "4"]


def test_k_min_equal_to_k_max_is_allowed():
    args = tyro.cli(Args, args=TINY + ["--k-min", "8", "--k-max", "8", "--ema-alpha", "0"])
    check_args(args)
    assert args.batch_size == 4


@pytest.mark.parametrize("flags", [[], ["--no-hista"]])
def test_hista_end_to_end(tmp_path, flags):
    _, records = run_tiny("hista.py", tmp_path, *TINY, *flags)
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2 and ("hista/states_per_response" in train[0]) == (not flags)
    assert "time/hista_share" in train[0]  # wall-clock: under time/, left out of the resume comparison
