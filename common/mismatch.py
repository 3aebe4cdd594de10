"""The sampler-learner mismatch, measured the same way in every trainer.

The responses are drawn by one set of numerics (the hf backend's bfloat16 copy of the policy, or vLLM's
kernels) and scored by another (the learner: float32 weights under bfloat16 autocast). At the same weights
the two give each token slightly different log-probs, so the "on-policy" batch is slightly off-policy. Each
trainer corrects for it (or not) with its own `rollout_correction`; this module only turns the two sets of
log-probs into a (B, T) tensor and measures them:

    sampled = sampler_logprobs(completions, device)      # (B, T), what the generator returned
    weights = rollout_correction(old_logprobs, sampled, mask, mode, cap)   # the trainer's pure function
    logs |= mismatch_stats(old_logprobs, sampled, mask, weights, mode, cap)

Every statistic is logged under `mismatch/` (docs/<script>.md lists them):
- `mismatch/kl`: KL(sampler || learner) per token, the k3 estimate r - 1 - log r with r = p_learner / p_sampler
  at each sampled token (the tokens are the sampler's draws, so this estimates the KL from the sampler), mean
  over response tokens; `mismatch/kl_seq`: the same summed over each response, mean over responses.
- `mismatch/logp_abs_diff_mean` / `_max`: |log p_learner - log p_sampler| over response tokens (TRL's
  sampling/sampling_logp_difference/mean and /max).
- with a correction on (mode other than none): `mismatch/weight_mean` / `_max` (its weights, over tokens in the
  token_* modes and over responses in the sequence_* modes, as TRL's sampling/importance_sampling_ratio/*),
  and `mismatch/capped_frac`: the share of tokens (token_*) or responses (sequence_*) whose ratio exceeded the
  cap, i.e. set to 0 (*_mask) or to the cap (*_truncate).
"""

from __future__ import annotations

import torch


def sampler_logprobs(completions, device) -> torch.Tensor:
    """(B, T) sampler log-probs of B sampled completions (each generator's `Completion.logprobs`), laid out as
    the trainers lay out responses: token t of response b at [b, t], right-padded with 0 to the longest."""
    if any(c.logprobs is None for c in completions):
        raise ValueError("a completion without sampler log-probs (a greedy one?): the mismatch needs sampled ones")
    out = torch.zeros(len(completions), max(len(c.token_ids) for c in completions))
    for b, c in enumerate(completions):
        out[b, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return out.to(device)


@torch.no_grad()
def mismatch_stats(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                   mode: str, cap: float) -> dict[str, float]:
    """The mismatch between the learner's `logprobs` and the sampler's, both (B, T) on the same tokens, over
    the response tokens of `mask` (B, T); with a correction `mode` other than "none", the statistics of the
    (B, T) `weights` it gave and of the ratios that exceeded its `cap` (see the module's docstring)."""
    mask = mask.float()
    tokens = mask.sum().clamp(min=1)
    log_ratio = (logprobs - sampler_logprobs) * mask  # (B, T) log p_learner - log p_sampler, 0 on padding
    k3 = (torch.exp(log_ratio) - 1 - log_ratio) * mask  # (B, T), >= 0
    on = mask.bool()
    stats = {
        "mismatch/kl": float(k3.sum() / tokens),
        "mismatch/kl_seq": float(k3.sum(1).mean()),
        "mismatch/logp_abs_diff_mean": float(log_ratio.abs().sum() / tokens),
        "mismatch/logp_abs_diff_max": float(log_ratio.abs()[on].max()) if on.any() else 0.0,
    }
    if mode == "none":
        return stats
    if mode.startswith("sequence"):  # one weight per response, the same on each of its tokens
        ratio = torch.exp(log_ratio.sum(1))  # (B,)
        weights = (weights * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    else:  # one per response token
        ratio, weights = torch.exp(log_ratio[on]), weights[on]  # (N,) each
    stats |= {
        "mismatch/weight_mean": float(weights.mean()),
        "mismatch/weight_max": float(weights.max()),
        "mismatch/capped_frac": float((ratio > cap).float().mean()),
    }
    return stats
