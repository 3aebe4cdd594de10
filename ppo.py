"""PPO with a learned critic for LLM reasoning (Schulman et al. 2017, arXiv 1707.06347; the LLM recipe of
Ouyang et al. 2022 and of VinePPO's PPO baseline, arXiv 2410.01679, appendix).

The policy samples responses to math prompts; a grader gives reward 1 or 0 on the last (EOS) token. A
critic (a copy of the policy's transformer with a linear value head) predicts V(s_t) for every response
prefix; GAE turns rewards and values into per-token advantages, which are whitened and fed to the clipped
PPO surrogate for several epochs of minibatches. A KL penalty keeps the policy near its starting point.
This is the baseline every other script in this repository is compared with.

Choices (shared/docs/ALGORITHMS.md section 1 gives the options):
- KL: VinePPO's k3 estimator in the loss (per token, summed per sequence, coefficient 1e-4), not TRL's
  k1 penalty in the reward; both are logged.
- GAE with gamma = 1 and lambda = 1 (VinePPO's PPO runs); `--lam 0.95` gives TRL's setting.
- Defaults are sized for the offline CPU run (8 prompts x 4 samples, lr 1e-5, 128 new tokens); the
  paper's scale (64 x 8, lr 1e-6, T = 0.6, top-p 0.9) is a matter of flags on a GPU.
- Optimizer as VinePPO's code: AdamW with eps 1e-8 and no weight decay, 3% linear warm-up, then linear
  decay over the optimizer steps of --num-steps (flags: --adam-eps, --weight-decay, --warmup-ratio,
  --lr-decay). The critic uses the same settings with its own learning rate.
- KL and ratio safety as VinePPO's code: per-token k3 clamped to [0, 10]; log-ratios masked before any
  exp; a micro-batch whose mean ratio exceeds --max-ratio (10) is skipped and counted (losses/skipped).
- Batch invariance: each step's micro-batch partition is drawn once; the old, reference and critic passes
  and every epoch of the update run exactly those micro-batches (epochs shuffle their order), so at
  unchanged weights the update's log-probs equal the old ones bit for bit and clipfrac / approx_kl /
  kl_ref_k3 measure only the update. The price: the no-grad passes use the update's micro-batch size.
- Memory: logits only at response positions, float32 log-softmax one chunk at a time (checkpointed under
  autograd); the policy's graph is freed before the critic's forward; gradient checkpointing on CUDA by
  default; the frozen reference in bfloat16 on CUDA (on the CPU it stays float32 so that it reproduces
  the policy's log-probs exactly at step 0).
- The policy trains in float32 with bfloat16 autocast (3x faster than float32 on the CPU, same on GPU);
  sampling uses a bfloat16 copy of the policy (or vLLM), refreshed after each update.

Run:  python ppo.py                                                        # CPU, offline, default
      python ppo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --backend vllm   # one GPU
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.args import check_ranges
from common.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, saved_args, set_rng_state
from common.data import DEFAULT_DATASET, DataError, load_problems, prompt_ids
from common.generation import make_generator
from common.grading import grade
from common.models import (DEFAULT_MODEL, ModelLoadError, check_memory, default_device, load_model, load_tokenizer,
                           resolve_model_path)


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
    bf16: bool = True
    """compute forwards and backwards under bfloat16 autocast (weights and optimizer stay float32)"""
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
    learning_rate: float = 1e-5
    """AdamW learning rate of the policy"""
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
    num_eval_problems: int = 200
    """held-out problems for the greedy evaluation"""
    eval_every: int = 4
    """greedy evaluation every N iterations (and before the first and after the last)"""
    num_logged_samples: int = 3
    """sample completions written to the log at each evaluation"""
    max_minutes: float | None = None
    """stop training after this many minutes of wall-clock (then evaluate and save), for equal-time comparisons"""
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
    """(x - mean) / std over the masked entries (unbiased variance); 0 outside the mask."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def outcome_rewards(texts: list[str], finished: list[bool], answers: list[str]) -> list[float]:
    """1.0 for a correct final answer, 0.0 otherwise; a response cut by the length limit scores 0."""
    return [grade(text, gold) if done else 0.0 for text, done, gold in zip(texts, finished, answers)]


def place_rewards(scores: torch.Tensor, lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B,) outcome scores -> (B, T) token rewards: the score sits on each response's LAST token (its EOS
    token, or the last token of a truncated response) and never on padding after it."""
    rewards = torch.zeros(len(scores), num_tokens, dtype=torch.float32)
    rewards[torch.arange(len(scores)), lengths - 1] = scores.float()
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded responses. (B, T) each -> (advantages, returns).

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), with V = 0 after the last token (the episode ends there);
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.
    """
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0])
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


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float):
    """Clipped surrogate, token mean. Returns (loss, clip fraction, approx KL(old || new), mean ratio); the
    last three are detached statistics. The log-ratio is masked before the exp (see kl_k3)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac.detach(), approx_kl.detach(), masked_mean(ratio, mask).detach()


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
    out = torch.cat(pieces).view(logits.shape[:2]).cpu()
    if not with_entropy:
        return out
    return out, torch.cat(entropies).view(logits.shape[:2]).cpu()


def critic_values(critic: Critic, batch: Batch) -> torch.Tensor:
    """V(s_t) for each response token t, read at the position before it (the state it is sampled from)."""
    dev = critic.head.weight.device
    values = critic(batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.position_ids.to(dev))
    T = batch.response_mask.shape[1]
    return values[:, batch.prompt_width - 1 : batch.prompt_width - 1 + T].cpu()


def in_micro_batches(fn, batch: Batch, micro_batches) -> torch.Tensor:
    """(B, T) outputs of `fn` run on each micro-batch (a tensor of row indices) of the step's fixed partition,
    put back at their rows; 0 past each micro-batch's own longest response."""
    out = torch.zeros(batch.response_mask.shape)
    for rows in micro_batches:
        result = fn(batch.rows(rows))
        out[rows, : result.shape[1]] = result.float()
    return out


# ---------------------------------------------------------------------------------------------------------
# Evaluation and logging helpers.
# ---------------------------------------------------------------------------------------------------------
def evaluate(generator, tokenizer, problems, max_new_tokens: int) -> tuple[float, list[tuple[str, str, float]]]:
    """Greedy accuracy on held-out problems, and (question, response, score) for each."""
    outs = generator.generate([prompt_ids(tokenizer, p.question) for p in problems], n=1,
                              max_new_tokens=max_new_tokens, temperature=0.0)
    scores = outcome_rewards([o[0].text for o in outs], [o[0].finished for o in outs], [p.answer for p in problems])
    return float(np.mean(scores)), [(p.question, o[0].text, s) for p, o, s in zip(problems, outs, scores)]


def samples_markdown(samples: list[tuple[str, str, float]]) -> str:
    rows = ["| question | response | reward |", "|---|---|---|"]
    for q, r, s in samples:
        rows.append(f"| {q} | {r} | {s:.0f} |".replace("\n", "<br>"))
    return "\n".join(rows)


def check_args(args: Args) -> None:
    """Reject out-of-range values and inconsistent batch sizes before anything is loaded or written."""
    check_ranges(args, {
        ">= 1": ["num_steps", "num_prompts", "samples_per_prompt", "max_new_tokens", "num_epochs", "minibatch_size",
                 "micro_batch_size", "gen_batch_size", "num_train_problems", "num_eval_problems", "eval_every",
                 "keep_checkpoints", "vllm_max_model_len"],
        ">= 0": ["learning_rate", "critic_learning_rate", "weight_decay", "kl_coef", "num_logged_samples", "save_every"],
        "> 0": ["temperature", "adam_eps", "max_grad_norm", "max_minutes", "clip_eps", "value_clip", "max_ratio"],
        "in (0, 1]": ["top_p", "vllm_gpu_memory_utilization"],
        "in [0, 1]": ["warmup_ratio", "gamma", "lam"],
    })
    args.batch_size = args.num_prompts * args.samples_per_prompt
    if args.batch_size % args.minibatch_size:
        raise SystemExit(f"error: --minibatch-size {args.minibatch_size} must divide the batch "
                         f"(num_prompts * samples_per_prompt = {args.batch_size})")
    if args.minibatch_size % args.micro_batch_size:
        raise SystemExit(f"error: --micro-batch-size {args.micro_batch_size} must divide "
                         f"--minibatch-size {args.minibatch_size}")
    if args.max_new_tokens is None:
        generated = not (args.dataset in ("gsm8k", "math") or args.dataset.endswith((".jsonl", ".json", ".parquet")))
        args.max_new_tokens = 128 if generated else 512
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this torch build sees no CUDA device: use --device cpu (or auto)")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("error: --track needs wandb: pip install wandb") from None


# ---------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    # 1. Set-up: arguments, seeds, data, models, optimizers, generator, logger.
    if args.resume is not None:  # continue a run: the arguments it was started with, its folder
        args = Args(**{**saved_args(args.resume), "resume": args.resume})
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = default_device() if args.device == "auto" else args.device
    autocast = (lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)) if args.bf16 \
        else contextlib.nullcontext

    checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and device.startswith("cuda"))
    # The frozen reference never trains: on a GPU it is kept in bfloat16 (half the memory). On the CPU it
    # stays float32 like the policy, so that at equal weights it gives exactly the policy's log-probs
    # (bf16 weights and bf16 autocast over float32 weights round differently).
    ref_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    # Fail now, with one line, if the run clearly cannot fit (estimated from the config: no weight is loaded).
    check_memory(args.model, device, trainable=2, frozen=1, frozen_dtype=ref_dtype, backend=args.backend,
                 vllm_share=args.vllm_gpu_memory_utilization, micro_batch=args.micro_batch_size,
                 max_new_tokens=args.max_new_tokens, checkpointing=checkpointing)

    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    eval_problems = load_problems(args.dataset, "test", size=args.num_eval_problems, seed=0)
    tokenizer = load_tokenizer(args.model)
    policy = load_model(args.model, device=device, gradient_checkpointing=checkpointing)
    reference = load_model(args.model, dtype=ref_dtype, device=device).eval().requires_grad_(False)
    critic = Critic(load_model(args.model, device=device, gradient_checkpointing=checkpointing)
                    .get_decoder(), policy.config.hidden_size).to(device)
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
    generator = make_generator(args.backend, policy, tokenizer, resolve_model_path(args.model),
                               batch_size=args.gen_batch_size, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                               seed=args.seed, max_model_len=args.vllm_max_model_len,
                               enforce_eager=args.vllm_enforce_eager)

    run_dir = args.resume or os.path.join(args.output_dir, f"{args.exp_name}__{args.seed}__{int(time.time())}")
    run_name = os.path.basename(os.path.normpath(run_dir))
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    start_step, elapsed, eval_acc = 1, 0.0, float("nan")
    if args.resume:  # restore everything the checkpoint holds; the metrics written after it are dropped
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise SystemExit(f"error: {run_dir} has no checkpoint yet (runs write them with --save-every N, or on Ctrl-C)")
        state = load_checkpoint(checkpoint)
        for obj, key in ((policy, "policy"), (critic, "critic")):
            obj.load_state_dict(state["models"][key])
        for obj, key in ((policy_opt, "policy"), (critic_opt, "critic")):
            obj.load_state_dict(state["optimizers"][key])
        for obj, key in ((policy_sched, "policy"), (critic_sched, "critic")):
            obj.load_state_dict(state["schedulers"][key])
        generator.sync_weights(policy)
        os.truncate(metrics_path, state["metrics_bytes"])
        start_step, elapsed, eval_acc = state["step"] + 1, state["elapsed"], state["eval_acc"]
        tqdm.write(f"resuming {run_dir} after step {state['step']}")
    else:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
    writer = SummaryWriter(run_dir, purge_step=start_step if args.resume else None)  # purge: drop the lost steps
    if not args.resume:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, name=run_name, config=asdict(args), sync_tensorboard=True,
                   resume="allow" if args.resume else None)
    history = open(metrics_path, "a" if args.resume else "w", buffering=1)  # line-buffered: readable live
    start_time = time.time() - elapsed
    # Ctrl-C asks the loop to stop after the current step and write a checkpoint; a second one stops at once.
    stop = {"requested": False}

    def on_interrupt(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        tqdm.write("Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to quit now)")

    signal.signal(signal.SIGINT, on_interrupt)

    def run_eval(step: int) -> float:
        acc, samples = evaluate(generator, tokenizer, eval_problems, args.max_new_tokens)
        writer.add_scalar("charts/eval_accuracy", acc, step)
        writer.add_text("samples/eval", samples_markdown(samples[: args.num_logged_samples]), step)
        history.write(json.dumps({"step": step, "eval_accuracy": acc, "wall_s": time.time() - start_time}) + "\n")
        return acc

    if not args.resume:
        eval_acc = run_eval(0)
        tqdm.write(f"step 0: held-out greedy accuracy {eval_acc:.3f} on {len(eval_problems)} problems")
    else:
        set_rng_state(state["rng"])  # the generators exactly as they were after the checkpoint's step
    progress = tqdm(range(start_step, args.num_steps + 1), desc=args.exp_name, dynamic_ncols=True)
    for step in progress:
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
        scores = torch.tensor(outcome_rewards([c.text for c in completions], [c.finished for c in completions], answers))
        batch = make_batch([p for p in prompts for _ in range(args.samples_per_prompt)],
                           [c.token_ids for c in completions], tokenizer.pad_token_id)
        mask = batch.response_mask  # (B, T)
        lengths = mask.sum(1).long()  # (B,)
        rewards = place_rewards(scores, lengths, mask.shape[1])  # (B, T)

        # 2.3 PPO's own part: old log-probs, reference log-probs, critic values, GAE advantages.
        # The micro-batches are fixed once per step: these no-grad passes and every epoch of the update see
        # the same rows with the same padding, so in bf16 they run the same arithmetic and the ratio is
        # exactly 1 at unchanged weights. The epochs shuffle the order of micro-batches, not their contents.
        generator.sleep()  # vLLM on a GPU frees its weights and KV cache until the next sync; no-op otherwise
        micro_batches = torch.randperm(args.batch_size).split(args.micro_batch_size)  # row indices, (b,) each
        t0 = time.time()
        with torch.no_grad(), autocast():
            policy.eval()
            old_logprobs = in_micro_batches(lambda b: response_logprobs(policy, b, args.temperature), batch,
                                            micro_batches) * mask  # (B, T)
            ref_logprobs = in_micro_batches(lambda b: response_logprobs(reference, b, args.temperature), batch,
                                            micro_batches) * mask  # (B, T)
        t_ref = time.time() - t0
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
        accumulation = args.minibatch_size // args.micro_batch_size
        skipped = 0
        lr = policy_sched.get_last_lr()[0]  # the learning rate of this step's first optimizer step
        for _ in range(args.num_epochs):
            for group in torch.randperm(len(micro_batches)).split(accumulation):
                mb_tokens = sum(mask[micro_batches[i]].sum() for i in group)  # token-mean over the minibatch
                for micro in (micro_batches[i] for i in group):
                    sub = batch.rows(micro)
                    m = sub.response_mask  # (b, t): the micro-batch trimmed to its longest response
                    cut = lambda x: x[micro, : m.shape[1]]  # noqa: E731  (b, t) slice of a (B, T) tensor
                    weight = m.sum() / mb_tokens
                    with autocast():
                        logprobs, entropy = response_logprobs(policy, sub, args.temperature, with_entropy=True)
                        pg_loss, clipfrac, approx_kl, ratio = ppo_policy_loss(logprobs, cut(old_logprobs),
                                                                              cut(advantages), m, args.clip_eps)
                        kl = kl_k3(logprobs, cut(ref_logprobs), m).sum(1).mean()  # summed per sequence
                    if ratio > args.max_ratio:  # a diverged micro-batch: skip it, as VinePPO's code does
                        skipped += 1
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
        }
        for k, v in logs.items():
            writer.add_scalar(k, float(v), step)
        history.write(json.dumps({"step": step, "wall_s": time.time() - start_time,
                                  **{k: float(v) for k, v in logs.items()}}) + "\n")
        out_of_time = args.max_minutes is not None and time.time() - start_time > 60 * args.max_minutes
        if step % args.eval_every == 0 or step == args.num_steps or out_of_time:
            eval_acc = run_eval(step)
            tqdm.write(f"step {step}: held-out greedy accuracy {eval_acc:.3f}")
        progress.set_postfix(reward=f"{scores.mean():.2f}", eval=f"{eval_acc:.3f}", s=f"{step_time:.0f}")
        if stop["requested"] or (args.save_every and step % args.save_every == 0):
            history.flush()
            save_checkpoint(run_dir, step, {
                "models": {"policy": policy.state_dict(), "critic": critic.state_dict()},
                "optimizers": {"policy": policy_opt.state_dict(), "critic": critic_opt.state_dict()},
                "schedulers": {"policy": policy_sched.state_dict(), "critic": critic_sched.state_dict()},
                "rng": rng_state(), "metrics_bytes": history.tell(), "elapsed": time.time() - start_time,
                "eval_acc": eval_acc}, keep=args.keep_checkpoints)
        if stop["requested"]:
            tqdm.write(f"stopped after step {step}; continue with: python ppo.py --resume {run_dir}")
            history.close()
            writer.close()
            return
        if out_of_time:
            tqdm.write(f"stopping: --max-minutes {args.max_minutes} reached after step {step}")
            break

    # 3. Save the final policy (written to a temporary folder first, so a crash leaves no half model).
    if args.save_model:
        final, tmp = os.path.join(run_dir, "final_model"), os.path.join(run_dir, "final_model.tmp")
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.move(tmp, final)
        tqdm.write(f"saved the final policy to {final}")
    history.close()
    writer.close()


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:
        main(cli_args)
    except (ModelLoadError, DataError) as e:
        sys.exit(f"error: {e}")
