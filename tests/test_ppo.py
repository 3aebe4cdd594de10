"""ppo.py: its pure functions against hand-worked numbers and plain loops, and the script end to end."""

import math

import pytest
import torch

from conftest import run_tiny
from ppo import (Critic, compute_gae, critic_values, kl_k3, lr_multiplier, make_batch, masked_whiten, outcome_rewards, place_rewards,
                 ppo_policy_loss, ppo_value_loss, response_logprobs)


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
    scores = torch.tensor(outcome_rewards(texts, [True, False, True], ["4", "4", "4"], ["What is 2 + 2?"] * 3))
    assert scores.tolist() == [1.0, 0.0, 0.0]  # the truncated one is right but scores 0
    rewards = place_rewards(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3, 5, 1]), 5)
    assert rewards.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]]


def test_kl_k3():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ones = torch.ones(3)
    assert torch.allclose(kl_k3(lp, lp, ones), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    r = ref - lp
    assert torch.allclose(kl_k3(lp, ref, ones), torch.exp(r) - r - 1)
    assert (kl_k3(lp, ref, ones) >= 0).all()
    # Clamped at 10 per token (exp(4) - 4 - 1 = 49.6), and 0 outside the mask.
    assert kl_k3(torch.tensor([-4.0]), torch.tensor([0.0]), torch.ones(1)).item() == 10.0
    assert kl_k3(lp, ref, torch.tensor([1.0, 0.0, 1.0]))[1].item() == 0.0



def test_lr_multiplier_warmup_then_linear_decay():
    # 100 optimizer steps, 3% warm-up: 3 steps at 1/3, 2/3, 1, then (100 - s) / 97 down to 1/97.
    f = [lr_multiplier(s, 100, 0.03, "linear") for s in range(100)]
    assert f[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 97 / 97])
    assert f[50] == pytest.approx(50 / 97) and f[99] == pytest.approx(1 / 97)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # never increases after the warm-up
    assert [lr_multiplier(s, 10, 0.25, "constant") for s in range(10)] == pytest.approx([1 / 3, 2 / 3] + [1.0] * 8)
    assert [lr_multiplier(s, 4, 0.0, "linear") for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_multiplier(12, 10, 0.0, "linear") == 0.0  # past the planned end (a resumed, longer run)


def test_policy_loss_clipping():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # ratio e^0.5 = 1.65 with positive advantage: clipped at 1.2, so the loss is -1.2 and clipfrac 1.
    loss, clipfrac, _, ratio = ppo_policy_loss(torch.full((1, 2), 0.5), old, torch.ones(1, 2), mask, 0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert clipfrac.item() == 1.0 and ratio.item() == pytest.approx(math.exp(0.5))
    # Same ratio, negative advantage: the unclipped term is the max, -(-1) * 1.65.
    loss, clipfrac, _, _ = ppo_policy_loss(torch.full((1, 2), 0.5), old, -torch.ones(1, 2), mask, 0.2)
    assert loss.item() == pytest.approx(math.exp(0.5), rel=1e-5)
    assert clipfrac.item() == 0.0


def value_loss(value, old, ret, clip=0.2):
    v = torch.tensor([[value]], requires_grad=True)
    loss = ppo_value_loss(v, torch.tensor([[old]]), torch.tensor([[ret]]), torch.ones(1, 1), clip)
    loss.backward()
    return loss.item(), v.grad.item()


def test_value_loss_clipping():
    # New value 1.0, moved 1.0 from the old one (0), return 1: the clipped value 0.2 is further from the
    # return (0.8^2 = 0.64 > 0), so the clipped term counts: 0.5 x 0.64 = 0.32, and it has no gradient.
    assert value_loss(1.0, 0.0, 1.0) == pytest.approx((0.32, 0.0))
    # New value -0.5, return 1: unclipped (1.5^2 = 2.25) is worse than clipped -0.2 (1.2^2 = 1.44), so the
    # unclipped branch counts: 0.5 x 2.25 = 1.125, gradient V - G = -1.5.
    assert value_loss(-0.5, 0.0, 1.0) == pytest.approx((1.125, -1.5))
    # Inside the clip range both terms agree: 0.5 x 0.9^2, gradient -0.9.
    assert value_loss(0.1, 0.0, 1.0) == pytest.approx((0.405, -0.9))


def test_critic_value_of_token_t_sees_only_the_tokens_before_it(tiny_model, tokenizer):
    """V(s_t), the value fed to GAE for response token t, is the state before t: read at column P - 1 + t, it
    must not change when token t itself changes, and must change when a token before it does."""
    import copy

    torch.manual_seed(0)
    critic = Critic(copy.deepcopy(tiny_model).get_decoder(), tiny_model.config.hidden_size).eval()
    prompts = [tokenizer("What is 2 + 3?").input_ids, tokenizer("Hi").input_ids]
    responses = [[10, 11, 12, 13], [20, 21, 22]]
    with torch.no_grad():
        base = critic_values(critic, make_batch(prompts, responses, tokenizer.pad_token_id))
        for t in range(3):
            changed = [r[:t] + [r[t] + 100] + r[t + 1 :] for r in responses]
            v = critic_values(critic, make_batch(prompts, changed, tokenizer.pad_token_id))
            assert torch.equal(v[:, : t + 1], base[:, : t + 1])  # states 0..t do not contain token t
            assert not torch.allclose(v[0, t + 1], base[0, t + 1])  # state t + 1 does
    # Column alignment: the first response token's value is read at the prompt's last token.
    hidden = critic.backbone(input_ids=torch.tensor([prompts[0]])).last_hidden_state
    assert base[0, 0].item() == pytest.approx(critic.head(hidden[0, -1]).item(), abs=1e-5)


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


def full_vocab_logprobs(model, batch, temperature):
    """The pre-chunking formula: logits at every position, one float32 log-softmax over all of them."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    T = batch.response_mask.shape[1]
    logp = torch.log_softmax(logits[:, batch.prompt_width - 1 : batch.prompt_width - 1 + T].float() / temperature, -1)
    return logp.gather(-1, batch.input_ids[:, batch.prompt_width :, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_chunked_logprobs_match_the_full_softmax(tiny_model, tokenizer):
    """Chunked, checkpointed log-probs: the old full-vocabulary values (fp32 exactly, bf16 within rounding),
    the same entropy, the same values for any chunk size, and the same gradient."""
    torch.manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (5, 2, 7)]
    responses = [torch.randint(3, 1000, (n,)).tolist() for n in (4, 9, 1)]
    batch = make_batch(prompts, responses, tokenizer.pad_token_id)
    m = batch.response_mask
    with torch.no_grad():
        lp, ent = response_logprobs(tiny_model, batch, 0.6, with_entropy=True)
        want_lp, want_ent = full_vocab_logprobs(tiny_model, batch, 0.6)
        assert torch.allclose(lp * m, want_lp * m, atol=1e-5) and torch.allclose(ent * m, want_ent * m, atol=1e-4)
        assert torch.equal(response_logprobs(tiny_model, batch, 0.6, chunk=5), lp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp16 = response_logprobs(tiny_model, batch, 0.6)
            want16, _ = full_vocab_logprobs(tiny_model, batch, 0.6)
        assert (lp16 - want16).mul(m).abs().max() < 0.05
    grads = []
    for fn in (lambda: response_logprobs(tiny_model, batch, 0.6, chunk=4), lambda: full_vocab_logprobs(tiny_model, batch, 0.6)[0]):
        tiny_model.zero_grad()
        (fn() * m).sum().backward()
        grads.append(tiny_model.model.layers[0].mlp.up_proj.weight.grad.clone())
    tiny_model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


TINY_RUN = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
            "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12",
            "--eval-every", "1"]


def test_ppo_end_to_end(tmp_path):
    run_dir, records = run_tiny("ppo.py", tmp_path, *TINY_RUN)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1, 2]  # before, every step, at the end
    assert len([r for r in records if "losses/value_loss" in r]) == 2
    assert list(run_dir.glob("events.out.tfevents.*"))
