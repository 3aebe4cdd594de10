"""PRIME (Cui et al. 2025, arXiv 2502.01456): dense rewards from an implicit PRM trained online on outcomes.

Three models start from the same weights: the policy, the implicit PRM (a causal LM that trains) and a frozen
reference. The token reward r_t = beta * (log pi_prm - log pi_ref) is 0 at the start; each step the PRM takes
a cross-entropy update that makes sigmoid(beta * sum_t log-ratio) predict the outcome. The policy's advantage
is RLOO over K samples per prompt, in a process and an outcome part, through the official pipeline by default
(batch-normalised process rewards, leave-one-out, returns, whitening; --no-official-normalisation gives Eq. 5
as the paper writes it). PPO clipped loss, no KL. An online filter keeps prompts with 20-80% of their samples
right and draws more until the batch is full. --process-reward-coef 0 is the paper's RLOO baseline.
Official code: PRIME-RL/PRIME (training/, examples/run_prime_main.sh); the verl recipe recipe/prime.

Departures from the official code (docs/prime_implicit_prm.md gives the reasons):
- Defaults sized for the offline CPU run (8 prompts x 4, lr 3e-6 policy / 1e-5 PRM, T = 0.6, 128 tokens).
- Two epochs x two minibatches per step (official: one epoch).
- The fill loop stops after --max-prompt-draws draws; a step where no prompt passed skips the update.
- The PRM's accuracy after its update is measured every step (one more PRM forward).
- KL and ratio safety as VinePPO's code: k3 clamped to [0, 10]; a micro-batch with mean ratio > 10 skipped.
- One micro-batch partition per step, shared by every pass and epoch (batch invariance).
- Logits only at response positions, float32 log-softmax in chunks; with the PRM the reference is float32
  on every device (the PRM's numerics: the token rewards start at exactly 0).
- Float32 weights, under bf16 autocast on CUDA, float32 compute on the CPU; sampling from a bf16 copy (hf) or vLLM.
- Loss is the token mean over the minibatch (official: the mean of micro-batch token means).

Docs: docs/prime_implicit_prm.md
Run:  python prime_implicit_prm.py                                    # CPU, offline, default
      python prime_implicit_prm.py --process-reward-coef 0            # the RLOO baseline
      python prime_implicit_prm.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --backend vllm # one GPU
      torchrun --nproc-per-node 8 prime_implicit_prm.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --fsdp   # 8 GPUs
      python prime_implicit_prm.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --lora-rank 16   # LoRA, one GPU
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import tyro
from tqdm import tqdm

from common import distributed as dist
from common.args import check_ranges
from common.data import DEFAULT_DATASET, DataError, Problem, load_problems, prompt_ids
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
    exp_name: str = "prime"
    """name of the experiment, first part of the run folder"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: Literal["auto", "on", "off"] = "auto"
    """forwards and backwards under bfloat16 autocast (weights and optimizer stay float32); auto: on for CUDA (the
    papers' numerics), off on the CPU (float32: under bf16 any update moves the log-probs by a rounding floor)"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward pass (far less memory, ~30% more compute); auto: on for CUDA only"""
    num_prompts: int = 8
    """prompts per iteration (that passed the accuracy filter)"""
    samples_per_prompt: int = 4
    """K: responses sampled per prompt (RLOO's group); the batch is num_prompts * K samples"""
    max_new_tokens: int | None = None
    """response length limit in tokens (None: 128 for generated tasks, 512 for gsm8k, math and files)"""
    temperature: float = 0.6
    """sampling temperature (VinePPO's 0.6); the policy's ratio and KL use it too, the PRM's reward uses T = 1"""
    top_p: float = 1.0
    """nucleus sampling; below 1 the update is slightly off-policy"""
    num_epochs: int = 2
    """passes of PPO updates over each batch"""
    minibatch_size: int = 16
    """samples per optimizer step (policy and PRM); must divide the batch"""
    micro_batch_size: int = 8
    """samples per forward/backward (gradient accumulation); must divide minibatch_size"""
    gen_batch_size: int = 64
    """sequences per generate call of the hf backend"""
    learning_rate: float = 3e-6
    """AdamW learning rate of the policy (sized for the CPU default: 1e-5 fell back after its best in 3 GRPO
    seeds of 30 minutes, 3e-6 did not; the official recipe: 5e-7)"""
    adam_eps: float = 1e-8
    """AdamW epsilon of the policy and the PRM (the official code: torch's default 1e-8)"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay of the policy (the official code's default 0.01)"""
    warmup_ratio: float = 0.0
    """share of the run's optimizer steps (over --num-steps) with a linear learning-rate warm-up from 0
    (the official code: 0)"""
    lr_decay: Literal["linear", "constant"] = "constant"
    """after the warm-up: constant (the official code), or linear decay towards 0 at --num-steps. With
    --max-minutes the schedule still spans --num-steps: a run stopped early ends above 0"""
    max_grad_norm: float = 1.0
    """gradient clipping of the policy"""
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
    beta: float = 0.05
    """scale of the implicit process reward beta * (log pi_prm - log pi_ref)"""
    prm_learning_rate: float = 1e-5
    """AdamW learning rate of the implicit PRM (the paper: 1e-6 at its scale)"""
    prm_weight_decay: float = 0.0
    """AdamW decoupled weight decay of the PRM (the official config: 0)"""
    prm_max_grad_norm: float = 10.0
    """gradient clipping of the PRM (the official scripts: 10)"""
    process_reward_coef: float = 1.0
    """weight of the process part against the outcome part (0: RLOO with outcome rewards only, the baseline)"""
    official_normalisation: bool = True
    """the official pipeline (batch-normalised process rewards, both parts whitened together); off: Eq. 5 as written"""
    prm_update_first: bool = False
    """double forward: rewards from the PRM after this step's update (default: single forward, the official script)"""
    filter_low: float = 0.2
    """keep prompts whose K samples are right at least this often..."""
    filter_high: float = 0.8
    """...and at most this often"""
    max_prompt_draws: int = 8
    """generation calls per step to fill the batch, each on num_prompts new prompts (plus the surplus); when
    hit, the step trains on what passed and says so"""
    no_filter: bool = False
    """keep every prompt"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    kl_coef: float = 0.0
    """coefficient of the k3 KL to the reference in the loss (per token clamped to [0, 10], summed per
    sequence; the paper: none)"""
    max_ratio: float = 10.0
    """skip a micro-batch whose mean ratio pi/pi_old exceeds this (VinePPO's code); counted in losses/skipped"""
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        "none"
    """importance weights p_learner / p_sampler on each token's policy loss, for the sampler-learner mismatch (TRL's
    vllm_importance_sampling_mode; see rollout_correction). Default none: PRIME's code recomputes the old log-probs
    with the actor and never reads the sampler's"""
    rollout_correction_cap: float = 3.0
    """upper cap C of those weights: *_truncate clips a ratio at C, *_mask gives 0 above C (TRL's default, 3)"""
    ref_on_cpu: bool = False
    """keep the frozen reference on the CPU (slower; for GPUs short of memory). Its log-probs then come from the
    CPU's float32 arithmetic, the PRM's from the GPU's bf16 autocast: the process rewards start as rounding
    noise, not exactly 0"""

    # ---- computed at runtime ----
    batch_size: int = 0
    """(computed) samples per iteration when the filter fills the batch: num_prompts * samples_per_prompt"""


# ---------------------------------------------------------------------------------------------------------
# The algorithm's pure functions: each is tested on its own in tests/test_prime.py.
# Shapes: B = samples in the batch, T = response tokens (right-padded); mask is 1 on real response tokens.
# Rows are prompt-major: prompt i's K samples are rows i*K ... i*K + K - 1.
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


def returns_to_go(rewards: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): reverse cumulative sum along the response, sum_{s >= t} r_s (gamma = 1)."""
    return rewards.flip(1).cumsum(1).flip(1)


def outcome_rewards(texts: list[str], finished: list[bool], answers: list[str], questions: list[str]) -> list[float]:
    """1.0 for a correct final answer, 0.0 otherwise; a response cut by the length limit scores 0. The grader
    reads the question too: an answer that only hands its calculation back (\\boxed{59 * 100}) scores 0."""
    return [grade(text, gold, question=q) if done else 0.0
            for text, done, gold, q in zip(texts, finished, answers, questions)]


def implicit_process_rewards(prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                             beta: float = 0.05) -> torch.Tensor:
    """(B, T) token rewards beta * (log pi_prm - log pi_ref) on response tokens, 0 elsewhere."""
    return beta * (prm_logprobs - ref_logprobs) * mask


def prm_ce_loss(prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                beta: float = 0.05) -> torch.Tensor:
    """Binary cross-entropy between sigmoid(beta * sum over the response of the log-ratio) and the outcome
    label (1 correct, 0 wrong), averaged over the batch. Gradients flow into prm_logprobs only."""
    logits = (beta * (prm_logprobs - ref_logprobs) * mask).sum(1)  # (B,) the implicit outcome log-odds
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def prm_pairwise_accuracy(implicit_logits: torch.Tensor, scores: torch.Tensor, K: int) -> float:
    """The official `dpo_acc`: within each prompt's K responses, over the pairs (a < b) whose outcomes
    differ, the share the PRM orders right (implicit outcome log-odds of a above b exactly when a is the
    correct one), pairs weighted by |score difference|; a prompt with equal scores counts 0.5; mean over
    prompts. (B,) log-odds (beta * summed log-ratio) and (B,) scores -> a float in [0, 1]."""
    logits, s = implicit_logits.view(-1, K), scores.float().view(-1, K).to(implicit_logits.device)
    a, b = torch.triu_indices(K, K, offset=1)
    logit_diff, score_diff = logits[:, a] - logits[:, b], s[:, a] - s[:, b]  # (num_prompts, K(K-1)/2)
    right = ((logit_diff > 0) == (score_diff > 0)).float() * score_diff.abs()
    weight = score_diff.abs().sum(1)
    per_prompt = torch.where(weight > 0, right.sum(1) / weight.clamp(min=1e-12), torch.full_like(weight, 0.5))
    return float(per_prompt.mean())


# ---- Eq. 5 as the paper writes it (--no-official-normalisation) ----
def rloo_outcome_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(num_prompts, K) outcome rewards -> (num_prompts, K): R_i - mean_{j != i} R_j (leave-one-out)."""
    K = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (K - 1)


def rloo_process_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, K: int) -> torch.Tensor:
    """(B, T) process rewards of B = num_prompts * K responses (prompt-major) -> (B, T) process returns:
    at token t, sum over later tokens s >= t of r_s - b_i, where b_i = mean over the other K - 1 responses
    of the same prompt of their mean token reward (gamma = 1)."""
    mean_reward = (token_rewards * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    per_prompt = mean_reward.view(-1, K)
    baseline = ((per_prompt.sum(1, keepdim=True) - per_prompt) / (K - 1)).flatten()  # (B,) leave-one-out
    centred = (token_rewards - baseline[:, None]) * mask
    return returns_to_go(centred) * mask


# ---- the official pipeline (the default) ----
def official_leave_one_out(rewards: torch.Tensor, reward_mask: torch.Tensor, K: int) -> torch.Tensor:
    """The official code's RLOO on (B, T) rewards that live where reward_mask is 1: each such entry becomes
    r * K/(K-1) - (sum over the prompt's K responses of their mean reward) / (K-1); 0 elsewhere."""
    mean = (rewards * reward_mask).sum(1) / reward_mask.sum(1).clamp(min=1)  # (B,) each response's mean
    group_sum = mean.view(-1, K).sum(1).repeat_interleave(K)  # (B,) sum_j mean_j over the prompt's K responses
    return (rewards * (K / (K - 1)) - group_sum[:, None] / (K - 1)) * reward_mask


def official_prime_rewards(token_rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                           K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of the official pipeline: (B, T) process rewards divided by (the batch's largest
    |reverse cumulative sum| + 1e-6), then both parts through the official leave-one-out: the process part
    on every response token, the outcome part (B,) on each response's last token. Returns both, (B, T)."""
    mask = mask.to(token_rewards.dtype)
    token_rewards = token_rewards * mask
    normalised = token_rewards / (returns_to_go(token_rewards).abs().max() + 1e-6)
    process = official_leave_one_out(normalised, mask, K)
    last = torch.zeros_like(mask)
    last[torch.arange(len(mask), device=mask.device), mask.sum(1).long().clamp(min=1) - 1] = 1.0
    outcome = official_leave_one_out(scores.to(mask.device, mask.dtype)[:, None] * last, last, K)
    return process, outcome


def official_prime_advantages(token_rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, K: int,
                              process_weight: float = 5.0, outcome_weight: float = 5.0) -> torch.Tensor:
    """The pipeline of PRIME's official code, which produced the paper's numbers. token_rewards (B, T):
    beta * (log pi_prm - log pi_ref), 0 outside the mask; scores (B,) in {0, 1}; mask (B, T) right-padded;
    rows prompt-major. -> (B, T) advantages: process and outcome rewards after `official_prime_rewards`,
    weighed (5 each: the official reward_dpo_coef / reward_gt_coef), summed, turned into returns (reverse
    cumulative sum) and whitened over the response tokens (unbiased variance, eps 1e-8). Like the official
    code, padding positions are whitened too (they hold -mean / std); the policy loss never reads them.
    process_weight 0 gives the paper's RLOO baseline: the outcome part alone, whitened."""
    process, outcome = official_prime_rewards(token_rewards, scores, mask, K)
    mask = mask.to(process.dtype)
    returns = returns_to_go((process_weight * process + outcome_weight * outcome) * mask)
    # Under torchrun the whitening is over the whole batch: every rank's sums are added up (dist.all_sum).
    n = dist.all_sum(mask.sum())
    mean = dist.all_sum((returns * mask).sum()) / n.clamp(min=1)
    var = dist.all_sum(((returns - mean) ** 2 * mask).sum()) / n.clamp(min=1)
    var = var * n / (n - 1).clamp(min=1)  # the official order of operations
    return (returns - mean) * torch.rsqrt(var + 1e-8)


def process_outcome_std_ratio(process: torch.Tensor, outcome: torch.Tensor, mask: torch.Tensor) -> float:
    """std(process part) / std(outcome part) over the response tokens, both (B, T): how much of the
    advantage's spread the PRM contributes (nan when the outcome part is constant)."""
    def std(x):
        mean = masked_mean(x, mask)
        return float((((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)).sqrt())
    return std(process) / std(outcome) if std(outcome) > 0 else float("nan")


def accuracy_filter(scores: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(num_prompts, K) outcome rewards -> (num_prompts,) bool: keep prompts right between low and high of
    the time (both ends included), i.e. those whose samples disagree and so carry a learning signal."""
    accuracy = scores.float().mean(1)
    return (accuracy >= low - 1e-9) & (accuracy <= high + 1e-9)


def fill_batch(surplus: list, draw_prompts, sample_and_grade, accept, num_prompts: int, max_draws: int):
    """The official trainer's fill loop (PRIME-RL/PRIME ray_trainer.fit). Each draw takes the surplus left by
    the previous step plus draw_prompts() (new prompts), samples and grades them with sample_and_grade(prompts,
    draw) -> (one entry per prompt, (n, K) scores), and keeps the prompts that accept((n, K) scores) passes;
    it stops once num_prompts passed or after max_draws draws. Returns (kept: at most num_prompts
    (prompt, entry, (K,) scores) in the order they passed, the new surplus: the passed prompts beyond
    num_prompts, as prompts only, the number of draws, the number of prompts sampled)."""
    kept, draws, drawn = [], 0, 0
    while len(kept) < num_prompts and draws < max_draws:
        candidates = surplus + draw_prompts()
        surplus = []
        entries, scores = sample_and_grade(candidates, draws)
        kept += [(candidates[i], entries[i], scores[i]) for i in accept(scores).nonzero().flatten().tolist()]
        draws += 1
        drawn += len(candidates)
    return kept[:num_prompts], [prompt for prompt, _, _ in kept[num_prompts:]], draws, drawn


class PromptFeed:
    """The fill loop's run-long state, saved in every checkpoint: the position of the next training problem
    (drawn in order, round and round) and the surplus, the prompts that passed the filter beyond a full batch,
    which the next step samples first. How many prompts a step draws depends on its rollouts, so that position
    is not a function of the step."""

    def __init__(self, problems: list[Problem], num_prompts: int):
        self.problems, self.num_prompts, self.next_problem, self.surplus = problems, num_prompts, 0, []

    def draw(self) -> list[Problem]:
        """The next num_prompts training problems."""
        drawn = [self.problems[(self.next_problem + i) % len(self.problems)] for i in range(self.num_prompts)]
        self.next_problem = (self.next_problem + self.num_prompts) % len(self.problems)
        return drawn

    def state_dict(self) -> dict:
        return {"next_problem": self.next_problem, "surplus": [(p.question, p.answer) for p in self.surplus]}

    def load_state_dict(self, state: dict) -> None:
        self.next_problem = state["next_problem"]
        self.surplus = [Problem(question, answer) for question, answer in state["surplus"]]


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


def response_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False, chunk: int = 256):
    """Log-prob of each response token under `model` at `temperature`: (B, T) [, entropy (B, T)].

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


@torch.no_grad()
def reference_logprobs(model, batch: Batch, temperatures: tuple[float, ...], chunk: int = 256) -> torch.Tensor:
    """(B, T, len(temperatures)): the frozen reference's log-probs at each temperature, from ONE forward pass
    (the PRM's reward needs T = 1, the policy's KL the sampling temperature). Each extra temperature costs
    one float32 log-softmax over the vocabulary per chunk; the values equal response_logprobs' bit for bit."""
    dev = model.device
    T = batch.response_mask.shape[1]
    logits = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                   position_ids=batch.position_ids.to(dev), use_cache=False, logits_to_keep=T + 1).logits[:, :-1]
    flat = logits.reshape(-1, logits.shape[-1])  # (B * T, V)
    targets = batch.input_ids[:, batch.prompt_width :].reshape(-1).to(dev)  # (B * T,)
    pieces = [torch.stack([token_logprobs(flat[start : start + chunk], targets[start : start + chunk], temp)
                           for temp in temperatures], dim=-1) for start in range(0, flat.shape[0], chunk)]
    return torch.cat(pieces).view(*logits.shape[:2], len(temperatures))


def in_micro_batches(fn, batch: Batch, micro_batches) -> torch.Tensor:
    """(B, T) outputs of `fn` run on each micro-batch (a tensor of row indices) of the step's fixed partition,
    put back at their rows, on the device `fn` gives them on (the model's); 0 past each micro-batch's own
    longest response. (B, T, n) when fn gives (b, t, n)."""
    out = None
    for rows in micro_batches:
        result = fn(batch.rows(rows)).float()
        if out is None:
            out = torch.zeros(*batch.response_mask.shape, *result.shape[2:], device=result.device)
        out[rows, : result.shape[1]] = result
    return out


def fill_step(generator, tokenizer, feed: PromptFeed, args, step: int):
    """Step 2.1 of one training step: the official fill loop (fill_batch) with this run's sampler, grader and
    filter: K responses to each drawn prompt, graded; the prompts the accuracy filter accepts are kept (all of
    them with --no-filter). Returns (kept, as fill_batch returns it; the fill statistics)."""
    K = args.samples_per_prompt

    def sample_and_grade(problems, draw: int):
        """K completions of each problem and their (len(problems), K) outcome rewards."""
        outs = generator.generate([prompt_ids(tokenizer, p.question) for p in problems], n=K,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed * 100_003 + step * 1_009 + draw)
        return outs, torch.tensor([outcome_rewards([c.text for c in row], [c.finished for c in row], [p.answer] * K,
                                                   [p.question] * K) for p, row in zip(problems, outs)])

    accept = (lambda rows: torch.ones(len(rows), dtype=torch.bool)) if args.no_filter else \
        (lambda rows: accuracy_filter(rows, args.filter_low, args.filter_high))
    kept, feed.surplus, draws, drawn = fill_batch(feed.surplus, feed.draw, sample_and_grade, accept,
                                                  args.num_prompts, args.max_prompt_draws)
    if len(kept) < args.num_prompts:
        tqdm.write(f"step {step}: draw cap hit (--max-prompt-draws {args.max_prompt_draws}): {len(kept)} of "
                   f"{args.num_prompts} prompts passed the filter among {drawn} drawn")
    return kept, {"prime/batch_fill": len(kept) / args.num_prompts, "prime/draws": draws,
                  "prime/filter_acceptance": (len(kept) + len(feed.surplus)) / drawn,
                  "prime/surplus_prompts": len(feed.surplus), "prime/draw_cap_hit": float(len(kept) < args.num_prompts)}


def prime_advantages(token_rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, K: int,
                     process_reward_coef: float, official: bool, diagnostics: bool):
    """The policy's (B, T) advantages from the (B, T) token rewards and the (B,) outcomes, groups of K: the
    official pipeline (official_prime_advantages, the default) or Eq. 5 as the paper writes it (RLOO outcome
    advantages plus process_reward_coef x RLOO process advantages). With `diagnostics`, how much each pipeline's
    process part spreads against its outcome part on this batch, and the mean token reward of correct and wrong
    responses. Returns (advantages, statistics)."""
    outcome_adv = rloo_outcome_advantages(scores.view(-1, K)).flatten()[:, None] * mask  # (B, T)
    process_adv = process_reward_coef * rloo_process_advantages(token_rewards, mask, K)  # (B, T)
    if official:
        advantages = official_prime_advantages(token_rewards, scores, mask, K, process_weight=5.0 * process_reward_coef)
    else:
        advantages = outcome_adv + process_adv
    if not diagnostics:
        return advantages, {}
    process, outcome = official_prime_rewards(token_rewards, scores, mask, K)
    mean_token_reward = token_rewards.sum(1) / mask.sum(1)  # (B,)
    return advantages, {
        "prime/std_ratio_official": process_outcome_std_ratio(
            process_reward_coef * returns_to_go(process), returns_to_go(outcome), mask),
        "prime/std_ratio_eq5": process_outcome_std_ratio(process_adv, outcome_adv, mask),
        "prime/process_reward_correct": float(mean_token_reward[scores == 1].mean()),  # nan if none
        "prime/process_reward_wrong": float(mean_token_reward[scores == 0].mean()),
    }


def update_prm(prm, prm_opt, prm_sched, batch: Batch, micro_batches, accumulation: int, ref_raw: torch.Tensor,
               scores: torch.Tensor, K: int, args, autocast):
    """PRIME's PRM step on one batch: (a) one pass of its cross-entropy update on the outcome labels `scores`
    (B,), over the step's micro-batches grouped `accumulation` to a minibatch; single forward: each micro-batch's
    token rewards come from the forward of its loss (log-probs at T = 1), before its minibatch's optimizer step;
    (b) the PRM after its update on the same micro-batches: its accuracy, and the double forward's rewards
    (--prm-update-first). `ref_raw` (B, T): the reference's log-probs at T = 1. Returns ((B, T) token rewards,
    statistics)."""
    mask = batch.response_mask
    token_rewards = torch.zeros_like(mask)  # (B, T)
    prm.train()
    prm_losses = []
    prm_lr = prm_sched.get_last_lr()[0]  # the learning rate of this step's first PRM step
    for group in torch.randperm(len(micro_batches)).split(accumulation):
        rows_in_minibatch = sum(len(micro_batches[i]) for i in group)
        for micro in (micro_batches[i] for i in group):
            sub = batch.rows(micro)
            m = sub.response_mask.to(mask.device)
            with autocast():
                prm_logprobs = response_logprobs(prm, sub, 1.0)  # (b, t)
                loss = prm_ce_loss(prm_logprobs, ref_raw[micro, : m.shape[1]], m, scores[micro], args.beta)
            (loss * len(micro) / rows_in_minibatch).backward()  # the minibatch's mean over samples
            token_rewards[micro, : m.shape[1]] = implicit_process_rewards(
                prm_logprobs.detach(), ref_raw[micro, : m.shape[1]], m, args.beta)
            prm_losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(prm.parameters(), args.prm_max_grad_norm)
        prm_opt.step()
        prm_sched.step()
        prm_opt.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast():
        prm.eval()
        prm_after = in_micro_batches(lambda b: response_logprobs(prm, b, 1.0), batch, micro_batches) * mask
    rewards_after = implicit_process_rewards(prm_after, ref_raw, mask, args.beta)  # (B, T)
    stats = {
        "prime/prm_loss": np.mean(prm_losses),  # held out: each minibatch's loss before its own step
        "prime/prm_acc_before": prm_pairwise_accuracy(token_rewards.sum(1), scores, K),
        "prime/prm_acc_after": prm_pairwise_accuracy(rewards_after.sum(1), scores, K),
        "prime/prm_learning_rate": prm_lr,
    }
    return (rewards_after if args.prm_update_first else token_rewards), stats


# ---------------------------------------------------------------------------------------------------------
# The checks of the arguments.
# ---------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    """Reject out-of-range values and inconsistent batch sizes before anything is loaded or written."""
    check_shared_args(args)
    check_ranges(args, {
        ">= 1": ["max_prompt_draws"],
        ">= 0": ["kl_coef", "prm_learning_rate", "prm_weight_decay", "process_reward_coef"],
        "> 0": ["clip_eps", "max_ratio", "beta", "prm_max_grad_norm"],
        "in [0, 1]": ["filter_low", "filter_high"],
    })
    if args.samples_per_prompt < 2:
        raise SystemExit("error: RLOO needs --samples-per-prompt of at least 2 (a leave-one-out baseline)")
    if args.filter_low > args.filter_high:
        raise SystemExit(f"error: --filter-low {args.filter_low} must be <= --filter-high {args.filter_high}")
    if args.ref_on_cpu and args.lora_rank:
        raise SystemExit("error: --ref-on-cpu has nothing to move with --lora-rank: the reference is the policy's "
                         "own base model (its adapters off)")


# ---------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    # 1. Set-up: arguments, seeds, data, models, optimizers, generator, the run's bookkeeping.
    args = resume_args(Args, args)
    check_args(args)
    device, autocast, checkpointing = setup(args)
    # The PRM is loaded (and trained) unless --process-reward-coef 0; the reference with the PRM or a KL term.
    use_prm = args.process_reward_coef != 0
    use_reference = use_prm or args.kl_coef > 0
    # The frozen reference never trains. With the PRM it is float32 on every device, like the PRM, and runs
    # under the same autocast, so that at equal weights both give exactly the same log-probs: the token reward
    # beta * (log pi_prm - log pi_ref) is exactly 0 at step 0. (A bfloat16 reference rounds differently from
    # float32 weights under autocast; the official pipeline divides the token rewards by the batch's largest
    # |return|, which would blow that rounding noise up to full size.) Without the PRM, for a KL term only, it
    # is bfloat16 on a GPU (half the memory; the KL then starts above 0) and float32 on the CPU.
    ref_dtype = "float32" if use_prm or not device.startswith("cuda") else "bfloat16"
    # Fail now, with one line, if the run clearly cannot fit (estimated from the config: no weight is loaded).
    # The reference does not count against the GPU with --ref-on-cpu.
    check_memory(args.model, device, trainable=1 + int(use_prm),
                 frozen=int(use_reference and not (args.ref_on_cpu and device.startswith("cuda"))),
                 frozen_dtype=ref_dtype, backend=args.backend, vllm_share=args.vllm_gpu_memory_utilization,
                 micro_batch=args.micro_batch_size, max_new_tokens=args.max_new_tokens, checkpointing=checkpointing,
                 **memory_layout(args))

    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    eval_problems = load_problems(args.dataset, "test", size=args.num_eval_problems, seed=0)
    tokenizer = load_tokenizer(args.model)
    # The trained models: LoRA adapters with --lora-rank; under torchrun wrapped in DDP (or FSDP2 with --fsdp).
    policy = dist.wrap(load_trained(args, device, checkpointing), args.fsdp)
    # The PRM and the reference start as copies of the policy (with LoRA the reference is the policy with its
    # adapters off). With --process-reward-coef 0 (plain RLOO) the PRM is not needed, and the reference only
    # for a KL term.
    prm = dist.wrap(load_trained(args, device, checkpointing), args.fsdp) if use_prm else None
    reference = load_reference(args, policy, ref_dtype, "cpu" if args.ref_on_cpu else device) if use_reference \
        else None
    # AdamW as PRIME's official code sets it (eps 1e-8; weight decay 0.01 for the policy, 0 for the PRM;
    # constant learning rate), each model with its own scheduler over its own optimizer steps: the policy
    # num_epochs x minibatches per step, the PRM one pass of minibatches per step.
    minibatches = args.batch_size // args.minibatch_size
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                   weight_decay=args.weight_decay)
    policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, lambda s: lr_multiplier(
        s, args.num_steps * args.num_epochs * minibatches, args.warmup_ratio, args.lr_decay))
    if use_prm:
        prm_opt = torch.optim.AdamW(prm.parameters(), lr=args.prm_learning_rate, eps=args.adam_eps,
                                    weight_decay=args.prm_weight_decay)
        prm_sched = torch.optim.lr_scheduler.LambdaLR(prm_opt, lambda s: lr_multiplier(
            s, args.num_steps * minibatches, args.warmup_ratio, args.lr_decay))
    generator = make_run_generator(args, policy, tokenizer)

    # The run folder, metrics, checkpoints (with --resume: everything below restored from the newest one). The
    # run-long state is that of ppo.py (weights, optimizers, schedules, random generators) for the policy and the
    # PRM, plus the fill loop's prompt feed; the rollouts of each draw are seeded by the step and the draw, so a
    # resumed run samples what a run that never stopped would.
    feed = PromptFeed(train_problems, args.num_prompts)
    run = Run(args, "prime_implicit_prm.py", models={"policy": policy} | ({"prm": prm} if use_prm else {}),
              optimizers={"policy": policy_opt} | ({"prm": prm_opt} if use_prm else {}),
              schedulers={"policy": policy_sched} | ({"prm": prm_sched} if use_prm else {}), state={"feed": feed},
              generator=generator, tokenizer=tokenizer, eval_problems=eval_problems)

    for step in run.steps():
        t_step = time.time()

        # 2.1 Fill the batch as the official trainer does: draw prompts (the previous step's surplus first),
        #     generate K responses to each, grade them, keep the prompts the accuracy filter accepts (some
        #     right, some wrong), and repeat until num_prompts are kept or --max-prompt-draws draws are spent.
        t0 = time.time()
        K = args.samples_per_prompt
        kept, fill_stats = fill_step(generator, tokenizer, feed, args, step)
        if dist.active():
            # Every rank ran the same fill loop (its generation split over the ranks) and holds the same kept
            # prompts; each trains on its share of them with all their samples, so their number is cut to a
            # multiple of the ranks, the rest going back to the surplus (sampled again next step).
            cut = len(kept) - len(kept) % dist.world()
            feed.surplus = [p for p, _, _ in kept[cut:]] + feed.surplus
            kept = dist.share(kept[:cut])
        t_gen = time.time() - t0
        if not kept:  # every drawn prompt was all right or all wrong: nothing to learn from this step
            run.log(step, fill_stats)
            tqdm.write(f"step {step}: no prompt passed the filter; skipping the update")
            if run.end_step(step):
                break
            continue

        # 2.2 The batch: B = len(kept) * K samples, prompt-major (sample j of prompt i at row i*K + j).
        completions = [c for _, outs_i, _ in kept for c in outs_i]
        scores = torch.cat([s for *_, s in kept]).to(device)  # (B,)
        batch = make_batch([prompt_ids(tokenizer, p.question) for p, _, _ in kept for _ in range(K)],
                           [c.token_ids for c in completions], tokenizer.pad_token_id)
        mask = batch.response_mask.to(device)  # (B, T), on the run's device as every (B, T) tensor the loss reads
        lengths = mask.sum(1).long()  # (B,)
        B = len(scores)

        # 2.3 PRIME's own part: log-probs of the policy (old) and the reference; one CE update of the PRM that
        #     also reads its token rewards; RLOO advantages. The micro-batches are fixed once per step: these
        #     passes and every epoch of the update see the same rows with the same padding, so in bf16 they
        #     run the same arithmetic and the ratio is exactly 1 at unchanged weights.
        generator.sleep()  # vLLM on a GPU frees its weights and KV cache until the next sync; no-op otherwise
        micro_batches = torch.randperm(B).split(args.micro_batch_size)  # row indices, (b,) each
        accumulation = args.minibatch_size // dist.world() // args.micro_batch_size  # micro-batches per minibatch
        t0 = time.time()
        with torch.no_grad(), autocast():
            policy.eval()
            old_logprobs = in_micro_batches(lambda b: response_logprobs(policy, b, args.temperature), batch,
                                            micro_batches) * mask  # (B, T)
            ref_raw = ref_logprobs = None
            if reference is not None:
                # One forward per micro-batch, two temperatures: T = 1 (raw logits, the official PRM reward's)
                # and the sampling temperature (the policy's KL).
                both = in_micro_batches(lambda b: reference_logprobs(reference, b, (1.0, args.temperature)), batch,
                                        micro_batches).to(device) * mask[..., None]  # (B, T, 2); to: --ref-on-cpu
                ref_raw, ref_logprobs = both.unbind(-1)  # (B, T) each
        t_ref = time.time() - t0
        #     The sampler's own log-probs of the same tokens against the learner's: the mismatch (logged), and
        #     the rollout correction's weight on each token's policy loss (1 with --rollout-correction none).
        sampled = sampler_logprobs(completions, device)  # (B, T)
        is_weights = rollout_correction(old_logprobs, sampled, mask, args.rollout_correction,
                                        args.rollout_correction_cap)  # (B, T)
        mismatch = mismatch_stats(old_logprobs, sampled, mask, is_weights, args.rollout_correction,
                                  args.rollout_correction_cap)
        t0 = time.time()
        prime_stats = {}
        token_rewards = torch.zeros_like(mask)  # (B, T) process rewards; stay 0 without a PRM
        if use_prm:
            #   a-b. one CE update of the PRM on this batch's outcomes; its token rewards (read before or after it)
            token_rewards, prime_stats = update_prm(prm, prm_opt, prm_sched, batch, micro_batches, accumulation,
                                                    ref_raw, scores, K, args, autocast)
        t_prm = time.time() - t0
        #   c. the advantages: the official pipeline (default), or Eq. 5 as the paper writes it
        advantages, advantage_stats = prime_advantages(token_rewards, scores, mask, K, args.process_reward_coef,
                                                       args.official_normalisation, diagnostics=use_prm)
        prime_stats |= advantage_stats

        # 2.4 Update: num_epochs passes; each minibatch is `accumulation` micro-batches of the step's fixed
        #     partition, in a new random order every epoch, with gradients accumulated over them. (A step that
        #     hit the draw cap has a smaller batch, so its last minibatch may be smaller.)
        t0 = time.time()
        policy.train()
        stats = {k: [] for k in ("policy_loss", "clipfrac", "approx_kl", "entropy", "kl_k3")}
        skipped = 0
        lr = policy_sched.get_last_lr()[0]  # the learning rate of this step's first optimizer step
        for _ in range(args.num_epochs):
            for group in torch.randperm(len(micro_batches)).split(accumulation):
                # token-mean over the minibatch (under torchrun: each rank's share of it, see dist.rank_mean)
                mb_tokens = dist.rank_mean(sum(mask[micro_batches[i]].sum() for i in group))
                rows_in_minibatch = sum(len(micro_batches[i]) for i in group)
                for micro in (micro_batches[i] for i in group):
                    sub = batch.rows(micro)
                    m = sub.response_mask.to(device)  # (b, t): the micro-batch trimmed to its longest response
                    cut = lambda x: x[micro, : m.shape[1]]  # noqa: E731  (b, t) slice of a (B, T) tensor
                    weight = m.sum() / mb_tokens
                    with autocast():
                        logprobs, entropy = response_logprobs(policy, sub, args.temperature, with_entropy=True)
                        pg_loss, clipfrac, approx_kl, ratio = ppo_policy_loss(
                            logprobs, cut(old_logprobs), cut(advantages), m, args.clip_eps, cut(is_weights))
                        kl = kl_k3(logprobs, cut(ref_logprobs), m).sum(1).mean() if reference is not None \
                            else None  # summed per sequence
                    if ratio > args.max_ratio:  # a diverged micro-batch: skip it, as VinePPO's code does
                        skipped += 1
                        if dist.active():  # every rank joins each gradient reduction: a backward of zero
                            dist.zero_loss(logprobs).backward()
                        continue
                    # weight turns micro-batch token means into the minibatch token mean; the KL, a mean
                    # over sequences, takes each micro-batch's share of the minibatch's sequences.
                    loss = pg_loss * weight
                    if args.kl_coef > 0:
                        loss = loss + args.kl_coef * kl * len(micro) / rows_in_minibatch
                    loss.backward()
                    for k, v in (("policy_loss", pg_loss), ("clipfrac", clipfrac), ("approx_kl", approx_kl),
                                 ("entropy", masked_mean(entropy, m)), ("kl_k3", kl)):
                        if v is not None:
                            stats[k].append(float(v.detach()))
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                policy_opt.step()
                policy_sched.step()
                policy_opt.zero_grad(set_to_none=True)
        generator.sync_weights(policy)
        t_update = time.time() - t0

        # 2.5 Log; evaluate every eval_every steps.
        step_time = time.time() - t_step
        logs = {
            "charts/reward_mean": scores.mean(), "charts/response_length": lengths.float().mean(),
            "charts/truncated_frac": 1 - np.mean([c.finished for c in completions]),
            "charts/step_time": step_time, "charts/learning_rate": lr,
            "losses/policy_loss": np.mean(stats["policy_loss"]),
            "losses/clipfrac": np.mean(stats["clipfrac"]), "losses/approx_kl": np.mean(stats["approx_kl"]),
            "losses/entropy": np.mean(stats["entropy"]), "losses/skipped": skipped,
            "time/generation": t_gen, "time/reference": t_ref, "time/prm": t_prm, "time/update": t_update,
            **mismatch,  # the sampler-learner mismatch and the rollout correction's weights
            "time/prm_share": t_prm / step_time,  # a wall-clock ratio: under time/, as the other timings
            **fill_stats, **prime_stats,
        }
        if reference is not None:  # the KL to the reference at the sampling temperature (a statistic when kl_coef is 0)
            logs |= {"losses/kl_ref_k3": np.mean(stats["kl_k3"]),
                     "losses/kl_ref_k1": ((old_logprobs - ref_logprobs) * mask).sum(1).mean()}
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
