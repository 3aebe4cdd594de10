"""prime_implicit_prm.py: implicit process rewards, the PRM loss, update and accuracy, RLOO as the paper writes it
and as the official code runs it, the batch fill, the reference's two temperatures, the filter, end to end."""

import copy
import json
import math

import pytest
import torch

from common.checkpoint import latest_checkpoint, load_checkpoint
from conftest import run_script, run_tiny
from prime_implicit_prm import (accuracy_filter, fill_batch, implicit_process_rewards, in_micro_batches, kl_k3,
                                lr_multiplier, make_batch, official_leave_one_out, official_prime_advantages,
                                official_prime_rewards, ppo_policy_loss, prm_ce_loss, prm_pairwise_accuracy,
                                process_outcome_std_ratio, reference_logprobs, response_logprobs,
                                rloo_outcome_advantages, rloo_process_advantages)

BATCH = ([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]])


def test_process_rewards_are_zero_when_prm_is_the_reference(tiny_model, tokenizer):
    batch = make_batch(*BATCH, tokenizer.pad_token_id)
    prm = copy.deepcopy(tiny_model)
    with torch.no_grad():
        r = implicit_process_rewards(response_logprobs(prm, batch, 1.0), response_logprobs(tiny_model, batch, 1.0),
                                     batch.response_mask, beta=0.05)
    assert torch.equal(r, torch.zeros_like(r))


def test_implicit_process_rewards_values():
    prm, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-2.0, -2.0, -1.0]])
    r = implicit_process_rewards(prm, ref, torch.tensor([[1.0, 1.0, 0.0]]), beta=0.5)
    assert r.tolist() == [[0.5, 0.0, 0.0]]


@pytest.mark.parametrize("label", [1.0, 0.0])
def test_one_prm_update_moves_the_implicit_outcome_toward_the_label(tiny_model, tokenizer, label):
    batch = make_batch([BATCH[0][0]], [BATCH[1][0]], tokenizer.pad_token_id)
    prm = copy.deepcopy(tiny_model)
    with torch.no_grad():
        ref = response_logprobs(tiny_model, batch, 1.0)

    def implicit_prob():
        with torch.no_grad():
            lp = response_logprobs(prm, batch, 1.0)
        return torch.sigmoid(0.05 * ((lp - ref) * batch.response_mask).sum()).item()

    before = implicit_prob()
    assert before == pytest.approx(0.5)  # PRM == reference at the start
    opt = torch.optim.AdamW(prm.parameters(), lr=1e-3)
    loss = prm_ce_loss(response_logprobs(prm, batch, 1.0), ref, batch.response_mask, torch.tensor([label]), beta=0.05)
    loss.backward()
    opt.step()
    after = implicit_prob()
    assert (after > before) if label == 1.0 else (after < before)


def test_prm_ce_loss_value():
    prm, ref, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[-10.0, -10.0]]), torch.ones(1, 2)
    # beta * sum = 0.1 * 20 = 2 -> BCE with label 1 is -log(sigmoid(2))
    loss = prm_ce_loss(prm, ref, mask, torch.tensor([1.0]), beta=0.1)
    assert loss.item() == pytest.approx(-torch.log(torch.sigmoid(torch.tensor(2.0))).item())


def pairwise_accuracy_loop(logits, scores, K):
    """The official dpo_acc written as loops over the prompts and their pairs a < b."""
    per_prompt = []
    for g in range(len(scores) // K):
        right = total = 0.0
        for a in range(g * K, g * K + K):
            for b in range(a + 1, g * K + K):
                w = abs(scores[a] - scores[b])
                right += w * ((logits[a] - logits[b] > 0) == (scores[a] - scores[b] > 0))
                total += w
        per_prompt.append(right / total if total > 0 else 0.5)
    return sum(per_prompt) / len(per_prompt)


def test_prm_pairwise_accuracy_hand_worked_and_against_a_loop():
    # Prompt 1: scores 1, 0, 0 with log-odds 2, 1, 3: of the pairs with different outcomes, (0, 1) is ordered
    # right and (0, 2) wrong: 0.5. Prompt 2: all right, no pair to judge: 0.5. Prompt 3: 0, 1, 1 with log-odds
    # -1, 0, 0.5: both pairs right: 1. Mean 2/3.
    logits = torch.tensor([2.0, 1.0, 3.0, 0.1, 0.2, 0.3, -1.0, 0.0, 0.5])
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    assert prm_pairwise_accuracy(logits, scores, 3) == pytest.approx(2 / 3)
    # A PRM equal to the reference (every log-odds 0) calls no pair right where the first one is correct.
    assert prm_pairwise_accuracy(torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0]), 4) == 0.0
    g = torch.Generator().manual_seed(0)
    for K in (2, 4, 5):
        logits = torch.randn(6 * K, generator=g).round()  # ties included
        scores = torch.randint(0, 2, (6 * K,), generator=g).float()
        assert prm_pairwise_accuracy(logits, scores, K) == pytest.approx(pairwise_accuracy_loop(logits, scores, K))


def test_rloo_outcome_hand_worked():
    adv = rloo_outcome_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(adv, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]]))


def test_rloo_process_hand_worked_and_against_a_loop():
    rewards = [[0.1, 0.2], [0.0, 0.3, 0.3], [0.4], [-0.1, 0.1]]  # K = 4 responses of one prompt
    T = 3
    token_rewards = torch.tensor([r + [0.0] * (T - len(r)) for r in rewards])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rewards])
    out = rloo_process_advantages(token_rewards, mask, K=4)
    # means 0.15, 0.2, 0.4, 0.0; leave-one-out baselines 0.2, 0.18333, 0.11667, 0.25
    expected = [[-0.1, 0.0, 0.0], [0.05, 0.23333, 0.11667], [0.28333, 0.0, 0.0], [-0.5, -0.15, 0.0]]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-4)
    means = [sum(r) / len(r) for r in rewards]
    for i, r in enumerate(rewards):
        b = sum(means[j] for j in range(4) if j != i) / 3
        for t in range(len(r)):
            assert out[i, t].item() == pytest.approx(sum(x - b for x in r[t:]), abs=1e-5)


def official_pipeline_loop(token_rewards, scores, lengths, K, process_weight=5.0, outcome_weight=5.0):
    """The official pipeline written from its description with Python floats and loops, one response at a time."""
    B = len(lengths)
    r = [[float(token_rewards[i][t]) for t in range(lengths[i])] for i in range(B)]
    # 1. divide by the largest |reverse cumulative sum| over the batch's responses, + 1e-6
    biggest = max(abs(sum(row[t:])) for row in r for t in range(len(row)))
    r = [[x / (biggest + 1e-6) for x in row] for row in r]
    # 2. leave-one-out r * K/(K-1) - sum_j mean_j / (K-1), process on every token, outcome on the last one
    total = []
    for i in range(B):
        group = range(i // K * K, i // K * K + K)
        process_sum = sum(sum(r[j]) / len(r[j]) for j in group)
        outcome_sum = sum(float(scores[j]) for j in group)
        row = [process_weight * (x * K / (K - 1) - process_sum / (K - 1)) for x in r[i]]
        row[-1] += outcome_weight * (float(scores[i]) * K / (K - 1) - outcome_sum / (K - 1))
        total.append(row)
    # 3. returns to go, whitened over all response tokens (unbiased variance, eps 1e-8)
    returns = [[sum(row[t:]) for t in range(len(row))] for row in total]
    flat = [x for row in returns for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1) + 1e-8)
    return [[(x - mean) / std for x in row] for row in returns]


def random_case(g, num_prompts, K, T):
    lengths = torch.randint(1, T + 1, (num_prompts * K,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    token_rewards = 0.05 * torch.randn(num_prompts * K, T, generator=g) * mask
    scores = (torch.rand(num_prompts * K, generator=g) < 0.4).float()
    return token_rewards, scores, mask, lengths.tolist()


def test_official_pipeline_hand_worked():
    # K = 2, one prompt: response 0 (2 tokens, right) rewards 0.1, 0.3; response 1 (1 token, wrong) reward -0.2.
    # 1. largest |reverse cumsum|: 0.4 -> rewards 0.25, 0.75 and -0.5 (the 1e-6 aside).
    # 2. means 0.5 and -0.5 sum to 0, K/(K-1) = 2: process 0.5, 1.5 and -1; outcome 2*1 - 1 = 1 and 2*0 - 1 = -1.
    # 3. x5 and summed: 2.5, 12.5 | -10; returns 15, 12.5 | -10; mean 17.5/3, whitened.
    token_rewards = torch.tensor([[0.1, 0.3], [-0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = official_prime_advantages(token_rewards, torch.tensor([1.0, 0.0]), mask, K=2)
    returns = torch.tensor([15.0, 12.5, -10.0])
    want = (returns - returns.mean()) / returns.std()
    assert torch.allclose(adv[mask.bool()], want, atol=1e-5)


@pytest.mark.parametrize("K", [2, 3, 4, 8])
def test_official_pipeline_against_a_loop(K):
    g = torch.Generator().manual_seed(K)
    for num_prompts, T in ((1, 5), (3, 1), (4, 12)):
        token_rewards, scores, mask, lengths = random_case(g, num_prompts, K, T)
        if sum(lengths) < 2:
            continue
        adv = official_prime_advantages(token_rewards, scores, mask, K)
        want = official_pipeline_loop(token_rewards, scores, lengths, K)
        for i, row in enumerate(want):
            assert adv[i, : lengths[i]].tolist() == pytest.approx(row, abs=2e-5)


def test_official_pipeline_properties():
    g = torch.Generator().manual_seed(1)
    token_rewards, scores, mask, _ = random_case(g, 5, 4, 9)
    adv = official_prime_advantages(token_rewards, scores, mask, 4)
    on = adv[mask.bool()]
    assert on.mean().abs() < 1e-5 and on.std().item() == pytest.approx(1.0, abs=1e-4)  # whitened over the tokens
    # The batch normalisation removes beta (the 1e-6 aside), so the PRM's scale does not matter.
    assert torch.allclose(official_prime_advantages(20 * token_rewards, scores, mask, 4), adv, atol=1e-4)
    # Padding is whitened too, as the official code leaves it: -mean / std of the returns.
    assert not torch.equal(adv * (1 - mask), torch.zeros_like(adv))


def test_official_baseline_is_the_whitened_outcome_rloo():
    """--process-reward-coef 0: the returns are the outcome RLOO R_i - mean_{j != i} R_j on every token of
    response i (the reward sits on its last token), whitened over the response tokens; the PRM's rewards are
    ignored, and zero token rewards give the same advantages at any process weight."""
    g = torch.Generator().manual_seed(2)
    token_rewards, scores, mask, _ = random_case(g, 4, 4, 7)
    scores[:4] = 1.0  # an all-right group: its outcome part is 0
    base = official_prime_advantages(token_rewards, scores, mask, 4, process_weight=0.0)
    rloo = rloo_outcome_advantages(scores.view(-1, 4)).flatten()[:, None] * mask
    n = mask.sum()
    mean = (rloo * mask).sum() / n
    std = (((rloo - mean) ** 2 * mask).sum() / (n - 1) + 1e-8).sqrt()
    assert torch.allclose(base * mask, (rloo - mean) / std * mask, atol=1e-5)
    assert torch.allclose(official_prime_advantages(torch.zeros_like(token_rewards), scores, mask, 4), base, atol=1e-6)


def test_official_leave_one_out_against_eq5():
    """r_t K/(K-1) - sum_j mean_j/(K-1) = (r_t - mean_{j != i} mean_j) + (r_t - mean_i)/(K-1): the same sum over
    each response as Eq. 5's baseline, different per-token values."""
    g = torch.Generator().manual_seed(3)
    token_rewards, _, mask, _ = random_case(g, 3, 4, 6)
    official = official_leave_one_out(token_rewards, mask, 4)
    eq5 = rloo_process_advantages(token_rewards, mask, 4)[:, 0]  # Eq. 5's return at the first token = its sum
    assert torch.allclose(official.sum(1), eq5, atol=1e-6)
    mean_i = (token_rewards * mask).sum(1) / mask.sum(1)
    mean_others = (mean_i.view(-1, 4).sum(1).repeat_interleave(4) - mean_i) / 3  # mean_{j != i} mean_j
    by_hand = (token_rewards - mean_others[:, None] + (token_rewards - mean_i[:, None]) / 3) * mask
    assert torch.allclose(official, by_hand, atol=1e-6)


def test_official_rewards_parts():
    token_rewards = torch.tensor([[0.1, 0.3], [-0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    process, outcome = official_prime_rewards(token_rewards, torch.tensor([1.0, 0.0]), mask, 2)
    assert torch.allclose(process, torch.tensor([[0.5, 1.5], [-1.0, 0.0]]), atol=1e-5)
    assert outcome.tolist() == [[0.0, 1.0], [-1.0, 0.0]]  # on each response's last token


def test_process_outcome_std_ratio():
    mask = torch.ones(2, 2)
    assert process_outcome_std_ratio(torch.tensor([[1.0, -1.0], [1.0, -1.0]]),
                                     torch.tensor([[2.0, -2.0], [2.0, -2.0]]), mask) == pytest.approx(0.5)
    assert math.isnan(process_outcome_std_ratio(torch.ones(2, 2), torch.ones(2, 2), mask))


def test_fill_batch_keeps_the_surplus_as_prompts_and_stops_at_the_cap():
    """Prompts are ints; a prompt passes the filter when it is even. Draws of 3 new prompts, batch of 4."""
    stream = iter(range(100))
    new = lambda: [next(stream) for _ in range(3)]  # noqa: E731
    calls = []

    def sample_and_grade(prompts, draw):
        calls.append(list(prompts))
        return [f"out{p}" for p in prompts], torch.tensor([[float(p % 2 == 0)] for p in prompts])

    accept = lambda rows: rows[:, 0] > 0  # noqa: E731
    kept, surplus, draws, drawn = fill_batch([], new, sample_and_grade, accept, 4, max_draws=10)
    # draws: 0 1 2 (0, 2 pass) | 3 4 5 (4 passes) | 6 7 8 (6, 8 pass): 5 passed, 4 kept, 8 is the surplus
    assert [p for p, _, _ in kept] == [0, 2, 4, 6] and kept[1][1] == "out2" and kept[1][2].tolist() == [1.0]
    assert surplus == [8] and draws == 3 and drawn == 9
    # The next step re-samples the surplus first, with new prompts after it.
    kept, surplus, draws, drawn = fill_batch(surplus, new, sample_and_grade, accept, 4, max_draws=1)
    assert calls[-1] == [8, 9, 10, 11] and [p for p, _, _ in kept] == [8, 10] and surplus == []
    assert draws == 1 and drawn == 4  # the cap: 2 of 4 prompts, the caller trains on them and reports it


def test_filter_keeps_mixed_prompts_only():
    scores = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    assert accuracy_filter(scores, 0.2, 0.8).tolist() == [False, True, True, True, False]


def test_kl_k3_and_policy_loss_mask_before_the_exp():
    lp, ref, ones = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5]), torch.ones(3)
    r = ref - lp
    assert torch.allclose(kl_k3(lp, ref, ones), torch.exp(r) - r - 1)
    assert kl_k3(torch.tensor([-4.0]), torch.tensor([0.0]), torch.ones(1)).item() == 10.0  # clamped
    assert kl_k3(lp, ref, torch.tensor([1.0, 0.0, 1.0]))[1].item() == 0.0
    logprobs = torch.tensor([[-1.0, -95.0]], requires_grad=True)  # a padded position exp(95) would overflow
    mask = torch.tensor([[1.0, 0.0]])
    loss, clipfrac, _, ratio = ppo_policy_loss(logprobs, torch.tensor([[-1.1, 0.0]]), torch.tensor([[0.5, 0.0]]),
                                               mask, 0.2)
    (loss + kl_k3(logprobs, torch.tensor([[-0.9, 0.0]]), mask).sum()).backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1] == 0
    assert ratio.item() == pytest.approx(math.exp(0.1), rel=1e-5) and clipfrac.item() == 0.0


def test_lr_multiplier_constant_by_default_and_warmup_decay_on_request():
    assert [lr_multiplier(s, 10, 0.0, "constant") for s in range(10)] == [1.0] * 10  # the official schedule
    assert [lr_multiplier(s, 4, 0.25, "linear") for s in range(4)] == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3])


def test_reference_logprobs_give_both_temperatures_from_one_pass(tiny_model, tokenizer):
    """Bit for bit what response_logprobs gives at each temperature, so that at equal weights the policy's KL
    to the reference is exactly 0; and in_micro_batches puts the (b, t, 2) pieces back at their rows."""
    torch.manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (5, 2, 7, 3)]
    responses = [torch.randint(3, 1000, (n,)).tolist() for n in (4, 9, 1, 6)]
    batch = make_batch(prompts, responses, tokenizer.pad_token_id)
    micro_batches = torch.tensor([2, 0, 3, 1]).split(2)
    with torch.no_grad():
        both = in_micro_batches(lambda b: reference_logprobs(tiny_model, b, (1.0, 0.6), chunk=5), batch, micro_batches)
        for i, temperature in enumerate((1.0, 0.6)):
            alone = in_micro_batches(lambda b: response_logprobs(tiny_model, b, temperature, chunk=5), batch,
                                     micro_batches)
            assert torch.equal(both[..., i], alone)
    assert both.shape == (*batch.response_mask.shape, 2)
    assert (both[..., 0] != both[..., 1])[batch.response_mask.bool()].all()  # T = 1 and T = 0.6 differ


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12", "--eval-every", "1",
        "--no-filter"]  # the tiny model is never right, so the filter would drop every prompt


@pytest.mark.parametrize("flags", [[], ["--process-reward-coef", "0"],
                                   ["--no-official-normalisation", "--prm-update-first"]])
def test_prime_end_to_end(tmp_path, flags):
    _, records = run_tiny("prime_implicit_prm.py", tmp_path, *TINY, *flags)
    train = [r for r in records if "losses/policy_loss" in r]
    with_prm = "--process-reward-coef" not in flags
    assert len(train) == 2
    for key in ("prime/prm_acc_before", "prime/prm_acc_after", "prime/prm_loss", "losses/kl_ref_k3"):
        assert (key in train[0]) == with_prm
    assert all(r["prime/batch_fill"] == 1.0 and r["prime/draws"] == 1 for r in train)


def test_filter_skips_steps_without_signal(tmp_path):
    # With the filter on, the tiny model's all-wrong groups are all dropped: the cap is reported, the run completes.
    proc = run_script("prime_implicit_prm.py", "--model", "tiny", "--output-dir", str(tmp_path),
                      *TINY[:-1], "--max-prompt-draws", "2", "--save-every", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stderr + proc.stdout
    assert "draw cap hit (--max-prompt-draws 2): 0 of 2 prompts passed the filter among 4 drawn" in out
    assert "no prompt passed the filter; skipping the update" in out
    # A skipped step still ends as every step does: evaluated and checkpointed when due (eval and save every 1),
    # with the fill loop's run-long state: 2 draws of 2 new prompts per step, no surplus.
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1, 2]
    state = load_checkpoint(latest_checkpoint(str(run_dir)))
    assert state["step"] == 2 and state["state"]["feed"] == {"next_problem": 8, "surplus": []}


class Stop(Exception):
    """Raised by a stand-in to end main() once it has what the test reads."""


@pytest.mark.parametrize("flags,dtype", [([], "float32"),  # with the PRM: the PRM's numerics on every device
                                         (["--process-reward-coef", "0", "--kl-coef", "0.01"], "bfloat16")])
def test_reference_dtype_on_a_gpu(flags, dtype, monkeypatch):
    """On CUDA the reference PRIME's token rewards read is float32 (like the PRM, so that log pi_prm - log pi_ref
    is exactly 0 at step 0 there too); only a KL-only reference is bfloat16. Checked without a GPU: main() stops
    at check_memory, which receives the reference's dtype before anything is loaded."""
    import tyro

    import prime_implicit_prm

    seen = {}

    def check_memory(name, device, **kwargs):
        seen.update(kwargs, device=device)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(prime_implicit_prm, "check_memory", check_memory)
    args = tyro.cli(prime_implicit_prm.Args, args=["--model", "tiny", "--device", "cuda", *flags])
    with pytest.raises(Stop):
        prime_implicit_prm.main(args)
    assert seen["device"] == "cuda" and seen["frozen_dtype"] == dtype and seen["frozen"] == 1
