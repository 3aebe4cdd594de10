"""The policy-loss pieces every trainer carries (its own copy, as each file reads top to bottom), against
hand-worked numbers: the approximate KL it logs, both clip branches with their gradients, and the k3 KL
against the exact KL of a small distribution."""

import importlib
import math

import pytest
import torch

TRAINERS = ["ppo.py", "vineppo.py", "numca.py", "hista.py", "prime_implicit_prm.py"]
ASYMMETRIC = {"numca.py", "hista.py"}  # DAPO's clip: eps_low, eps_high


def policy_loss(script, logprobs, old, adv, mask, eps_low=0.2, eps_high=0.2):
    module = importlib.import_module(script[:-3])
    if script in ASYMMETRIC:
        return module.ppo_policy_loss(logprobs, old, adv, mask, eps_low, eps_high)
    assert eps_low == eps_high
    return module.ppo_policy_loss(logprobs, old, adv, mask, eps_low)


@pytest.mark.parametrize("script", TRAINERS)
def test_approx_kl_is_half_the_mean_squared_log_ratio(script):
    # log-ratios 0.1 and -0.2 on the two real tokens, the third masked: (0.01 + 0.04) / 2 / 2 = 0.0125
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-1.1, -1.8, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    _, clipfrac, approx_kl, ratio = policy_loss(script, logprobs, old, torch.ones(1, 3), mask)
    assert approx_kl.item() == pytest.approx(0.0125, rel=1e-5)
    assert ratio.item() == pytest.approx((math.exp(0.1) + math.exp(-0.2)) / 2, rel=1e-6)
    assert clipfrac.item() == 0.0  # both ratios inside [0.8, 1.2]


def one_token(script, log_ratio, advantage, eps_low=0.2, eps_high=0.2):
    logprobs = torch.tensor([[log_ratio]], requires_grad=True)
    loss, clipfrac, _, _ = policy_loss(script, logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]),
                                       torch.ones(1, 1), eps_low, eps_high)
    loss.backward()
    return loss.item(), clipfrac.item(), logprobs.grad.item()


@pytest.mark.parametrize("script", TRAINERS)
def test_lower_clip_branch(script):
    r = math.exp(-0.5)  # ratio 0.607, below 1 - 0.2
    # Negative advantage: the clipped term -(-1) * 0.8 = 0.8 is the larger, so it counts and gives no gradient.
    assert one_token(script, -0.5, -1.0) == pytest.approx((0.8, 1.0, 0.0))
    # Positive advantage: the unclipped term -0.607 is the larger (the pessimistic bound): gradient -ratio.
    assert one_token(script, -0.5, 1.0) == pytest.approx((-r, 0.0, -r), rel=1e-6)


@pytest.mark.parametrize("script", TRAINERS)
def test_upper_clip_branch(script):
    r = math.exp(0.25)  # ratio 1.284
    assert one_token(script, 0.25, 1.0) == pytest.approx((-1.2, 1.0, 0.0))  # clipped at 1.2: no gradient
    assert one_token(script, 0.25, -1.0) == pytest.approx((r, 0.0, r), rel=1e-6)  # unclipped: gradient +ratio
    if script in ASYMMETRIC:  # DAPO's clip-higher: 1.28 caps the ratio, 0.8 still floors it
        assert one_token(script, 0.25, 1.0, 0.2, 0.28) == pytest.approx((-1.28, 1.0, 0.0))
        assert one_token(script, 0.2, 1.0, 0.2, 0.28) == pytest.approx((-math.exp(0.2), 0.0, -math.exp(0.2)))
        assert one_token(script, -0.5, -1.0, 0.2, 0.28) == pytest.approx((0.8, 1.0, 0.0))


@pytest.mark.parametrize("script", TRAINERS)
def test_k3_averages_to_the_exact_kl(script):
    """E_{x ~ pi}[k3(x)] = KL(pi || ref) exactly: weighting each outcome's k3 by pi(x) gives the KL of two
    5-outcome distributions, whose reverse KL differs by 19% (a k3 with its ratio upside down fails)."""
    module = importlib.import_module(script[:-3])
    logp = torch.log_softmax(torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0], dtype=torch.float64), 0)
    ref = torch.log_softmax(torch.tensor([0.0, 1.0, 0.5, -0.5, 1.5], dtype=torch.float64), 0)
    kl = float((logp.exp() * (logp - ref)).sum())
    reverse = float((ref.exp() * (ref - logp)).sum())
    assert abs(kl - reverse) > 0.15 * kl
    k3 = module.kl_k3(logp[None], ref[None], torch.ones(1, 5, dtype=torch.float64), max_kl=1e9)[0]
    assert float((logp.exp() * k3).sum()) == pytest.approx(kl, rel=1e-9)
    assert (k3 >= 0).all()
