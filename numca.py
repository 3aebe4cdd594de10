"""Numca (Chen et al., "Hista and Numca", arXiv 2605.29782; official code VOXXXX1874/Hista), on a GRPO/DAPO base.

The state of a response is the SET of distinct numbers it has written so far. Per prompt, a table kept for the
whole run (and in checkpoints) maps state -> (count, reward sum) over every rollout that passed through it, so
V(state) is their mean final reward. A response is cut into segments where a new number appears; each token of
segment j gets R - V(state_j) (lambda = 1), divided by the group's reward std + 1e-4. The loss is DAPO's
(clip 0.2 / 0.28, token-level mean, no KL) or, with --loss cispo, CISPO's (cap 5), as TRL 0.29 computes them;
each token's loss is weighted against the sampler-learner mismatch as TRL does by default (sequence_mask, cap 3).
--no-numca gives plain GRPO/DAPO (or GRPO/CISPO) from the same file. No critic, no extra model pass.

Departures from the official code (docs/numca.md gives the reasons):
- token boundaries come from decoding the sampled tokens (token_char_ends), not from re-tokenising the text
- --min-gap-tokens 20 (official: 50): the CPU default's responses are ~56 tokens long
- numbers keep decimals and thousands separators ("1,234.5" is one number); official: bare digit runs
- a group whose rewards are all equal keeps R - V undivided (group_scale); official: divided by std + 1e-4
- dynamic sampling is off by default (--dynamic-sampling-scale 2 is the official recipes')
- CPU-sized defaults: 4 prompts x 8, lr 3e-6 (official 1e-6), T 0.6, 4 optimizer steps on quarters of the batch
- on the CPU the learner computes in float32 (--bf16 auto); official: bf16 (as here on CUDA)
- a micro-batch whose mean ratio exceeds --max-ratio is skipped (losses/skipped); TRL has no such guard
- the sampler-learner correction applies with the hf backend too (TRL: with vLLM only), whose bf16 copy samples

Docs: docs/numca.md

Run:  python numca.py                                                        # CPU, offline, default
      python numca.py --no-numca                                             # the GRPO/DAPO baseline
      python numca.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --backend vllm   # one GPU
      torchrun --nproc-per-node 8 numca.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --fsdp   # 8 GPUs
      python numca.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --lora-rank 16   # LoRA, one GPU
"""

from __future__ import annotations

import bisect
import math
import re
import sys
import time
from collections import OrderedDict
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
    exp_name: str = "numca"
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
    no_numca: bool = False
    """plain GRPO/DAPO: every token gets the group-normalised outcome advantage (the paper's baseline)"""
    min_gap_tokens: int = 20
    """milestones closer than this many TOKENS are merged into the later one (the official code: 50)"""
    lam: float = 1.0
    """lambda of the GAE-style pass over segments (1.0: R - V(state of the segment))"""
    max_table_states: int | None = None
    """cap on the table's size in states; past it the prompts updated longest ago are forgotten"""
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
# The algorithm's pure functions: each is tested on its own in tests/test_numca.py.
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


NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def parse_numbers(text: str) -> list[tuple[int, str]]:
    """(character where it starts, the number) for every number of `text` but the last (the final answer is
    not a milestone). Numbers are kept as written, without thousands separators: "1,234" -> "1234"."""
    return [(m.start(), m.group().replace(",", "")) for m in list(NUMBER.finditer(text))[:-1]]


def number_states(text: str) -> list[frozenset[str]]:
    """Every state a response passes through, unmerged: the empty set, then the set of distinct numbers after
    each new number. This is what the table counts (the official Numca_dict.update); merging milestones only
    decides which of these states a response READS."""
    states, seen = [frozenset()], set()
    for _, number in parse_numbers(text):
        if number not in seen:
            seen.add(number)
            states.append(frozenset(seen))
    return states


def merge_milestones(positions: list[int], numbers: list[str], min_gap: int) -> list[tuple[int, frozenset[str]]]:
    """The milestones a response reads: where each new segment starts, and its state (the set of distinct
    numbers written so far), in the unit of `positions` (characters or tokens; one per number of `numbers`).

    Positions closer than `min_gap` are merged into the later one, going backwards (so a run of close numbers
    moves to its last), and a merged milestone carries the later (larger) state; a repeated number does not
    change the state. The first segment, from position 0 with the empty state, is implied.
    """
    positions = list(positions)
    for i in range(len(positions) - 2, -1, -1):  # merge backwards: a close pair moves to the later one
        if positions[i + 1] - positions[i] < min_gap:
            positions[i] = positions[i + 1]
    milestones: list[tuple[int, frozenset[str]]] = []
    seen: set[str] = set()
    for number, position in zip(numbers, positions):
        if number in seen:
            continue  # a repeated number does not change the state
        seen.add(number)
        if milestones and milestones[-1][0] == position:
            milestones[-1] = (position, frozenset(seen))
        else:
            milestones.append((position, frozenset(seen)))
    return milestones


def number_milestones(text: str, min_gap: int = 50) -> list[tuple[int, frozenset[str]]]:
    """Milestones of `text` in CHARACTERS: the character where each new number starts (the final answer
    excluded), merged when closer than `min_gap` characters (what the official SVEB script does)."""
    numbers = parse_numbers(text)
    return merge_milestones([p for p, _ in numbers], [n for _, n in numbers], min_gap)


class NumcaTable:
    """Per prompt, state -> [count, reward sum] over every rollout that passed through the state, kept for
    the whole run. `max_states` caps the total size: past it, the prompts updated longest ago are dropped."""

    def __init__(self, max_states: int | None = None):
        self.tables: OrderedDict[str, dict[frozenset, list[float]]] = OrderedDict()
        self.max_states = max_states
        self.size = 0  # states over all prompts

    def update(self, prompt_id: str, path: list[frozenset], reward: float) -> None:
        """Add `reward` once to each state of `path` (the states a rollout passed through, from the empty set)."""
        table = self.tables.setdefault(prompt_id, {})
        self.tables.move_to_end(prompt_id)
        for state in set(path):
            if state not in table:
                table[state] = [0, 0.0]
                self.size += 1
            table[state][0] += 1
            table[state][1] += reward
        while self.max_states is not None and self.size > self.max_states and len(self.tables) > 1:
            _, oldest = self.tables.popitem(last=False)
            self.size -= len(oldest)

    def value(self, prompt_id: str, state: frozenset) -> float:
        """Mean reward of the rollouts of `prompt_id` that passed through `state` (0.0 if none did)."""
        count, total = self.tables.get(prompt_id, {}).get(state, (0, 0.0))
        return total / count if count else 0.0

    def count(self, prompt_id: str, state: frozenset) -> int:
        return self.tables.get(prompt_id, {}).get(state, (0, 0.0))[0]

    def state_dict(self) -> dict:
        """What a checkpoint keeps: every prompt's states with their counts and reward sums, in the order the
        prompts were last updated (the order the cap forgets them in)."""
        return {"tables": [(prompt_id, [(sorted(state), *entry) for state, entry in table.items()])
                           for prompt_id, table in self.tables.items()]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the table with one from state_dict() (the cap stays this table's own)."""
        self.tables = OrderedDict((prompt_id, {frozenset(numbers): [count, total] for numbers, count, total in rows})
                                  for prompt_id, rows in state["tables"])
        self.size = sum(len(table) for table in self.tables.values())


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


def token_char_ends(tokenizer, token_ids: list[int]) -> list[int]:
    """For each token, the length of the decoded text up to and including it (capped at the whole text's
    length, non-decreasing): len(decode(token_ids[: i + 1])), computed in linear time.

    Decoding every prefix costs O(T^2). Instead, the length at token i is the length at the last clean point s
    (a prefix whose decoded text did not end in U+FFFD, the mark of a half-decoded UTF-8 character) plus what
    tokens s .. i add, decoded with token s - 1 in front as context and minus that context's own length (a
    SentencePiece decode drops the leading space of its first token: the context takes that loss in both
    terms). A multi-byte character split across tokens keeps the window open until it is complete.
    """
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text_len = len(decode(token_ids))
    ends, last = [], 0
    clean, clean_len, context_len = 0, 0, 0  # the last clean point s, len(decode(ids[:s])), len(decode(ids[s-1:s]))
    for i in range(len(token_ids)):
        context = max(clean - 1, 0)
        piece = decode(token_ids[context : i + 1])
        length = clean_len + len(piece) - context_len
        # a prefix can end in half a UTF-8 character (a replacement char): cap and keep monotone
        last = max(last, min(text_len, length))
        ends.append(last)
        if not piece.endswith("\ufffd"):
            clean, clean_len, context_len = i + 1, length, len(decode(token_ids[i : i + 1]))
    return ends


def milestone_tokens(token_ends: list[int], char_positions: list[int]) -> list[int]:
    """Character milestones -> token milestones: the token after the one that holds the character (the first
    token whose text ends past it) starts the new segment, as the official code's offset mapping does. A token
    that starts exactly at a number holds it, so it is still scored against the previous state."""
    return [min(bisect.bisect_right(token_ends, c) + 1, len(token_ends)) for c in char_positions]


def token_segments(num_tokens: int, milestone_positions: list[int]) -> list[int]:
    """The segment of each of `num_tokens` tokens: how many (token) milestones are at or before it; segment
    0 is the implied empty-state segment."""
    return [bisect.bisect_right(milestone_positions, t) for t in range(num_tokens)]


def numca_advantages(table: NumcaTable, tokenizer, ids: list[str], completions, scores: torch.Tensor,
                     scale: torch.Tensor, G: int, min_gap_tokens: int, lam: float):
    """Numca's token advantages for a batch of B = len(ids) responses, prompt-major in groups of G (ids[b]: the
    prompt of response b; completions[b]: its text and token ids; scores (B,): its reward; scale: one factor per
    group). Puts the batch into the run-long table, then returns ((B, T) advantages, statistics)."""
    #   a. the numbers of every response (but the final answer) and the character where each starts
    numbers = [parse_numbers(c.text) for c in completions]
    #   b. the milestones each response reads, in tokens: the token after the one that holds a new number's
    #      first character opens a segment; milestones closer than min_gap_tokens merge into the later one,
    #      with the later state
    milestones = []  # per response: (token that opens the segment, state)
    for c, nums in zip(completions, numbers):
        positions = milestone_tokens(token_char_ends(tokenizer, c.token_ids), [pos for pos, _ in nums])
        milestones.append(merge_milestones(positions, [n for _, n in nums], min_gap_tokens))
    paths = [[frozenset()] + [state for _, state in ms] for ms in milestones]  # states read, per response
    seen_before = [[table.count(i, state) > 0 for state in path] for i, path in zip(ids, paths)]
    #   c. the whole batch goes into the run-long table first (as in the official code), each response with
    #      every distinct-number prefix set it passed through, unmerged
    for i, c, reward in zip(ids, completions, scores.tolist()):
        table.update(i, number_states(c.text), reward)
    #   d. token advantages R - V(state of its segment) (lambda = 1), times the group's scale
    advantages = torch.zeros(len(completions), max(len(c.token_ids) for c in completions))  # (B, T)
    seen_tokens = 0
    for b, (c, ms, path) in enumerate(zip(completions, milestones, paths)):
        values = [table.value(ids[b], state) for state in path]
        seg_adv = segment_advantages(values, float(scores[b]), lam)
        segment = token_segments(len(c.token_ids), [pos for pos, _ in ms])  # (T_b,) segment of each token
        advantages[b, : len(segment)] = torch.tensor(seg_adv)[segment] * scale[b // G]
        seen_tokens += sum(seen_before[b][j] for j in segment)
    return advantages, {
        "numca/milestones_per_response": np.mean([len(ms) for ms in milestones]),
        "numca/distinct_states_per_prompt": np.mean([len(table.tables[i]) for i in ids[::G]]),
        "numca/table_size": table.size,
        "numca/seen_state_token_frac": seen_tokens / float(sum(len(c.token_ids) for c in completions)),
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


# ---------------------------------------------------------------------------------------------------------
# The checks of the arguments.
# ---------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    """Reject out-of-range values and inconsistent batch sizes before anything is loaded or written."""
    check_shared_args(args)
    if args.clip_eps_high is None:  # the official recipes' epsilon_high for the chosen loss
        args.clip_eps_high = 5.0 if args.loss == "cispo" else 0.28
    check_ranges(args, {">= 1": ["max_table_states", "dynamic_sampling_scale"],
                        ">= 0": ["kl_coef", "min_gap_tokens"],
                        "> 0": ["clip_eps_low", "clip_eps_high", "max_ratio"], "in [0, 1]": ["lam"]})


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
    # reference therefore starts above 0 (a floor of rounding, docs/numca.md), not at exactly 0.
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
    table = NumcaTable(args.max_table_states)
    generator = make_run_generator(args, policy, tokenizer)

    # The run folder, metrics, checkpoints (with --resume: everything below restored from the newest one).
    # The run-long state is that of ppo.py (weights, optimizer, schedule, random generators) plus Numca's table.
    # The prompts of a step (dynamic sampling's too) are a function of the step alone and its rollouts are
    # seeded by it, so a resumed run draws and samples what a run that never stopped would.
    run = Run(args, "numca.py", models={"policy": policy}, optimizers={"policy": policy_opt},
              schedulers={"policy": policy_sched}, state={"numca_table": table}, generator=generator,
              tokenizer=tokenizer, eval_problems=eval_problems)

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
        batch = make_batch([p for p in prompts for _ in range(args.samples_per_prompt)],
                           [c.token_ids for c in completions], tokenizer.pad_token_id)
        mask = batch.response_mask.to(device)  # (B, T), on the run's device as every (B, T) tensor the loss reads
        lengths = mask.sum(1).long()  # (B,)
        # Under torchrun every rank holds the whole batch's rollouts and puts all of them into its copy of Numca's
        # table (the same on every rank); each runs the model on its share of the prompts with all their samples
        # (B below is then B / ranks). Without torchrun the share is every row.
        batch = batch.rows(dist.share(torch.arange(len(mask))))
        mask = batch.response_mask.to(device)  # (B, T) of this rank's rows

        # 2.3 Numca's own part: old log-probs (and the reference's), then per-segment advantages.
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
        std = group_std(scores.view(args.num_prompts, G))  # (num_prompts,)
        if args.no_numca:
            #   GRPO: every token of response i gets (R_i - group mean) / (group std + 1e-4)
            per_sample = grpo_advantages(scores.view(args.num_prompts, G)).flatten()  # (B,)
            advantages = dist.share(per_sample).to(device)[:, None] * mask  # (B, T)
            numca_stats = {}
        else:
            ids = [p.question for p in problems for _ in range(G)]  # prompt id per sample
            advantages, numca_stats = numca_advantages(table, tokenizer, ids, completions, scores, group_scale(std),
                                                       G, args.min_gap_tokens, args.lam)
            advantages = dist.share(advantages)[:, : mask.shape[1]].to(device)  # built on the CPU from the table
        t_numca = time.time() - t0

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
            "time/generation": t_gen, "time/reference": t_ref, "time/numca": t_numca, "time/update": t_update,
            **mismatch,  # the sampler-learner mismatch and the rollout correction's weights
            "time/numca_share": t_numca / step_time,  # a wall-clock ratio: under time/, as the other timings
            **numca_stats,
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
