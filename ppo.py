"""PPO with a learned critic (Schulman et al. 2017, arXiv 1707.06347), VinePPO's baseline (arXiv 2410.01679).

The policy samples responses to math prompts; the grader puts reward 1 or 0 on the last (EOS) token. A critic
(a copy of the policy's transformer with a linear value head) gives V(s_t) for every response prefix; GAE
(gamma 1, lambda 1) turns rewards and values into per-token advantages, which are whitened and fed to the
clipped PPO surrogate for 2 epochs of minibatches. The k3 KL to the frozen reference (per token clamped to
[0, 10], summed per sequence, coefficient 1e-4) is in the loss; TRL's k1 is logged. This is the baseline
every other script is compared with. Official code: McGill-NLP/VinePPO (src/treetune/trainers/ppo_trainer.py).

Departures from the official code (docs/ppo.md gives the reasons):
- Defaults sized for the offline CPU run (8 prompts x 4, lr 3e-6 policy / 1e-5 critic, 128 new tokens); the
  paper's scale is flags.
- Top-p 1.0 by default (official 0.9).
- One micro-batch partition per step, shared by every pass and epoch (batch invariance).
- Logits only at response positions, float32 log-softmax in chunks; the reference stays float32 on the CPU.
- Float32 weights, under bf16 autocast on CUDA, float32 compute on the CPU; sampling from a bf16 copy (hf) or vLLM.
- Advantages whitened once over the batch (official: within each micro-batch, every epoch).
- Dropout left as the model's config has it (official: disabled).
- A micro-batch skipped for its ratio skips the critic's update too (official: only the actor's loss).
- Loss is the token mean over the minibatch (official: the mean of micro-batch token means).

Docs: docs/ppo.md
Run:  python ppo.py                                                   # CPU, offline, default
      python ppo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --backend vllm   # one GPU
      torchrun --nproc-per-node 8 ppo.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --fsdp   # 8 GPUs
      python ppo.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --lora-rank 16   # LoRA, one GPU
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
import tyro

from common import distributed as dist
from common.args import check_ranges
from common.data import DEFAULT_DATASET, DataError, load_problems, prompt_ids
from common.grading import grade
from common.mismatch import mismatch_stats, sampler_logprobs
from common.models import DEFAULT_MODEL, ModelLoadError, check_memory, load_tokenizer
from common.run import (Run, check_shared_args, load_reference, load_trained, make_run_generator, memory_layout,
                        resume_args, setup)


@dataclass
class Args:
    # ---- shared by every script in this repository ----
    model: str = DEFAULT_MODEL
    """hub name or local folder of an instruct model; `smollm2-135m` is the offline default"""
    dataset: str = DEFAULT_DATASET
    """arithmetic (offline default), gsm8k, math, rg:<task>[:k=v,...], or a .jsonl/.parquet file"""
    backend: Literal["hf", "vllm"] = "hf"
    """generation backend: hf (transformers, CPU or GPU) or vllm (one GPU, or vLLM's CPU build)"""
    seed: int = 1
    """seed of the run (data order, sampling, initialisation)"""
    num_steps: int = 20
    """training iterations (each: generate, grade, estimate, update)"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{exp_name}__{seed}__{unix time}"""
    exp_name: str = "ppo"
    """name of the experiment, first part of the run folder"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: Literal["auto", "on", "off"] = "auto"
    """forwards and backwards under bfloat16 autocast (weights and optimizer stay float32); auto: on for CUDA (the
    papers' numerics), off on the CPU (float32: under bf16 any update moves the log-probs by a rounding floor)"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward pass (far less memory, ~30% more compute); auto: on for CUDA only"""
    num_prompts: int = 8
    """prompts per iteration"""
    samples_per_prompt: int = 4
    """responses sampled per prompt; the batch is num_prompts * samples_per_prompt samples"""
    max_new_tokens: int | None = None
    """response length limit in tokens (None: 128 for generated tasks, 512 for gsm8k, math and files)"""
    temperature: float = 0.6
    """sampling temperature (VinePPO's 0.6); log-probs for the ratio and KL use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling; below 1 the update is slightly off-policy"""
    num_epochs: int = 2
    """passes of PPO updates over each batch"""
    minibatch_size: int = 16
    """samples per optimizer step; must divide the batch"""
    micro_batch_size: int = 8
    """samples per forward/backward (gradient accumulation); must divide minibatch_size"""
    gen_batch_size: int = 64
    """sequences per generate call of the hf backend"""
    learning_rate: float = 3e-6
    """AdamW learning rate of the policy (sized for the CPU default: 1e-5 fell back after its best in 3 GRPO
    seeds of 30 minutes, 3e-6 did not; the official recipe: 1e-6)"""
    adam_eps: float = 1e-8
    """AdamW epsilon (VinePPO's code; 1e-5, CleanRL's Atari value, shrinks an LLM's tiny per-parameter steps)"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (VinePPO's code: 0)"""
    warmup_ratio: float = 0.03
    """share of the run's optimizer steps (over --num-steps) with a linear learning-rate warm-up from 0"""
    lr_decay: Literal["linear", "constant"] = "linear"
    """after the warm-up: linear decay towards 0 at --num-steps (VinePPO's code), or constant. With
    --max-minutes the schedule still spans --num-steps: a run stopped early ends above 0"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    num_train_problems: int = 10_000
    """training problems to draw from (generated tasks make this many)"""
    num_eval_problems: int = 500
    """held-out problems for the greedy evaluation (500: a standard error under 2.3 points at any accuracy)"""
    eval_every: int = 4
    """greedy evaluation every N iterations (and before the first and after the last)"""
    eval_every_minutes: float | None = None
    """instead of --eval-every: evaluate after every M minutes of training (evaluations not counted), so that
    arms of unequal step times are evaluated alike"""
    num_logged_samples: int = 3
    """sample completions written to the log at each evaluation"""
    max_minutes: float | None = None
    """stop after this many minutes of training (then evaluate and save), for equal-time comparisons; the held-out
    evaluations are not counted (metrics.jsonl's train_s)"""
    save_model: bool = True
    """save the final policy with save_pretrained into the run folder"""
    save_every: int = 0
    """write a checkpoint every N steps (0: never); Ctrl-C writes one after the current step, then exits"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep on disk"""
    resume: str | None = None
    """continue the run in this folder from its newest checkpoint, with the arguments it was started with"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project: str = "llm-rl-reference"
    """wandb project name (with --track)"""
    vllm_gpu_memory_utilization: float = 0.3
    """share of GPU memory vLLM may take (the rest trains)"""
    vllm_max_model_len: int | None = None
    """vLLM's context length in tokens (None: the model's own limit, at most 4096)"""
    vllm_enforce_eager: bool = False
    """vLLM without torch.compile / CUDA graphs: starts in seconds, generates slower (the tests use it)"""
    fsdp: bool = False
    """under torchrun: shard the trained models' weights, gradients and optimizer state over the processes
    (FSDP2's fully_shard; the frozen reference is sharded too) instead of replicating them (DDP)"""
    lora_rank: int = 0
    """train LoRA adapters of this rank (PEFT) on the policy (and the critic / PRM) instead of every weight;
    0: full fine-tuning. The reference is then the base model with the adapters off"""
    lora_alpha: float | None = None
    """LoRA's scale numerator: an adapter's update is scaled by lora_alpha / lora_rank (None: 2 x lora_rank)"""
    lora_target_modules: str = "all-linear"
    """the layers that get adapters: all-linear (every linear layer but the LM head), or names: q_proj,v_proj"""

    # ---- algorithm specific arguments ----
    critic_learning_rate: float = 1e-5
    """AdamW learning rate of the critic"""
    gamma: float = 1.0
    """discount"""
    lam: float = 1.0
    """GAE lambda (1.0: Monte Carlo return minus the critic's value)"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    value_clip: float = 0.2
    """clip of the new value around the old one in the value loss"""
    kl_coef: float = 1e-4
    """coefficient of the k3 KL to the reference in the loss (per token clamped to [0, 10], summed per sequence)"""
    max_ratio: float = 10.0
    """skip a micro-batch whose mean ratio pi/pi_old exceeds this (VinePPO's code); counted in losses/skipped"""
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        "none"
    """importance weights p_learner / p_sampler on each token's policy loss, for the sampler-learner mismatch (TRL's
    vllm_importance_sampling_mode; see rollout_correction). Default none: VinePPO's code, whose PPO this is,
    recomputes the old log-probs with the trained model and never reads the sampler's"""
    rollout_correction_cap: float = 3.0
    """upper cap C of those weights: *_truncate clips a ratio at C, *_mask gives 0 above C (TRL's default, 3)"""
    whiten_advantages: bool = True
    """normalise advantages over the batch's response tokens"""

    # ---- computed at runtime ----
    batch_size: int = 0
    """(computed) samples per iteration: num_prompts * samples_per_prompt"""


# ---------------------------------------------------------------------------------------------------------
# The algorithm's pure functions: each is tested on its own in tests/test_ppo.py.
# Shapes: B = samples in the batch, T = response tokens (right-padded); mask is 1 on real response tokens.
# ---------------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); 0 outside the mask. Under torchrun the mean
    and the variance are the whole batch's: every rank's sums are added up (dist.all_sum)."""
    n = dist.all_sum(mask.sum())
    mean = dist.all_sum((x * mask).sum()) / n.clamp(min=1)
    var = dist.all_sum(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def outcome_rewards(texts: list[str], finished: list[bool], answers: list[str], questions: list[str]) -> list[float]:
    """1.0 for a correct final answer, 0.0 otherwise; a response cut by the length limit scores 0. The grader
    reads the question too: an answer that only hands its calculation back (\\boxed{59 * 100}) scores 0."""
    return [grade(text, gold, question=q) if done else 0.0
            for text, done, gold, q in zip(texts, finished, answers, questions)]


def place_rewards(scores: torch.Tensor, lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B,) outcome scores -> (B, T) token rewards: the score sits on each response's LAST token (its EOS
    token, or the last token of a truncated response) and never on padding after it."""
    rewards = torch.zeros(len(scores), num_tokens, dtype=torch.float32, device=lengths.device)
    rewards[torch.arange(len(scores), device=lengths.device), lengths - 1] = scores.float().to(lengths.device)
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded responses. (B, T) each -> (advantages, returns).

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), with V = 0 after the last token (the episode ends there);
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.
    """
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target); NaN when the target is constant (e.g. all rewards 0)."""
    var = torch.var(target)
    return float("nan") if var < 1e-8 else float(1 - torch.var(target - predicted) / var)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, max_kl: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased), clamped
    to [0, max_kl] as VinePPO's code does, and 0 outside the mask. The log-ratio is masked BEFORE the exp:
    a padded position's log-prob can be below -88, whose exp overflows float32 and turns 0 * inf into NaN."""
    log_ratio = (ref_logprobs - logprobs) * mask
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(0, max_kl) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float, weights=None):
    """Clipped surrogate, token mean, each token's loss times its rollout-correction weight (`weights`, (B, T); None:
    1). Returns (loss, clip fraction, approx KL(old || new), mean ratio); the last three are detached statistics. The
    log-ratio is masked before the exp (see kl_k3)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = torch.max(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac.detach(), approx_kl.detach(), masked_mean(ratio, mask).detach()


def rollout_correction(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> torch.Tensor:
    """Importance weights for the sampler-learner mismatch: (B, T) weights on each response token's policy
    loss. `logprobs` are the learner's old log-probs, `sampler_logprobs` the generator's own for the same
    sampled tokens (with its numerics: a bfloat16 copy, or vLLM), both (B, T); the ratio is p_learner / p_sampler.
    The modes are TRL's vllm_importance_sampling_mode (upper cap only):
      none               1 on every response token (no correction)
      token_truncate     each token's ratio, truncated at `cap`: min(ratio, cap)
      token_mask         each token's ratio; a token whose ratio exceeds `cap` gets 0
      sequence_truncate  one ratio per response, exp(sum of its tokens' log-ratios), truncated at `cap`
      sequence_mask      that ratio, or 0 for the whole response when it exceeds `cap`
    Weights are 0 outside `mask`. The log-ratio is masked before the exp (see kl_k3)."""
    if mode == "none":
        return mask.float()
    log_ratio = (logprobs - sampler_logprobs) * mask  # (B, T)
    if mode in ("sequence_truncate", "sequence_mask"):
        log_ratio = log_ratio.sum(1, keepdim=True)  # (B, 1): one ratio per response
    elif mode not in ("token_truncate", "token_mask"):
        raise ValueError(f"unknown rollout correction {mode!r}")
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        ratio = ratio.clamp(max=cap)
    else:
        ratio = ratio.masked_fill(ratio > cap, 0.0)
    return ratio * mask  # (B, T): a sequence's ratio on each of its tokens


def lr_multiplier(opt_step: int, total_steps: int, warmup_ratio: float, decay: str) -> float:
    """Learning-rate factor of optimizer step `opt_step` (0-based) out of `total_steps`: a linear warm-up
    1/w, 2/w, ..., 1 over the first w = ceil(warmup_ratio * total_steps) steps, then constant, or a linear
    decay (total - s) / (total - w) towards 0 (VinePPO's DeepSpeed WarmupDecayLR)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if opt_step < warmup:
        return (opt_step + 1) / warmup
    if decay == "constant":
        return 1.0
    return max(0.0, (total_steps - opt_step) / max(1, total_steps - warmup))


def ppo_value_loss(values, old_values, returns, mask, value_clip: float):
    """0.5 * token mean of max((V - G)^2, (clip(V, V_old +- c) - G)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ---------------------------------------------------------------------------------------------------------
# Models: the critic, and the forward pass that reads response-token log-probs / values.
# ---------------------------------------------------------------------------------------------------------
class Critic(nn.Module):
    """The policy's transformer (a separate copy) with a linear value head on the last hidden state."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1 / np.sqrt(hidden_size + 1))  # as VinePPO's critic
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        # Under bf16 autocast (--bf16 on, or CUDA) the head runs in bfloat16 all the same (autocast casts a Linear's
        # input and weight, whatever their dtype): the values then carry bf16's ~3 significant digits.
        return self.head(hidden.float()).squeeze(-1)  # (B, L)


@dataclass
class Batch:
    """Prompts left-padded and responses right-padded into one (B, P + T) block, so that every
    response token sits at column P + t and the prediction for it at column P + t - 1."""

    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, P + T), counting from the first real token (matches generation)
    response_mask: torch.Tensor  # (B, T) 1 on response tokens (EOS included)
    prompt_width: int  # P

    def rows(self, idx) -> "Batch":
        """A sub-batch, trimmed to its own longest prompt and response (less padding, less compute)."""
        attention, response_mask = self.attention_mask[idx], self.response_mask[idx]
        first = int(attention.argmax(1).min())  # leftmost real token among these rows
        T = int(response_mask.sum(1).max())
        cols = slice(first, self.prompt_width + T)
        return Batch(self.input_ids[idx][:, cols], attention[:, cols], self.position_ids[idx][:, cols],
                     response_mask[:, :T], self.prompt_width - first)


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    P = max(len(p) for p in prompts)
    T = max(len(r) for r in responses)
    B = len(prompts)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        input_ids[i, P : P + len(r)] = torch.tensor(r)
        attention_mask[i, P - len(p) : P + len(r)] = 1
        response_mask[i, : len(r)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, attention_mask, position_ids, response_mask, P)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[target] for (N, V) logits and (N,) targets -> (N,), in float32."""
    logits = logits.float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False, chunk: int = 256):
    """Log-prob of each response token under `model` at the sampling temperature: (B, T) [, entropy (B, T)].

    Memory-lean: the model computes logits only at the T positions that predict response tokens
    (`logits_to_keep`), and the float32 log-softmax runs over `chunk` positions at a time. Under autograd each
    chunk is checkpointed, so its float32 copy is rebuilt in the backward pass instead of being kept: at a
    151k vocabulary, one full (8 x 1,024)-token float32 copy would be 4.6 GiB, one 256-position chunk 0.15 GiB.
    The entropy (a statistic, no gradient) is computed from the same chunks."""
    dev = model.device
    T = batch.response_mask.shape[1]
    # Column P - 1 + t predicts response token t: the last T + 1 columns, minus the very last one.
    logits = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                   position_ids=batch.position_ids.to(dev), use_cache=False, logits_to_keep=T + 1).logits[:, :-1]
    flat = logits.reshape(-1, logits.shape[-1])  # (B * T, V) in the compute dtype (bf16 under autocast)
    targets = batch.input_ids[:, batch.prompt_width :].reshape(-1).to(dev)  # (B * T,)
    pieces, entropies = [], []
    for start in range(0, flat.shape[0], chunk):
        part, tgt = flat[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(token_logprobs, part, tgt, temperature, use_reentrant=False))
        else:
            pieces.append(token_logprobs(part, tgt, temperature))
        if with_entropy:
            with torch.no_grad():
                logp = torch.log_softmax(part.float() / temperature, dim=-1)
                entropies.append(-(logp.exp() * logp).sum(-1))
    out = torch.cat(pieces).view(logits.shape[:2])  # on the model's device, as everything the loss reads
    if not with_entropy:
        return out
    return out, torch.cat(entropies).view(logits.shape[:2])


def critic_values(critic: Critic, batch: Batch) -> torch.Tensor:
    """V(s_t) for each response token t, read at the position before it (the state it is sampled from)."""
    dev = critic.head.weight.device
    values = critic(batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.position_ids.to(dev))
    T = batch.response_mask.shape[1]
    return values[:, batch.prompt_width - 1 : batch.prompt_width - 1 + T]


def in_micro_batches(fn, batch: Batch, micro_batches) -> torch.Tensor:
    """(B, T) outputs of `fn` run on each micro-batch (a tensor of row indices) of the step's fixed partition,
    put back at their rows, on the device `fn` gives them on (the model's); 0 past each micro-batch's own
    longest response."""
    out = None
    for rows in micro_batches:
        result = fn(batch.rows(rows)).float()
        if out is None:
            out = torch.zeros(batch.response_mask.shape, device=result.device)
        out[rows, : result.shape[1]] = result
    return out


def check_args(args: Args) -> None:
    """Reject out-of-range values and inconsistent batch sizes before anything is loaded or written."""
    check_shared_args(args)
    check_ranges(args, {">= 0": ["critic_learning_rate", "kl_coef"], "> 0": ["clip_eps", "value_clip", "max_ratio"],
                        "in [0, 1]": ["gamma", "lam"]})


# ---------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    # 1. Set-up: arguments, seeds, data, models, optimizers, generator, the run's bookkeeping.
    args = resume_args(Args, args)
    check_args(args)
    device, autocast, checkpointing = setup(args)
    # The frozen reference never trains: on a GPU it is kept in bfloat16 (half the memory). On the CPU it
    # stays float32 like the policy, so that at equal weights it gives exactly the policy's log-probs
    # (bf16 weights and bf16 autocast over float32 weights round differently). On a GPU the KL to the
    # reference therefore starts above 0 (a floor of rounding, docs/ppo.md), not at exactly 0.
    ref_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    # Fail now, with one line, if the run clearly cannot fit (estimated from the config: no weight is loaded).
    check_memory(args.model, device, trainable=2, frozen=1, frozen_dtype=ref_dtype, backend=args.backend,
                 vllm_share=args.vllm_gpu_memory_utilization, micro_batch=args.micro_batch_size,
                 max_new_tokens=args.max_new_tokens, checkpointing=checkpointing, **memory_layout(args))

    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    eval_problems = load_problems(args.dataset, "test", size=args.num_eval_problems, seed=0)
    tokenizer = load_tokenizer(args.model)
    # The trained models: LoRA adapters with --lora-rank; under torchrun wrapped in DDP (or FSDP2 with --fsdp).
    policy = dist.wrap(load_trained(args, device, checkpointing), args.fsdp)
    reference = load_reference(args, policy, ref_dtype, device)  # with LoRA: the policy with its adapters off
    critic = dist.wrap(Critic(load_trained(args, device, checkpointing).get_decoder(), policy.config.hidden_size)
                       .to(device), args.fsdp)
    # AdamW as VinePPO's code sets it (eps 1e-8, no weight decay), warm-up then linear decay over the run's
    # optimizer steps: num_steps x num_epochs x minibatches per batch.
    total_opt_steps = args.num_steps * args.num_epochs * (args.batch_size // args.minibatch_size)
    schedule = lambda s: lr_multiplier(s, total_opt_steps, args.warmup_ratio, args.lr_decay)  # noqa: E731
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                   weight_decay=args.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_learning_rate, eps=args.adam_eps,
                                   weight_decay=args.weight_decay)
    policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, schedule)
    critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, schedule)
    generator = make_run_generator(args, policy, tokenizer)
    # The run folder, metrics, checkpoints (with --resume: everything below restored from the newest one).
    run = Run(args, "ppo.py", models={"policy": policy, "critic": critic},
              optimizers={"policy": policy_opt, "critic": critic_opt},
              schedulers={"policy": policy_sched, "critic": critic_sched},
              generator=generator, tokenizer=tokenizer, eval_problems=eval_problems)

    for step in run.steps():
        t_step = time.time()

        # 2.1 Sample a batch of prompts and generate samples_per_prompt responses to each.
        first = ((step - 1) * args.num_prompts) % len(train_problems)
        problems = [train_problems[(first + i) % len(train_problems)] for i in range(args.num_prompts)]
        prompts = [prompt_ids(tokenizer, p.question) for p in problems]
        t0 = time.time()
        outs = generator.generate(prompts, n=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed * 100_003 + step)
        completions = [c for row in outs for c in row]  # (B,) prompt-major: sample j of prompt i at i*K + j
        t_gen = time.time() - t0

        # 2.2 Grade: outcome reward on the EOS token, 0 for a truncated response.
        answers = [p.answer for p in problems for _ in range(args.samples_per_prompt)]
        questions = [p.question for p in problems for _ in range(args.samples_per_prompt)]
        scores = torch.tensor(outcome_rewards([c.text for c in completions], [c.finished for c in completions], answers,
                                              questions))
        # Under torchrun every rank holds the whole batch's rollouts; each trains on its share of the prompts
        # with all their samples (B below is then B / ranks).
        prompts, completions, scores = dist.share(prompts), dist.share(completions), dist.share(scores)
        batch = make_batch([p for p in prompts for _ in range(args.samples_per_prompt)],
                           [c.token_ids for c in completions], tokenizer.pad_token_id)
        mask = batch.response_mask.to(device)  # (B, T), on the run's device as every (B, T) tensor the loss reads
        lengths = mask.sum(1).long()  # (B,)
        rewards = place_rewards(scores, lengths, mask.shape[1])  # (B, T)

        # 2.3 PPO's own part: old log-probs, reference log-probs, critic values, GAE advantages.
        # The micro-batches are fixed once per step: these no-grad passes and every epoch of the update see
        # the same rows with the same padding, so in bf16 they run the same arithmetic and the ratio is
        # exactly 1 at unchanged weights. The epochs shuffle the order of micro-batches, not their contents.
        generator.sleep()  # vLLM on a GPU frees its weights and KV cache until the next sync; no-op otherwise
        micro_batches = torch.randperm(len(mask)).split(args.micro_batch_size)  # row indices, (b,) each
        t0 = time.time()
        with torch.no_grad(), autocast():
            policy.eval()
            old_logprobs = in_micro_batches(lambda b: response_logprobs(policy, b, args.temperature), batch,
                                            micro_batches) * mask  # (B, T)
            ref_logprobs = in_micro_batches(lambda b: response_logprobs(reference, b, args.temperature), batch,
                                            micro_batches) * mask  # (B, T)
        t_ref = time.time() - t0
        #     The sampler's own log-probs of the same tokens against the learner's: the mismatch (logged), and
        #     the rollout correction's weight on each token's policy loss (1 with --rollout-correction none).
        sampled = sampler_logprobs(completions, device)  # (B, T)
        is_weights = rollout_correction(old_logprobs, sampled, mask, args.rollout_correction,
                                        args.rollout_correction_cap)  # (B, T)
        mismatch = mismatch_stats(old_logprobs, sampled, mask, is_weights, args.rollout_correction,
                                  args.rollout_correction_cap)
        t0 = time.time()
        with torch.no_grad(), autocast():
            critic.eval()
            old_values = in_micro_batches(lambda b: critic_values(critic, b), batch, micro_batches) * mask
        t_critic = time.time() - t0
        advantages, returns = compute_gae(rewards, old_values, mask, args.gamma, args.lam)  # (B, T) each
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 2.4 Update: num_epochs passes; each minibatch is `accumulation` micro-batches of the step's fixed
        # partition, in a new random order every epoch, with gradients accumulated over them.
        t0 = time.time()
        policy.train()
        critic.train()
        stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "kl_k3")}
        accumulation = args.minibatch_size // dist.world() // args.micro_batch_size  # micro-batches per minibatch
        skipped = 0
        lr = policy_sched.get_last_lr()[0]  # the learning rate of this step's first optimizer step
        for _ in range(args.num_epochs):
            for group in torch.randperm(len(micro_batches)).split(accumulation):
                # token-mean over the minibatch (under torchrun: each rank's share of it, see dist.rank_mean)
                mb_tokens = dist.rank_mean(sum(mask[micro_batches[i]].sum() for i in group))
                for micro in (micro_batches[i] for i in group):
                    sub = batch.rows(micro)
                    m = sub.response_mask.to(device)  # (b, t): the micro-batch trimmed to its longest response
                    cut = lambda x: x[micro, : m.shape[1]]  # noqa: E731  (b, t) slice of a (B, T) tensor
                    weight = m.sum() / mb_tokens
                    with autocast():
                        logprobs, entropy = response_logprobs(policy, sub, args.temperature, with_entropy=True)
                        pg_loss, clipfrac, approx_kl, ratio = ppo_policy_loss(
                            logprobs, cut(old_logprobs), cut(advantages), m, args.clip_eps, cut(is_weights))
                        kl = kl_k3(logprobs, cut(ref_logprobs), m).sum(1).mean()  # summed per sequence
                    if ratio > args.max_ratio:  # a diverged micro-batch: skip it, as VinePPO's code does
                        skipped += 1
                        if dist.active():  # every rank joins each gradient reduction: a backward of zero
                            dist.zero_loss(logprobs, critic_values(critic, sub)).backward()
                        continue
                    # weight turns micro-batch token means into the minibatch token mean; the KL, a mean
                    # over sequences, takes each micro-batch's share 1 / accumulation. The policy's graph is
                    # freed by its backward before the critic's forward, so the two never coexist.
                    (pg_loss * weight + args.kl_coef * kl / accumulation).backward()
                    with autocast():
                        values = critic_values(critic, sub)
                        v_loss = ppo_value_loss(values, cut(old_values), cut(returns), m, args.value_clip)
                    (v_loss * weight).backward()
                    for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("clipfrac", clipfrac),
                                 ("approx_kl", approx_kl), ("entropy", masked_mean(entropy, m)), ("kl_k3", kl)):
                        stats[k].append(float(v.detach()))
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                policy_opt.step()
                critic_opt.step()
                policy_sched.step()
                critic_sched.step()
                policy_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
        generator.sync_weights(policy)
        t_update = time.time() - t0

        # 2.5 Log; evaluate every eval_every steps.
        kl_k1 = ((old_logprobs - ref_logprobs) * mask).sum(1).mean()
        explained_var = explained_variance(old_values[mask.bool()], returns[mask.bool()])
        step_time = time.time() - t_step
        logs = {
            "charts/reward_mean": scores.mean(), "charts/response_length": lengths.float().mean(),
            "charts/truncated_frac": 1 - np.mean([c.finished for c in completions]),
            "charts/step_time": step_time, "charts/learning_rate": lr,
            "losses/policy_loss": np.mean(stats["policy_loss"]), "losses/value_loss": np.mean(stats["value_loss"]),
            "losses/clipfrac": np.mean(stats["clipfrac"]), "losses/approx_kl": np.mean(stats["approx_kl"]),
            "losses/entropy": np.mean(stats["entropy"]), "losses/kl_ref_k3": np.mean(stats["kl_k3"]),
            "losses/kl_ref_k1": kl_k1, "losses/explained_variance": explained_var, "losses/skipped": skipped,
            "time/generation": t_gen, "time/reference": t_ref, "time/critic": t_critic, "time/update": t_update,
            **mismatch,  # the sampler-learner mismatch and the rollout correction's weights
        }
        run.log(step, logs)
        if run.end_step(step):
            break

    # 3. Save the final policy.
    run.finish(policy, tokenizer)


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:
        main(cli_args)
    except (ModelLoadError, DataError) as e:
        sys.exit(f"error: {e}")
