"""Hista (Chen et al., "Hista and Numca", arXiv 2605.29782; official code VOXXXX1874/Hista), on a GRPO/DAPO base.

The value of a response prefix is a 1/d-weighted k-nearest-neighbour average of the final rewards of the
closest prefixes among the rollouts of the same prompt in the batch. Prefixes are compared by MinDistance
between the policy's own last-layer hidden states over prompt and response (EMA-smoothed, averaged in windows
of 5), taken from the forward pass that computes the old log-probs. States every --interval response tokens;
each token of segment j gets R - V(state_j), divided by the group's reward std + 1e-4. The loss is DAPO's
(clip 0.2 / 0.28, token-level mean, no KL) or, with --loss cispo, CISPO's (cap 5), as TRL 0.29 computes them;
each token's loss is weighted against the sampler-learner mismatch as TRL does by default (sequence_mask, cap 3).
--no-hista gives plain GRPO/DAPO (or GRPO/CISPO); `diff numca.py hista.py` shows only the estimators.

Departures from the official code (docs/hista.md gives the reasons):
- textbook bias-corrected EMA from zero; official: seeded with h_0, run over the left-padded batch
- hidden states averaged in windows of 5; official: every 5th smoothed state
- states on a grid from the response start (no one-token lookahead); official: from the first prompt token
- the last response token gets R - V of its segment; official: advantage 0
- --interval 10 (official: 50): the CPU default's responses are 30-120 tokens long
- --d-min 2.5 (official: 5 for Qwen2.5-1.5B): the floor scales with the model's hidden states
- a group whose rewards are all equal keeps its advantages undivided (they are 0 either way)
- dynamic sampling is off by default (--dynamic-sampling-scale 2 is the official recipes')
- CPU-sized defaults: 4 prompts x 8 (official 32), lr 3e-6 (official 1e-6), T 0.6, 4 optimizer steps on
  quarters of the batch
- on the CPU the learner computes in float32 (--bf16 auto); official: bf16 (as here on CUDA)
- a micro-batch whose mean ratio exceeds --max-ratio is skipped (losses/skipped); TRL has no such guard
- the sampler-learner correction applies with the hf backend too (TRL: with vLLM only), whose bf16 copy samples

Docs: docs/hista.md

Run:  python hista.py                                                        # CPU, offline, default
      python hista.py --no-hista                                             # the GRPO/DAPO baseline
      python hista.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --backend vllm   # one GPU
      torchrun --nproc-per-node 8 hista.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --fsdp   # 8 GPUs
      python hista.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --lora-rank 16   # LoRA, one GPU
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
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
    exp_name: str = "hista"
    """name of the experiment, first part of the run folder"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: Literal["auto", "on", "off"] = "auto"
    """forwards and backwards under bfloat16 autocast (weights and optimizer stay float32); auto: on for CUDA (the
    papers' numerics), off on the CPU (float32: under bf16 any update moves the log-probs by a rounding floor)"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward pass (far less memory, ~30% more compute); auto: on for CUDA only"""
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
    learning_rate: float = 3e-6
    """AdamW learning rate of the policy (sized for the CPU default: 1e-5 fell back after its best in 3 GRPO
    seeds of 30 minutes, 3e-6 did not; the official recipe: 1e-6)"""
    adam_eps: float = 1e-8
    """AdamW epsilon (TRL's default, which the official recipes keep; 1e-5 shrinks an LLM's tiny per-parameter steps)"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (TRL's default, which the official recipes keep: 0)"""
    warmup_ratio: float = 0.0
    """share of the run's optimizer steps (over --num-steps) with a linear learning-rate warm-up from 0 (the
    official recipes: none)"""
    lr_decay: Literal["linear", "constant"] = "constant"
    """after the warm-up: constant (the official recipes' lr_scheduler_type), or linear decay towards 0 at
    --num-steps. With --max-minutes the schedule still spans --num-steps: a run stopped early ends above 0"""
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
    no_hista: bool = False
    """plain GRPO/DAPO: every token gets the group-normalised outcome advantage (the paper's baseline)"""
    interval: int = 10
    """response tokens between candidate states (the paper: 50 for responses thousands of tokens long)"""
    ema_alpha: float = 0.7
    """smoothing of the hidden states along the sequence (bias-corrected EMA from the first prompt token)"""
    window: int = 5
    """smoothed hidden states are averaged in windows of this many tokens"""
    k_max: int = 66
    """neighbours used for a response's first estimated state; k falls by floor((k_max - k_min) / n) per state"""
    k_min: int = 6
    """the floor of the k schedule (never reached: see linear_k)"""
    d_min: float = 2.5
    """distances are clamped below at this (weights 1 / d); depends on the model's hidden states"""
    lam: float = 1.0
    """lambda of the GAE-style pass over segments (1.0: R - V(state of the segment))"""
    loss: Literal["dapo", "cispo"] = "dapo"
    """policy loss, as TRL 0.29 computes it (the official recipes train with both): dapo, the clipped surrogate with
    clip-higher; cispo, REINFORCE on each token's log-prob weighted by its ratio clipped above at --clip-eps-high
    and detached (MiniMax-M1's CISPO; --clip-eps-low unused)"""
    clip_eps_low: float = 0.2
    """PPO ratio clip below 1 (dapo)"""
    clip_eps_high: float | None = None
    """dapo: the ratio clip above 1 (clip-higher; default 0.28); cispo: the cap on the ratio itself (default 5.0).
    Both defaults are the official recipes' epsilon_high"""
    kl_coef: float = 0.0
    """coefficient of a k3 KL to the reference in the loss (per token clamped to [0, 10], summed per sequence;
    0: no reference model is loaded)"""
    max_ratio: float = 10.0
    """skip a micro-batch whose mean ratio pi/pi_old exceeds this (VinePPO's code); counted in losses/skipped"""
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        "sequence_mask"
    """importance weights p_learner / p_sampler on each token's policy loss, for the sampler-learner mismatch (TRL's
    vllm_importance_sampling_mode; see rollout_correction). Default sequence_mask: TRL 0.29's default with vLLM,
    which the official recipes keep"""
    rollout_correction_cap: float = 3.0
    """upper cap C of those weights: *_truncate clips a ratio at C, *_mask gives 0 above C (TRL's default, 3)"""
    dynamic_sampling_scale: int = 1
    """draw this many times --num-prompts prompts and train on the --num-prompts whose pass rate is nearest 0.5
    (the official recipes: 2; 1: off). Applies to the GRPO baseline too"""

    # ---- computed at runtime ----
    batch_size: int = 0
    """(computed) samples per iteration: num_prompts * samples_per_prompt"""


# ---------------------------------------------------------------------------------------------------------
# The algorithm's pure functions: each is tested on its own in tests/test_hista.py.
# Shapes: B = samples in the batch, T = response tokens (right-padded); mask is 1 on real response tokens.
# ---------------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def outcome_rewards(texts: list[str], finished: list[bool], answers: list[str], questions: list[str]) -> list[float]:
    """1.0 for a correct final answer, 0.0 otherwise; a response cut by the length limit scores 0. The grader
    reads the question too: an answer that only hands its calculation back (\\boxed{59 * 100}) scores 0."""
    return [grade(text, gold, question=q) if done else 0.0
            for text, done, gold, q in zip(texts, finished, answers, questions)]


def ema_smooth(h: torch.Tensor, alpha: float, chunk: int = 32) -> torch.Tensor:
    """Bias-corrected exponential moving average along dim -2 of (..., T, D): m_t = alpha m_{t-1} + (1 - alpha)
    h_t from m_{-1} = 0, divided by 1 - alpha^(t+1). A constant sequence stays constant.

    Vectorised: inside a chunk of C rows, m = W h + alpha^(1 .. C) m_before with W[t, j] = (1 - alpha)
    alpha^(t - j) for j <= t, so the Python loop runs over T / C chunks, not over tokens. (One (T, T) matrix
    would take T^2 memory; a cumulative sum of alpha^-t h_t would overflow float32 after ~250 tokens.)
    """
    T = h.shape[-2]
    t = torch.arange(chunk, device=h.device)
    lag = t[:, None] - t[None, :]  # (C, C)
    W = torch.where(lag >= 0, (1 - alpha) * alpha ** lag.clamp(min=0).to(h.dtype), 0.0)  # (C, C)
    carry = alpha ** (t + 1).to(h.dtype)[:, None]  # (C, 1): weight of the state before the chunk on each row
    out = torch.empty_like(h)
    m = torch.zeros_like(h[..., :1, :])  # (..., 1, D)
    for s in range(0, T, chunk):
        c = min(chunk, T - s)
        out[..., s : s + c, :] = W[:c, :c] @ h[..., s : s + c, :] + carry[:c] * m
        m = out[..., s + c - 1 : s + c, :]
    return out / (1 - alpha ** torch.arange(1, T + 1, device=h.device, dtype=h.dtype))[:, None]


def window_means(h: torch.Tensor, window: int) -> torch.Tensor:
    """(T, D) -> (ceil(T / window), D): the mean of each window of `window` rows (the last may be shorter)."""
    T = h.shape[0]
    padded = torch.nn.functional.pad(h, (0, 0, 0, -T % window))
    ones = torch.ones(T, dtype=h.dtype, device=h.device)
    counts = torch.nn.functional.pad(ones, (0, -T % window)).view(-1, window).sum(1, keepdim=True)
    return padded.view(-1, window, h.shape[1]).sum(1) / counts


def state_representation(h: torch.Tensor, prompt_len: int, alpha: float, window: int) -> torch.Tensor:
    """(P + T, D) last-layer hidden states of a prompt of P tokens and its response -> the rows that prefixes
    are compared by: the EMA from the first prompt token, then window means, with the windows aligned to the
    response start: ceil(P / window) prompt windows (the first one may be shorter), then ceil(T / window)
    response windows (the last one may be shorter). A prefix of p response tokens is the first
    ceil(P / window) + ceil(p / window) rows; the prompt-only prefix is the prompt's windows."""
    smooth = ema_smooth(h.float(), alpha)
    prompt = window_means(smooth[:prompt_len].flip(0), window).flip(0)  # windows counted back from the response
    return torch.cat([prompt, window_means(smooth[prompt_len:], window)])


def min_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """MinDistance of two (L, D) sequences: for each row of the longer, the L2 distance to the nearest row of
    the shorter; summed and divided by the longer length."""
    longer, shorter = (a, b) if a.shape[0] >= b.shape[0] else (b, a)
    return float(torch.cdist(longer.float(), shorter.float()).min(dim=1).values.sum() / longer.shape[0])


def prefix_distances(reps: list[torch.Tensor]) -> torch.Tensor:
    """MinDistance between every prefix of every sequence and every prefix of every other, at once, on the
    device the sequences are on (the model's: batched tensor operations, no loop).

    reps: G sequences of shapes (L_g, D). Returns (G, G, L, L), L = max L_g, where [g, h, i - 1, j - 1] is
    min_distance(reps[g][:i], reps[h][:j]) (inf where a prefix does not exist). From one distance tensor M:
    for i >= j, sum over rows r < i of min over columns c < j of M[r, c] (a cumulative minimum along the
    columns, then a cumulative sum along the rows), divided by i; the other way round for i < j.
    """
    dev, G, L = reps[0].device, len(reps), max(r.shape[0] for r in reps)
    lengths = torch.tensor([r.shape[0] for r in reps], device=dev)
    X = torch.stack([torch.nn.functional.pad(r.float(), (0, 0, 0, L - r.shape[0])) for r in reps])  # (G, L, D)
    flat = X.reshape(G * L, -1)  # one (G L, G L) distance matrix: no (G, G, L, D) broadcast copy
    M = torch.cdist(flat, flat).view(G, L, G, L).transpose(1, 2)  # (G, G, L, L): [g, h, r, c] = |X_g,r - X_h,c|
    valid = torch.arange(L, device=dev)[None, :] < lengths[:, None]  # (G, L)
    M = M.masked_fill(~(valid[:, None, :, None] & valid[None, :, None, :]), float("inf"))
    rows = torch.cumsum(torch.cummin(M, dim=3).values, dim=2)  # [.., i-1, j-1] = sum_{r<i} min_{c<j} M[r, c]
    cols = torch.cumsum(torch.cummin(M, dim=2).values, dim=3)  # [.., i-1, j-1] = sum_{c<j} min_{r<i} M[r, c]
    i = torch.arange(1, L + 1, dtype=torch.float32, device=dev)[:, None]
    j = torch.arange(1, L + 1, dtype=torch.float32, device=dev)[None, :]
    return torch.where(i >= j, rows / i, cols / j)


def knn_value(distances: torch.Tensor, rewards: torch.Tensor, k: int, d_min: float) -> float:
    """Distance-weighted k-nearest-neighbour estimate: distances clamped below at d_min, the k nearest kept
    (all if fewer), weights 1 / d, the weighted mean of their rewards. Infinite distances are not candidates.
    Of equally distant candidates the earlier one is kept (the official top-k leaves that order unspecified):
    every rollout's prompt-only prefix is the same, so those always tie, and so do all below d_min."""
    ok = torch.isfinite(distances)
    d, r = distances[ok].clamp(min=max(d_min, 1e-8)), rewards[ok].float()  # a floor of 0 would divide by 0
    nearest = torch.sort(d, stable=True).indices[:k]
    w = 1.0 / d[nearest]
    return float((w * r[nearest]).sum() / w.sum())


def linear_k(index: int, num_states: int, k_max: int, k_min: int) -> int:
    """k for the index-th (0-based) of the num_states estimated states of a response, as the official code:
    k_max - floor((k_max - k_min) / num_states) * index. It falls by equal integer steps, never reaches
    k_min (the last state gets more than k_min unless the step divides exactly), and stays at k_max for
    every state when num_states > k_max - k_min."""
    return k_max - (k_max - k_min) // max(num_states, 1) * index


def candidate_prefixes(lengths: list[int], interval: int, window: int,
                       prompt_windows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbour pool of a prompt: of each rollout (lengths[g] response tokens) its prompt-only prefix
    (when prompt_windows > 0; the official pool keeps this node too), a prefix every `interval` response
    tokens, and the whole response; as (rollout index, rows in the prefix) tensors. A prefix of p response
    tokens has prompt_windows + ceil(p / window) rows (see state_representation)."""
    first = [0] if prompt_windows > 0 else []
    cands = [[prompt_windows + math.ceil(p / window) for p in first + list(range(interval, T, interval)) + [T]]
             for T in lengths]
    return (torch.tensor([g for g, cs in enumerate(cands) for _ in cs]),
            torch.tensor([w for cs in cands for w in cs]))


def hista_group_values(hidden: list[torch.Tensor], prompt_len: int, rewards: list[float], interval: int,
                       alpha: float, window: int, k_max: int, k_min: int,
                       d_min: float) -> tuple[list[list[float]], list[float]]:
    """Values of the states of every rollout of one prompt, from their hidden states.

    hidden[g]: (P + T_g, D) last-layer hidden states of the prompt's P tokens and rollout g's T_g response
    tokens, on any device (the distances are computed there). The states of rollout g start at response
    tokens 0, interval, 2 * interval, ... (< T_g); state 0 takes the group mean, the n = ceil(T_g / interval)
    - 1 others the kNN estimate with k from linear_k. Returns the values and, per estimated state, the
    distance to its k-th neighbour.

    The distances from every estimated state of the group to every candidate are gathered in one operation on
    the device and copied to the CPU once; each state's weighted k-nearest mean (a few numbers) is then taken
    there, so that a GPU sees one copy per prompt rather than several per state.
    """
    reps = [state_representation(h, prompt_len, alpha, window) for h in hidden]  # (W_p + ceil(T_g / window), D)
    D = prefix_distances(reps)  # (G, G, L, L)
    lengths = [h.shape[0] - prompt_len for h in hidden]
    prompt_windows = math.ceil(prompt_len / window)
    cand_g, cand_w = candidate_prefixes(lengths, interval, window, prompt_windows)  # (C,) each
    # Every estimated state of the group: its rollout, the rows of its prefix, its k.
    state_g, state_w, state_k = [], [], []
    for g, T in enumerate(lengths):
        starts = list(range(0, T, interval))  # response token where each state (segment) starts
        n = len(starts) - 1  # states estimated: all but the first
        for s in range(1, len(starts)):
            state_g.append(g)
            state_w.append(prompt_windows + math.ceil(starts[s] / window))  # rows of the state's prefix
            state_k.append(linear_k(s - 1, n, k_max, k_min))
    R = torch.tensor(rewards)
    group_mean = float(R.mean())
    values, kth = [[group_mean] for _ in hidden], []
    if not state_g:
        return values, kth
    dev = D.device
    sg, sw = torch.tensor(state_g, device=dev)[:, None], torch.tensor(state_w, device=dev)[:, None]  # (S, 1)
    cg, cw = cand_g.to(dev)[None, :], cand_w.to(dev)[None, :]  # (1, C)
    dist = D[sg, cg, sw - 1, cw - 1]  # (S, C): from each state to each candidate
    # a state's own rollout offers only prefixes no longer than the state
    dist = torch.where((cg == sg) & (cw > sw), torch.full_like(dist, float("inf")), dist).cpu()
    candidate_rewards = R[cand_g]  # (C,)
    for row, g, k in zip(dist, state_g, state_k):
        values[g].append(knn_value(row, candidate_rewards, k, d_min))
        finite = row[torch.isfinite(row)].clamp(min=d_min)
        kth.append(float(finite.sort().values[min(k, len(finite)) - 1]))
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


def group_scale(std: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(num_prompts,) group reward stds -> the factor of each group's advantages: 1 / (std + eps), as GRPO; but
    1 for a group whose rewards are all equal (std 0). Its advantages R - V stay as they are (at most 1 in
    size) instead of growing 10,000-fold: against values from earlier steps they need not be 0."""
    return torch.where(std > 0, 1 / (std + eps), torch.ones_like(std))


def select_prompts(pass_rates: torch.Tensor, keep: int) -> list[int]:
    """Dynamic sampling (the official recipes' dynamic_sampling_scale): the indices of the `keep` prompts whose
    pass rate is nearest 0.5, in their drawn order; of equally near ones, the earlier drawn."""
    nearest = sorted(range(len(pass_rates)), key=lambda i: (abs(float(pass_rates[i]) - 0.5), i))
    return sorted(nearest[:keep])


def hista_advantages(hidden: list[torch.Tensor], prompt_lens: list[int], scores: torch.Tensor, lengths: torch.Tensor,
                     scale: torch.Tensor, G: int, args):
    """Hista's token advantages for a batch of B responses, prompt-major in groups of G: hidden[b] the policy's
    last-layer hidden states over prompt and response b, prompt_lens[p] the length of prompt p, scores (B,) the
    rewards, lengths (B,) the response lengths, scale one factor per group; the estimator's settings from
    `args` (interval, ema_alpha, window, k_max, k_min, d_min, lam). Returns ((B, T) advantages, statistics)."""
    advantages = torch.zeros(len(scores), int(lengths.max()))  # (B, T)
    kth_distances, states_per_response = [], []
    for p in range(len(prompt_lens)):
        #   a-c. kNN values of every state of every rollout of this prompt (state 0: the group mean), from the
        #        hidden states of the prompt and each response, on the model's device
        group = range(p * G, (p + 1) * G)
        values, kth = hista_group_values(
            [hidden[b] for b in group], prompt_lens[p], scores[p * G : (p + 1) * G].tolist(),
            args.interval, args.ema_alpha, args.window, args.k_max, args.k_min, args.d_min)
        kth_distances += kth
        #   d. token advantages R - V(state of its segment) (lambda = 1), times the group's scale
        for b, row in zip(group, values):
            seg_adv = segment_advantages(row, float(scores[b]), args.lam)
            segment = torch.arange(int(lengths[b])) // args.interval  # (T_b,) segment of each token
            advantages[b, : int(lengths[b])] = torch.tensor(seg_adv)[segment] * scale[p]
            states_per_response.append(len(row) + 1)  # + the terminal state
    windows = math.ceil(max(prompt_lens) / args.window) + math.ceil(int(lengths.max()) / args.window)
    return advantages, {
        "hista/states_per_response": np.mean(states_per_response),
        "hista/kth_neighbour_distance": np.mean(kth_distances) if kth_distances else float("nan"),
        # the float32 tensors the estimate holds at its peak: the batch's hidden states, and one prompt's
        # (G, G, L, L) distance tensor with its cumulative min (values and int64 indices) / sum companions
        "hista/memory_mb": (sum(h.numel() for h in hidden) + 8 * G**2 * windows**2) * 4 / 2**20,
    }


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, max_kl: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased), clamped
    to [0, max_kl] as VinePPO's code does, and 0 outside the mask. The log-ratio is masked BEFORE the exp:
    a padded position's log-prob can be below -88, whose exp overflows float32 and turns 0 * inf into NaN."""
    log_ratio = (ref_logprobs - logprobs) * mask
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(0, max_kl) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps_low: float, clip_eps_high: float,
                    weights=None):
    """Clipped surrogate with DAPO's clip-higher (ratio kept in [1 - low, 1 + high]), token mean, each token's loss
    times its rollout-correction weight (`weights`, (B, T); None: 1). Returns (loss, clip fraction, approx KL(old ||
    new), mean ratio); the last three are detached statistics. The log-ratio is masked before the exp (see kl_k3)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    per_token = torch.max(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac.detach(), approx_kl.detach(), masked_mean(ratio, mask).detach()


def cispo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps_high: float, weights=None):
    """CISPO (MiniMax-M1, arXiv 2506.13585) as TRL 0.29 computes it (loss_type "cispo"): each token's loss is
    -min(ratio, clip_eps_high) * A * log p, the clipped ratio detached, so that every token keeps a gradient (none is
    clipped away as in PPO), scaled by at most the cap; token mean, each token's loss times its rollout-correction
    weight (`weights`, (B, T); None: 1). The cap is on the ratio itself (TRL's epsilon_high, 5.0 in the recipes),
    with no lower clip. Returns (loss, clip fraction, approx KL(old || new), mean ratio) as ppo_policy_loss; the
    clip fraction is TRL's cispo_clip_ratio: the share of tokens with a ratio above the cap and A > 0."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    per_token = -torch.clamp(ratio, max=clip_eps_high).detach() * advantages * logprobs
    loss = masked_mean(per_token if weights is None else per_token * weights, mask)
    clipfrac = masked_mean(((ratio > clip_eps_high) & (advantages > 0)).float(), mask)
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
    1/w, 2/w, ..., 1 over the first w = ceil(warmup_ratio * total_steps) steps, then constant (the official
    recipes, with w = 0), or a linear decay (total - s) / (total - w) towards 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if opt_step < warmup:
        return (opt_step + 1) / warmup
    if decay == "constant":
        return 1.0
    return max(0.0, (total_steps - opt_step) / max(1, total_steps - warmup))


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


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[target] for (N, V) logits and (N,) targets -> (N,), in float32."""
    logits = logits.float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False, with_hidden: bool = False,
                      chunk: int = 256):
    """Log-prob of each response token under `model` at the sampling temperature: (B, T) [, entropy (B, T)]
    [, last-layer hidden states at every column of the batch, prompt and response, (B, P + T, D) in float32 on
    the model's device, from the same forward pass].

    Memory-lean: the model computes logits only at the T positions that predict response tokens
    (`logits_to_keep`), and the float32 log-softmax runs over `chunk` positions at a time. Under autograd each
    chunk is checkpointed, so its float32 copy is rebuilt in the backward pass instead of being kept: at a
    151k vocabulary, one full (8 x 1,024)-token float32 copy would be 4.6 GiB, one 256-position chunk 0.15 GiB.
    The entropy (a statistic, no gradient) is computed from the same chunks."""
    dev = model.device
    T = batch.response_mask.shape[1]
    # Column P - 1 + t predicts response token t: the last T + 1 columns, minus the very last one.
    out = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                position_ids=batch.position_ids.to(dev), use_cache=False, logits_to_keep=T + 1,
                output_hidden_states=with_hidden)
    logits = out.logits[:, :-1]
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
    extra = []
    if with_entropy:
        extra.append(torch.cat(entropies).view(logits.shape[:2]))
    if with_hidden:  # the hidden state at a token's own position summarises the sequence up to it
        extra.append(out.hidden_states[-1].float())
    logprobs = torch.cat(pieces).view(logits.shape[:2])  # on the model's device, as everything the loss reads
    return (logprobs, *extra) if extra else logprobs


def in_micro_batches(fn, batch: Batch, micro_batches):
    """(B, T) outputs of `fn` run on each micro-batch (a tensor of row indices) of the step's fixed partition,
    put back at their rows, on the device `fn` gives them on (the model's); 0 past each micro-batch's own
    longest response. When `fn` also returns hidden states (b, columns, D), they come back too, as a list of B
    tensors: row r's (P_r + T_r, D) states at its real tokens (its prompt, then its response), on the same
    device."""
    out = None
    hidden = [None] * batch.response_mask.shape[0]
    for rows in micro_batches:
        sub = batch.rows(rows)
        result = fn(sub)
        if isinstance(result, tuple):
            result, states = result
            real = sub.attention_mask.bool().to(states.device)  # (b, columns): the prompt and response tokens
            for i, r in enumerate(rows.tolist()):
                hidden[r] = states[i][real[i]]
        result = result.float()
        if out is None:
            out = torch.zeros(batch.response_mask.shape, device=result.device)
        out[rows, : result.shape[1]] = result
    return out if hidden[0] is None else (out, hidden)


# ---------------------------------------------------------------------------------------------------------
# The checks of the arguments.
# ---------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    """Reject out-of-range values and inconsistent batch sizes before anything is loaded or written."""
    check_shared_args(args)
    if args.clip_eps_high is None:  # the official recipes' epsilon_high for the chosen loss
        args.clip_eps_high = 5.0 if args.loss == "cispo" else 0.28
    check_ranges(args, {">= 1": ["interval", "window", "k_max", "k_min", "dynamic_sampling_scale"],
                        ">= 0": ["kl_coef"], "> 0": ["clip_eps_low", "clip_eps_high", "max_ratio", "d_min"],
                        "in [0, 1]": ["lam"]})
    if not 0 <= args.ema_alpha < 1:  # 1 would never move from 0 (and divide by 1 - 1^t = 0)
        raise SystemExit(f"error: --ema-alpha must be in [0, 1) (got {args.ema_alpha})")
    if args.k_min > args.k_max:
        raise SystemExit(f"error: --k-min must be <= --k-max (got {args.k_min} > {args.k_max})")


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
    # reference therefore starts above 0 (a floor of rounding, docs/hista.md), not at exactly 0.
    ref_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    # Fail now, with one line, if the run clearly cannot fit (estimated from the config: no weight is loaded).
    # The reference is loaded only with --kl-coef > 0.
    check_memory(args.model, device, trainable=1, frozen=int(args.kl_coef > 0), frozen_dtype=ref_dtype,
                 backend=args.backend, vllm_share=args.vllm_gpu_memory_utilization, micro_batch=args.micro_batch_size,
                 max_new_tokens=args.max_new_tokens, checkpointing=checkpointing, **memory_layout(args))

    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    eval_problems = load_problems(args.dataset, "test", size=args.num_eval_problems, seed=0)
    tokenizer = load_tokenizer(args.model)
    # The policy: LoRA adapters with --lora-rank; under torchrun wrapped in DDP (or FSDP2 with --fsdp).
    policy = dist.wrap(load_trained(args, device, checkpointing), args.fsdp)
    # A reference model only when a KL term is asked for (DAPO has none); with LoRA the policy with its adapters off.
    reference = load_reference(args, policy, ref_dtype, device) if args.kl_coef > 0 else None
    # AdamW with TRL's defaults (eps 1e-8, no weight decay), which the official recipes keep, and their
    # constant learning rate (no warm-up), over the run's optimizer steps: num_steps x num_epochs x minibatches.
    total_opt_steps = args.num_steps * args.num_epochs * (args.batch_size // args.minibatch_size)
    schedule = lambda s: lr_multiplier(s, total_opt_steps, args.warmup_ratio, args.lr_decay)  # noqa: E731
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                   weight_decay=args.weight_decay)
    policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, schedule)
    generator = make_run_generator(args, policy, tokenizer)

    # The run folder, metrics, checkpoints (with --resume: everything below restored from the newest one).
    # The run-long state is that of ppo.py (weights, optimizer, schedule, random generators): the prompts of a
    # step are a function of the step alone and its rollouts are seeded by it.
    run = Run(args, "hista.py", models={"policy": policy}, optimizers={"policy": policy_opt},
              schedulers={"policy": policy_sched}, generator=generator, tokenizer=tokenizer, eval_problems=eval_problems)

    for step in run.steps():
        t_step = time.time()

        # 2.1 Sample a batch of prompts and generate samples_per_prompt responses to each (with dynamic
        #     sampling, dynamic_sampling_scale times as many prompts).
        drawn = args.num_prompts * args.dynamic_sampling_scale
        first = ((step - 1) * drawn) % len(train_problems)
        problems = [train_problems[(first + i) % len(train_problems)] for i in range(drawn)]
        prompts = [prompt_ids(tokenizer, p.question) for p in problems]
        t0 = time.time()
        outs = generator.generate(prompts, n=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed * 100_003 + step)
        t_gen = time.time() - t0

        # 2.2 Grade: outcome reward on the EOS token, 0 for a truncated response. Dynamic sampling keeps the
        #     num_prompts groups whose pass rate is nearest 0.5 (all of them when the scale is 1).
        G = args.samples_per_prompt
        drawn_scores = torch.tensor([outcome_rewards([c.text for c in row], [c.finished for c in row], [p.answer] * G,
                                                     [p.question] * G) for p, row in zip(problems, outs)])  # (drawn, G)
        keep = select_prompts(drawn_scores.mean(1), args.num_prompts)
        problems, prompts = [problems[i] for i in keep], [prompts[i] for i in keep]
        completions = [c for i in keep for c in outs[i]]  # (B,) prompt-major: sample j of prompt i at i*G + j
        scores = drawn_scores[keep].flatten()  # (B,)
        # Under torchrun every rank holds the whole batch's rollouts; each trains on its share of the prompts with
        # all their samples (B below is then B / ranks): Hista's kNN runs within a group, on the rank that holds it.
        prompts, completions, scores = dist.share(prompts), dist.share(completions), dist.share(scores)
        batch = make_batch([p for p in prompts for _ in range(args.samples_per_prompt)],
                           [c.token_ids for c in completions], tokenizer.pad_token_id)
        mask = batch.response_mask.to(device)  # (B, T), on the run's device as every (B, T) tensor the loss reads
        lengths = batch.response_mask.sum(1).long()  # (B,), on the CPU for the estimator's bookkeeping

        # 2.3 Hista's own part: old log-probs AND last-layer hidden states from the same forward pass (plus the
        #     reference's log-probs if a KL is asked for), then per-segment advantages.
        # The micro-batches are fixed once per step: these no-grad passes and every epoch of the update see
        # the same rows with the same padding, so in bf16 they run the same arithmetic and the ratio is
        # exactly 1 at unchanged weights. The epochs shuffle the order of micro-batches, not their contents.
        generator.sleep()  # vLLM on a GPU frees its weights and KV cache until the next sync; no-op otherwise
        micro_batches = torch.randperm(len(mask)).split(args.micro_batch_size)  # row indices, (b,) each
        t0 = time.time()
        with torch.no_grad(), autocast():
            policy.eval()
            forward = in_micro_batches(lambda b: response_logprobs(policy, b, args.temperature,
                                                                   with_hidden=not args.no_hista), batch, micro_batches)
            old_logprobs, hidden = forward if not args.no_hista else (forward, None)  # (B, T); B x (P + T_b, D)
            old_logprobs = old_logprobs * mask
            ref_logprobs = in_micro_batches(lambda b: response_logprobs(reference, b, args.temperature), batch,
                                            micro_batches) * mask if reference is not None else None
        t_ref = time.time() - t0
        #     The sampler's own log-probs of the same tokens against the learner's: the mismatch (logged), and
        #     the rollout correction's weight on each token's policy loss (1 with --rollout-correction none).
        sampled = sampler_logprobs(completions, device)  # (B, T)
        is_weights = rollout_correction(old_logprobs, sampled, mask, args.rollout_correction,
                                        args.rollout_correction_cap)  # (B, T)
        mismatch = mismatch_stats(old_logprobs, sampled, mask, is_weights, args.rollout_correction,
                                  args.rollout_correction_cap)
        t0 = time.time()
        std = group_std(scores.view(-1, G))  # (num_prompts,)
        if args.no_hista:
            #   GRPO: every token of response i gets (R_i - group mean) / (group std + 1e-4)
            per_sample = grpo_advantages(scores.view(-1, G)).flatten()  # (B,)
            advantages = per_sample.to(device)[:, None] * mask  # (B, T)
            hista_stats = {}
        else:
            advantages, hista_stats = hista_advantages(hidden, [len(p) for p in prompts], scores, lengths,
                                                       group_scale(std), G, args)
            advantages = advantages.to(device)  # built on the CPU from the kNN values
            del hidden
        t_hista = time.time() - t0

        # 2.4 Update: num_epochs passes; each minibatch is `accumulation` micro-batches of the step's fixed
        # partition, in a new random order every epoch, with gradients accumulated over them.
        t0 = time.time()
        policy.train()
        stats = {k: [] for k in ("policy_loss", "clipfrac", "approx_kl", "entropy", "kl_k3")}
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
                        if args.loss == "cispo":  # REINFORCE on each token, times its ratio clipped above, detached
                            losses = cispo_policy_loss(logprobs, cut(old_logprobs), cut(advantages), m,
                                                       args.clip_eps_high, cut(is_weights))
                        else:  # DAPO: the clipped surrogate with clip-higher
                            losses = ppo_policy_loss(logprobs, cut(old_logprobs), cut(advantages), m,
                                                     args.clip_eps_low, args.clip_eps_high, cut(is_weights))
                        pg_loss, clipfrac, approx_kl, ratio = losses
                        kl = kl_k3(logprobs, cut(ref_logprobs), m).sum(1).mean() if reference is not None \
                            else torch.zeros(())  # summed per sequence
                    if ratio > args.max_ratio:  # a diverged micro-batch: skip it, as VinePPO's code does
                        skipped += 1
                        if dist.active():  # every rank joins each gradient reduction: a backward of zero
                            dist.zero_loss(logprobs).backward()
                        continue
                    # weight turns micro-batch token means into the minibatch token mean; the KL, a mean
                    # over sequences, takes each micro-batch's share 1 / accumulation.
                    (pg_loss * weight + args.kl_coef * kl / accumulation).backward()
                    for k, v in (("policy_loss", pg_loss), ("clipfrac", clipfrac),
                                 ("approx_kl", approx_kl), ("entropy", masked_mean(entropy, m)), ("kl_k3", kl)):
                        stats[k].append(float(v.detach()))
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                policy_opt.step()
                policy_sched.step()
                policy_opt.zero_grad(set_to_none=True)
        generator.sync_weights(policy)
        t_update = time.time() - t0

        # 2.5 Log; evaluate every eval_every steps. reward_mean is over every drawn prompt (the policy's own
        # pass rate); the other statistics are over the trained batch.
        kl_k1 = ((old_logprobs - ref_logprobs) * mask).sum(1).mean() if reference is not None else 0.0
        step_time = time.time() - t_step
        logs = {
            "charts/reward_mean": drawn_scores.mean(), "charts/response_length": lengths.float().mean(),
            "charts/truncated_frac": 1 - np.mean([c.finished for c in completions]),
            "charts/step_time": step_time, "charts/learning_rate": lr,
            "losses/policy_loss": np.mean(stats["policy_loss"]),
            "losses/clipfrac": np.mean(stats["clipfrac"]), "losses/approx_kl": np.mean(stats["approx_kl"]),
            "losses/entropy": np.mean(stats["entropy"]), "losses/kl_ref_k3": np.mean(stats["kl_k3"]),
            "losses/kl_ref_k1": kl_k1, "losses/skipped": skipped,
            "time/generation": t_gen, "time/reference": t_ref, "time/hista": t_hista, "time/update": t_update,
            **mismatch,  # the sampler-learner mismatch and the rollout correction's weights
            "time/hista_share": t_hista / step_time,  # a wall-clock ratio: under time/, as the other timings
            **hista_stats,
        }
        if args.dynamic_sampling_scale > 1:
            logs["charts/kept_reward_mean"] = scores.mean()
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
