"""ppo.py: its pure functions against hand-worked numbers and plain loops, and the script end to end."""

import math

import pytest
import torch

from conftest import run_script, run_tiny
from ppo import (compute_gae, kl_k3, make_batch, masked_whiten, outcome_rewards, place_rewards, ppo_policy_loss,
                 ppo_value_loss, response_logprobs)


def gae_loop(rewards, values, lengths, gamma, lam):
    """GAE one sequence at a time, in plain Python, over each response's real tokens only."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = lengths[i]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            last = delta + gamma * lam * last
            adv[i][t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_loop(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 3, 1, 7]
    T = 7
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    values = torch.randn(4, T)  # garbage after the end must not leak in
    rewards = torch.randn(4, T) * mask
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    expected = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5)
    assert torch.allclose(ret, (torch.tensor(expected) + values) * mask, atol=1e-5)


def test_gae_hand_worked():
    # 3 tokens, reward 1 at the end, values 0.5, 0.25, 0.75; gamma = lam = 1: A_t = R - V_t.
    adv, ret = compute_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.75]]),
                           torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.75, 0.25]]))
    assert torch.allclose(ret, torch.ones(1, 3))
    # lam = 0: one-step TD errors: V1 - V0, V2 - V1, R - V2.
    adv, _ = compute_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.75]]), torch.ones(1, 3), 1.0, 0.0)
    assert torch.allclose(adv, torch.tensor([[-0.25, 0.5, 0.25]]))


def test_whiten_matches_loop():
    torch.manual_seed(1)
    x = torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    vals = [x[i, j].item() for i in range(3) for j in range(6) if mask[i, j]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    out = masked_whiten(x, mask)
    for i in range(3):
        for j in range(6):
            want = (x[i, j].item() - mean) / std if mask[i, j] else 0.0
            assert out[i, j].item() == pytest.approx(want, abs=1e-4)


def test_reward_on_eos_token_and_truncation():
    # Sample 0 finished after 3 tokens (EOS at index 2), sample 1 was truncated at 5 tokens, sample 2 has 1.
    texts = ["\\boxed{4}", "\\boxed{4} and on and on", "\\boxed{5}"]
    scores = torch.tensor(outcome_rewards(texts, [True, False, True], ["4", "4", "4"]))
    assert scores.tolist() == [1.0, 0.0, 0.0]  # the truncated one is right but scores 0
    rewards = place_rewards(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3, 5, 1]), 5)
    assert rewards.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]]


def test_kl_k3():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(kl_k3(lp, lp), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    r = ref - lp
    assert torch.allclose(kl_k3(lp, ref), torch.exp(r) - r - 1)
    assert (kl_k3(lp, ref) >= 0).all()


def test_policy_loss_clipping():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # ratio e^0.5 = 1.65 with positive advantage: clipped at 1.2, so the loss is -1.2 and clipfrac 1.
    loss, clipfrac, _ = ppo_policy_loss(torch.full((1, 2), 0.5), old, torch.ones(1, 2), mask, 0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert clipfrac.item() == 1.0
    # Same ratio, negative advantage: the unclipped term is the max, -(-1) * 1.65.
    loss, clipfrac, _ = ppo_policy_loss(torch.full((1, 2), 0.5), old, -torch.ones(1, 2), mask, 0.2)
    assert loss.item() == pytest.approx(math.exp(0.5), rel=1e-5)
    assert clipfrac.item() == 0.0


def test_value_loss_clipping():
    mask = torch.ones(1, 1)
    # New value moved 1.0 from the old one (0), return 1: clipped value 0.2 is worse, so it counts.
    loss = ppo_value_loss(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.ones(1, 1), mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2)


def test_batch_logprobs_match_unpadded(tiny_model, tokenizer):
    """Left-padded prompts and right-padded responses give each token the log-prob it has alone."""
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    responses = [[20, 21], [22, 23, 24, 25]]
    batch = make_batch(prompts, responses, tokenizer.pad_token_id)
    with torch.no_grad():
        lp = response_logprobs(tiny_model, batch, temperature=0.7)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = tiny_model(torch.tensor([p + r])).logits[0].float() / 0.7
            alone = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None])
            assert torch.allclose(lp[i, : len(r)], alone.squeeze(-1), atol=1e-4)
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


TINY_RUN = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
            "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12",
            "--eval-every", "1"]


def test_ppo_end_to_end(tmp_path):
    run_dir, records = run_tiny("ppo.py", tmp_path, *TINY_RUN)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1, 2]  # before, every step, at the end
    assert len([r for r in records if "losses/value_loss" in r]) == 2
    assert list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("extra,message", [
    (["--minibatch-size", "3"], "must divide the batch"),
    (["--micro-batch-size", "3", "--minibatch-size", "4"], "must divide --minibatch-size"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--dataset", "nowhere.jsonl"], "does not exist"),
    (["--dataset", "what"], "unknown dataset"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    out = tmp_path / "runs"
    proc = run_script("ppo.py", "--model", "tiny-random", *TINY_RUN, "--output-dir", str(out), *extra)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())
