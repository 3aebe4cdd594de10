"""prime_implicit_prm.py: implicit process rewards, the PRM loss and update, RLOO in two parts, the filter."""

import copy

import pytest
import torch

from conftest import run_script, run_tiny
from prime_implicit_prm import (accuracy_filter, implicit_process_rewards, make_batch, prm_ce_loss,
                                response_logprobs, rloo_outcome_advantages, rloo_process_advantages)

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


def test_filter_keeps_mixed_prompts_only():
    scores = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    assert accuracy_filter(scores, 0.2, 0.8).tolist() == [False, True, True, True, False]


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12", "--eval-every", "1",
        "--no-filter"]  # the tiny model is never right, so the filter would drop every prompt


@pytest.mark.parametrize("flags", [[], ["--process-reward-coef", "0"]])
def test_prime_end_to_end(tmp_path, flags):
    _, records = run_tiny("prime_implicit_prm.py", tmp_path, *TINY, *flags)
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2 and ("prime/prm_accuracy" in train[0]) == (not flags)


def test_filter_skips_steps_without_signal(tmp_path):
    # With the filter on, the tiny model's all-wrong groups are all dropped: the run still completes.
    proc = run_script("prime_implicit_prm.py", "--model", "tiny-random", "--output-dir", str(tmp_path),
                      *TINY[:-1], "--max-prompt-draws", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no prompt passed the filter in 4 draws" in proc.stderr + proc.stdout
