"""Hista (Chen et al., "Hista and Numca", arXiv 2605.29782): state values from hidden-state neighbours among
a prompt's rollouts, on a GRPO/DAPO base. No critic, no extra model pass.

The value of a response prefix is a distance-weighted average of the final rewards of the nearest prefixes
among all rollouts of the same prompt in the batch, with distances between the policy's own last-layer
hidden states, taken from the forward pass that already computes the old log-probs. States are taken
every `--interval` response tokens; each token of segment j gets R - V(state_j), divided by the group's
reward std + 1e-4. The loss is DAPO's: clip-higher (0.2 / 0.28), token-level mean, no KL. `--no-hista`
gives plain GRPO/DAPO from the same file, and `diff numca.py hista.py` shows only the estimators.

Steps of the estimate (shared/docs/ALGORITHMS.md section 6; official code VOXXXX1874/Hista):
1. hidden states of the response tokens, smoothed along the sequence by a bias-corrected EMA (alpha
   0.7), then averaged in windows of 5 tokens: a prefix of p tokens is its first ceil(p / 5) windows;
2. MinDistance between two prefixes: for each window of the longer, the L2 distance to the nearest
   window of the shorter, summed and divided by the longer length; all pairs of a prompt's prefixes at
   once from one padded distance tensor (cumulative minimum, then cumulative sum);
3. the pool of a prefix: every candidate prefix of every rollout of the prompt (labelled with that
   rollout's reward), and of its own rollout only those no longer than itself; distances clamped below
   at d_min, the k nearest weighted by 1/d; k falls linearly from 66 to 6 along a response's states;
4. the first state's value is the group mean, the terminal state's is R.

Choices and departures:
- The EMA is the textbook bias-corrected one (it starts from zero, so a constant sequence stays constant)
  and runs over the response tokens only; the official code seeds it with the first hidden state of the
  whole padded sequence. Windows are averaged, as the paper says; the official code keeps every 5th
  smoothed vector instead.
- `--interval 10` (the paper: 50): the CPU default's responses are 30-120 tokens long, so 50 would give
  most of them no intermediate state at all; 10 gives 3-12 states per response.
- `--d-min 10` (the paper: 5 for Qwen2.5-1.5B): the floor decides how much a prefix's own rollout
  (distance 0) outweighs its neighbours, so it must scale with the model's hidden states. For
  SmolLM2-135M's last layer (hidden size 576, state norm ~49) we measured MinDistances between a
  prefix and other rollouts' prefixes of the same prompt of 9.3 / 18.3 / 27.5 (5% / median / 95%, 4
  prompts x 8 rollouts, T = 0.6); 10 treats the closest ~5% as equally close and gives the rollout's
  own prefix about twice the weight of a median neighbour (at 1 it would be 18 times).
- Defaults sized for the offline CPU run as in numca.py (4 prompts x 8 samples, lr 1e-5, T = 0.6).

Run:  python hista.py                                                        # CPU, offline, default
      python hista.py --no-hista                                             # the GRPO/DAPO baseline
      python hista.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset math --backend vllm   # one GPU
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.data import DEFAULT_DATASET, DataError, load_problems, prompt_ids
from common.generation import make_generator
from common.grading import grade
from common.models import DEFAULT_MODEL, ModelLoadError, default_device, load_model, load_tokenizer, resolve_model_path


@dataclass
class Args:
    # ---- shared by every script in this repository ----
    model: str = DEFAULT_MODEL
    """hub name or local folder of an instruct model; `smollm2-135m` is the offline default"""
    dataset: str = DEFAULT_DATASET
    """arithmetic (offline default), gsm8k, math, rg:<task>[:k=v,...], or a .jsonl/.parquet file"""
    backend: Literal["hf", "vllm"] = "hf"
    """generation backend: hf (transformers, CPU or GPU) or vllm (one GPU)"""
    seed: int = 1
    """seed of the run (data order, sampling, initialisation)"""
    num_steps: int = 20
    """training iterations (each: generate, grade, estimate, update)"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{exp_name}__{seed}__{unix time}"""
    exp_name: str = "hista"
    """name of the experiment, first part of the run folder"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: bool = True
    """compute forwards and backwards under bfloat16 autocast (weights and optimizer stay float32)"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy"""
    num_prompts: int = 4
    """prompts per iteration"""
    samples_per_prompt: int = 8
    """responses sampled per prompt (the group); the batch is num_prompts * samples_per_prompt samples"""
    max_new_tokens: int | None = None
    """response length limit in tokens (None: 128 for generated tasks, 512 for gsm8k, math and files)"""
    temperature: float = 0.6
    """sampling temperature (VinePPO's 0.6); log-probs for the ratio and KL use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling; below 1 the update is slightly off-policy"""
    num_epochs: int = 1
    """passes of PPO updates over each batch"""
    minibatch_size: int = 8
    """samples per optimizer step; must divide the batch"""
    micro_batch_size: int = 8
    """samples per forward/backward (gradient accumulation); must divide minibatch_size"""
    gen_batch_size: int = 64
    """sequences per generate call of the hf backend"""
    learning_rate: float = 1e-5
    """AdamW learning rate of the policy"""
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
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project: str = "llm-rl-reference"
    """wandb project name (with --track)"""
    vllm_gpu_memory_utilization: float = 0.3
    """share of GPU memory vLLM may take (the rest trains)"""

    # ---- algorithm specific arguments ----
    no_hista: bool = False
    """plain GRPO/DAPO: every token gets the group-normalised outcome advantage (the paper's baseline)"""
    interval: int = 10
    """response tokens between candidate states (the paper: 50 for responses thousands of tokens long)"""
    ema_alpha: float = 0.7
    """smoothing of the hidden states along the sequence (bias-corrected EMA)"""
    window: int = 5
    """smoothed hidden states are averaged in windows of this many tokens"""
    k_max: int = 66
    """neighbours used for a response's first state; k falls linearly to k_min at its last"""
    k_min: int = 6
    """neighbours used for a response's last state"""
    d_min: float = 10.0
    """distances are clamped below at this (weights 1 / d); depends on the model's hidden size"""
    lam: float = 1.0
    """lambda of the GAE-style pass over segments (1.0: R - V(state of the segment))"""
    clip_eps_low: float = 0.2
    """PPO ratio clip below 1"""
    clip_eps_high: float = 0.28
    """PPO ratio clip above 1 (DAPO's clip-higher)"""
    kl_coef: float = 0.0
    """coefficient of a k3 KL to the reference in the loss (0: no reference model is loaded)"""

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


def outcome_rewards(texts: list[str], finished: list[bool], answers: list[str]) -> list[float]:
    """1.0 for a correct final answer, 0.0 otherwise; a response cut by the length limit scores 0."""
    return [grade(text, gold) if done else 0.0 for text, done, gold in zip(texts, finished, answers)]


def ema_smooth(h: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bias-corrected exponential moving average along dim -2 of (..., T, D): m_t = alpha m_{t-1} + (1 - alpha)
    h_t from m_{-1} = 0, divided by 1 - alpha^(t+1). A constant sequence stays constant."""
    out = torch.empty_like(h)
    m = torch.zeros_like(h[..., 0, :])
    for t in range(h.shape[-2]):
        m = alpha * m + (1 - alpha) * h[..., t, :]
        out[..., t, :] = m / (1 - alpha ** (t + 1))
    return out


def window_means(h: torch.Tensor, window: int) -> torch.Tensor:
    """(T, D) -> (ceil(T / window), D): the mean of each window of `window` rows (the last may be shorter)."""
    T = h.shape[0]
    padded = torch.nn.functional.pad(h, (0, 0, 0, -T % window))
    counts = torch.nn.functional.pad(torch.ones(T), (0, -T % window)).view(-1, window).sum(1, keepdim=True)
    return padded.view(-1, window, h.shape[1]).sum(1) / counts


def min_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """MinDistance of two (L, D) sequences: for each row of the longer, the L2 distance to the nearest row of
    the shorter; summed and divided by the longer length."""
    longer, shorter = (a, b) if a.shape[0] >= b.shape[0] else (b, a)
    return float(torch.cdist(longer.float(), shorter.float()).min(dim=1).values.sum() / longer.shape[0])


def prefix_distances(reps: list[torch.Tensor]) -> torch.Tensor:
    """MinDistance between every prefix of every sequence and every prefix of every other, at once.

    reps: G sequences of shapes (L_g, D). Returns (G, G, L, L), L = max L_g, where [g, h, i - 1, j - 1] is
    min_distance(reps[g][:i], reps[h][:j]) (inf where a prefix does not exist). From one distance tensor M:
    for i >= j, sum over rows r < i of min over columns c < j of M[r, c] (a cumulative minimum along the
    columns, then a cumulative sum along the rows), divided by i; the other way round for i < j.
    """
    L = max(r.shape[0] for r in reps)
    lengths = torch.tensor([r.shape[0] for r in reps])
    X = torch.stack([torch.nn.functional.pad(r.float(), (0, 0, 0, L - r.shape[0])) for r in reps])  # (G, L, D)
    M = torch.cdist(X[:, None], X[None, :])  # (G, G, L, L)
    valid = torch.arange(L)[None, :] < lengths[:, None]  # (G, L)
    M = M.masked_fill(~(valid[:, None, :, None] & valid[None, :, None, :]), float("inf"))
    rows = torch.cumsum(torch.cummin(M, dim=3).values, dim=2)  # [.., i-1, j-1] = sum_{r<i} min_{c<j} M[r, c]
    cols = torch.cumsum(torch.cummin(M, dim=2).values, dim=3)  # [.., i-1, j-1] = sum_{c<j} min_{r<i} M[r, c]
    i = torch.arange(1, L + 1, dtype=torch.float32)[:, None]
    j = torch.arange(1, L + 1, dtype=torch.float32)[None, :]
    return torch.where(i >= j, rows / i, cols / j)


def knn_value(distances: torch.Tensor, rewards: torch.Tensor, k: int, d_min: float) -> float:
    """Distance-weighted k-nearest-neighbour estimate: distances clamped below at d_min, the k nearest kept
    (all if fewer), weights 1 / d, the weighted mean of their rewards. Infinite distances are not candidates."""
    ok = torch.isfinite(distances)
    d, r = distances[ok].clamp(min=max(d_min, 1e-8)), rewards[ok].float()  # a floor of 0 would divide by 0
    nearest = torch.topk(d, min(k, len(d)), largest=False).indices
    w = 1.0 / d[nearest]
    return float((w * r[nearest]).sum() / w.sum())


def linear_k(index: int, num_states: int, k_max: int, k_min: int) -> int:
    """k for the index-th of num_states states of a response: k_max at the first, k_min at the last."""
    if num_states <= 1:
        return k_max
    return round(k_max + (k_min - k_max) * index / (num_states - 1))


def candidate_prefixes(lengths: list[int], interval: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbour pool of a prompt: every `interval` tokens and the end of each rollout (lengths[g] response
    tokens), as (rollout index, windows in the prefix) tensors; a prefix of p tokens has ceil(p / window)."""
    cands = [[-(-p // window) for p in list(range(interval, T, interval)) + [T]] for T in lengths]
    return (torch.tensor([g for g, cs in enumerate(cands) for _ in cs]),
            torch.tensor([w for cs in cands for w in cs]))


def hista_group_values(hidden: list[torch.Tensor], rewards: list[float], interval: int, alpha: float,
                       window: int, k_max: int, k_min: int, d_min: float) -> tuple[list[list[float]], list[float]]:
    """Values of the states of every rollout of one prompt, from their response hidden states.

    hidden[g]: (T_g, D) last-layer hidden states of rollout g's response tokens. The states of rollout g
    start at tokens 0, interval, 2 * interval, ... (< T_g); state 0 takes the group mean, the others the
    kNN estimate. Returns the values and, per estimated state, the distance to its k-th neighbour.
    """
    reps = [window_means(ema_smooth(h.float(), alpha), window) for h in hidden]  # (ceil(T_g / window), D)
    D = prefix_distances(reps)  # (G, G, L, L)
    R = torch.tensor(rewards)
    cand_g, cand_w = candidate_prefixes([h.shape[0] for h in hidden], interval, window)
    group_mean = float(R.mean())
    values, kth = [], []
    for g, h in enumerate(hidden):
        starts = list(range(0, h.shape[0], interval))  # token where each state (segment) starts
        row = [group_mean]
        for s in range(1, len(starts)):
            w = -(-starts[s] // window)
            dist = D[g, cand_g, w - 1, cand_w - 1]  # (num candidates,)
            dist = torch.where((cand_g == g) & (cand_w > w), torch.full_like(dist, float("inf")), dist)
            k = linear_k(s, len(starts) + 1, k_max, k_min)  # the terminal state counts in the schedule
            row.append(knn_value(dist, R[cand_g], k, d_min))
            finite = dist[torch.isfinite(dist)].clamp(min=d_min)
            kth.append(float(finite.sort().values[min(k, len(finite)) - 1]))
        values.append(row)
    return values, kth


def segment_advantages(values: list[float], reward: float, lam: float = 1.0) -> list[float]:
    """values[j] = V(state of segment j) (values[0] = V(empty set)). GAE-style over segments:
    delta_j = V_{j+1} - V_j (last: R - V_last), A_j = delta_j + lam * A_{j+1}; lam = 1 gives R - V_j."""
    advantages = [0.0] * len(values)
    running = 0.0
    for j in reversed(range(len(values))):
        delta = (values[j + 1] if j + 1 < len(values) else reward) - values[j]
        running = delta + lam * running
        advantages[j] = running
    return advantages


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """(num_prompts, G) rewards -> (num_prompts,) unbiased std of each group (0 for a group of one)."""
    return rewards.std(dim=1) if rewards.shape[1] > 1 else torch.zeros(rewards.shape[0])


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(num_prompts, G) rewards -> (num_prompts, G): (R - group mean) / (group std + eps)."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (group_std(rewards)[:, None] + eps)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps_low: float, clip_eps_high: float):
    """Clipped surrogate with DAPO's clip-higher (ratio kept in [1 - low, 1 + high]), token mean.
    Returns (loss, clip fraction, approx KL(old || new))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


# ---------------------------------------------------------------------------------------------------------
# The forward pass that reads response-token log-probs.
# ---------------------------------------------------------------------------------------------------------
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


def response_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False, with_hidden: bool = False):
    """Log-prob of each response token under `model` at the sampling temperature: (B, T) [, entropy (B, T)]
    [, last-layer hidden states of the response tokens (B, T, D), from the same forward pass]."""
    dev = model.device
    out = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                position_ids=batch.position_ids.to(dev), use_cache=False, output_hidden_states=with_hidden)
    T = batch.response_mask.shape[1]
    logits = out.logits[:, batch.prompt_width - 1 : batch.prompt_width - 1 + T].float() / temperature
    targets = batch.input_ids[:, batch.prompt_width :].to(dev)
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    extra = []
    if with_entropy:
        with torch.no_grad():
            extra.append(-(logprobs.exp() * logprobs).sum(-1).cpu())
    if with_hidden:  # the hidden state at a response token's own position summarises the prefix up to it
        extra.append(out.hidden_states[-1][:, batch.prompt_width : batch.prompt_width + T].float().cpu())
    return (token_logprobs, *extra) if extra else token_logprobs


def in_micro_batches(fn, batch: Batch, size: int):
    """fn over micro-batches of `size` rows, outputs padded back to the batch's T and concatenated (fn may
    return a tuple of tensors, each with T as its second dimension)."""
    T = batch.response_mask.shape[1]
    outs = [fn(batch.rows(slice(i, i + size))) for i in range(0, batch.input_ids.shape[0], size)]
    pad = lambda o: torch.nn.functional.pad(o, (0, 0) * (o.dim() - 2) + (0, T - o.shape[1]))  # noqa: E731
    if isinstance(outs[0], tuple):
        return tuple(torch.cat([pad(o[i]) for o in outs]) for i in range(len(outs[0])))
    return torch.cat([pad(o) for o in outs])


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
    """Reject inconsistent batch sizes before anything is loaded or written."""
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
    if args.d_min <= 0 or args.interval < 1 or args.window < 1 or not 0 <= args.ema_alpha < 1:
        raise SystemExit("error: --d-min must be > 0, --interval and --window >= 1, and 0 <= --ema-alpha < 1")
    if args.temperature <= 0:
        raise SystemExit("error: --temperature must be > 0 for training (evaluation is greedy anyway)")
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
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = default_device() if args.device == "auto" else args.device
    autocast = (lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)) if args.bf16 \
        else contextlib.nullcontext

    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    eval_problems = load_problems(args.dataset, "test", size=args.num_eval_problems, seed=0)
    tokenizer = load_tokenizer(args.model)
    policy = load_model(args.model, device=device, gradient_checkpointing=args.gradient_checkpointing)
    # A reference model only when a KL term is asked for (DAPO has none).
    reference = load_model(args.model, device=device).eval().requires_grad_(False) if args.kl_coef > 0 else None
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=1e-5)
    generator = make_generator(args.backend, policy, tokenizer, resolve_model_path(args.model),
                               batch_size=args.gen_batch_size, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                               seed=args.seed)

    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, name=run_name, config=asdict(args), sync_tensorboard=True)
    history = open(os.path.join(run_dir, "metrics.jsonl"), "w", buffering=1)  # line-buffered: readable live
    start_time = time.time()

    def run_eval(step: int) -> float:
        acc, samples = evaluate(generator, tokenizer, eval_problems, args.max_new_tokens)
        writer.add_scalar("charts/eval_accuracy", acc, step)
        writer.add_text("samples/eval", samples_markdown(samples[: args.num_logged_samples]), step)
        history.write(json.dumps({"step": step, "eval_accuracy": acc, "wall_s": time.time() - start_time}) + "\n")
        return acc

    eval_acc = run_eval(0)
    tqdm.write(f"step 0: held-out greedy accuracy {eval_acc:.3f} on {len(eval_problems)} problems")
    progress = tqdm(range(1, args.num_steps + 1), desc=args.exp_name, dynamic_ncols=True)
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

        # 2.3 Hista's own part: old log-probs AND last-layer hidden states from the same forward pass (plus the
        #     reference's log-probs if a KL is asked for), then per-segment advantages.
        t0 = time.time()
        with torch.no_grad(), autocast():
            policy.eval()
            outs = in_micro_batches(lambda b: response_logprobs(policy, b, args.temperature, with_hidden=not args.no_hista),
                                    batch, args.micro_batch_size)
            old_logprobs, hidden = outs if not args.no_hista else (outs, None)  # (B, T), (B, T, D)
            old_logprobs = old_logprobs * mask
            ref_logprobs = in_micro_batches(lambda b: response_logprobs(reference, b, args.temperature), batch,
                                            args.micro_batch_size) * mask if reference is not None else None
        t_ref = time.time() - t0
        t0 = time.time()
        std = group_std(scores.view(args.num_prompts, args.samples_per_prompt))  # (num_prompts,)
        if args.no_hista:
            #   GRPO: every token of response i gets (R_i - group mean) / (group std + 1e-4)
            per_sample = grpo_advantages(scores.view(args.num_prompts, args.samples_per_prompt)).flatten()  # (B,)
            advantages = per_sample[:, None] * mask  # (B, T)
            hista_stats = {}
        else:
            advantages = torch.zeros_like(mask)  # (B, T)
            kth_distances, states_per_response = [], []
            G = args.samples_per_prompt
            for p in range(args.num_prompts):
                #   a-c. kNN values of every state of every rollout of this prompt (state 0: the group mean)
                group = range(p * G, (p + 1) * G)
                values, kth = hista_group_values(
                    [hidden[b, : int(lengths[b])] for b in group], scores[p * G : (p + 1) * G].tolist(),
                    args.interval, args.ema_alpha, args.window, args.k_max, args.k_min, args.d_min)
                kth_distances += kth
                #   d. token advantages R - V(state of its segment) (lambda = 1), over the group's reward std
                for b, row in zip(group, values):
                    seg_adv = segment_advantages(row, float(scores[b]), args.lam)
                    segment = torch.arange(int(lengths[b])) // args.interval  # (T_b,) segment of each token
                    advantages[b, : int(lengths[b])] = torch.tensor(seg_adv)[segment] / (std[p] + 1e-4)
                    states_per_response.append(len(row) + 1)  # + the terminal state
            windows = -(-int(lengths.max()) // args.window)
            hista_stats = {
                "hista/states_per_response": np.mean(states_per_response),
                "hista/kth_neighbour_distance": np.mean(kth_distances) if kth_distances else float("nan"),
                # the float32 tensors the estimate holds at its peak: the batch's hidden states, and one
                # prompt's (G, G, L, L) distance tensor with its cumulative min / sum companions (5 of them)
                "hista/memory_mb": (hidden.numel() + 5 * G**2 * windows**2) * 4 / 2**20,
            }
        t_hista = time.time() - t0

        # 2.4 Update: num_epochs passes over shuffled minibatches, gradients accumulated over micro-batches.
        t0 = time.time()
        policy.train()
        stats = {k: [] for k in ("policy_loss", "clipfrac", "approx_kl", "entropy", "kl_k3")}
        accumulation = args.minibatch_size // args.micro_batch_size
        for _ in range(args.num_epochs):
            order = torch.randperm(args.batch_size)
            for mb_start in range(0, args.batch_size, args.minibatch_size):
                mb = order[mb_start : mb_start + args.minibatch_size]
                mb_tokens = mask[mb].sum()  # token-mean over the whole minibatch, not per micro-batch
                for micro in mb.split(args.micro_batch_size):
                    sub = batch.rows(micro)
                    m = sub.response_mask  # (b, t): the micro-batch trimmed to its longest response
                    cut = lambda x: x[micro, : m.shape[1]]  # noqa: E731  (b, t) slice of a (B, T) tensor
                    weight = m.sum() / mb_tokens
                    with autocast():
                        logprobs, entropy = response_logprobs(policy, sub, args.temperature, with_entropy=True)
                        pg_loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, cut(old_logprobs), cut(advantages),
                                                                       m, args.clip_eps_low, args.clip_eps_high)
                        kl = (kl_k3(logprobs, cut(ref_logprobs)) * m).sum(1).mean() if reference is not None \
                            else torch.zeros(())  # summed per sequence
                    # weight turns micro-batch token means into the minibatch token mean; the KL, a mean
                    # over sequences, takes each micro-batch's share 1 / accumulation.
                    (pg_loss * weight + args.kl_coef * kl / accumulation).backward()
                    for k, v in (("policy_loss", pg_loss), ("clipfrac", clipfrac),
                                 ("approx_kl", approx_kl), ("entropy", masked_mean(entropy, m)), ("kl_k3", kl)):
                        stats[k].append(float(v.detach()))
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                policy_opt.step()
                policy_opt.zero_grad(set_to_none=True)
        generator.sync_weights(policy)
        t_update = time.time() - t0

        # 2.5 Log; evaluate every eval_every steps.
        kl_k1 = ((old_logprobs - ref_logprobs) * mask).sum(1).mean() if reference is not None else 0.0
        step_time = time.time() - t_step
        logs = {
            "charts/reward_mean": scores.mean(), "charts/response_length": lengths.float().mean(),
            "charts/truncated_frac": 1 - np.mean([c.finished for c in completions]),
            "charts/step_time": step_time, "charts/learning_rate": args.learning_rate,
            "losses/policy_loss": np.mean(stats["policy_loss"]),
            "losses/clipfrac": np.mean(stats["clipfrac"]), "losses/approx_kl": np.mean(stats["approx_kl"]),
            "losses/entropy": np.mean(stats["entropy"]), "losses/kl_ref_k3": np.mean(stats["kl_k3"]),
            "losses/kl_ref_k1": kl_k1,
            "time/generation": t_gen, "time/reference": t_ref, "time/hista": t_hista, "time/update": t_update,
            "hista/time_share": t_hista / step_time, **hista_stats,
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
