"""SVEB, the State Value Estimation Benchmark (Chen et al., "Hista and Numca", arXiv 2605.29782): how far each
value estimator in this repository is from Monte Carlo ground truth, on the same states, in one table.

A state is a prefix of a response. Its true value is the probability that the policy, continuing from it,
ends with a correct answer; we take the mean reward of n fresh continuations as the ground truth. Every
estimator guesses that value from what it would have during training, and we report the mean absolute
error (MAE) against the ground truth, with its standard error, per field and per difficulty tier.

Two stages, which can run separately (`--stage build`, `--stage eval`; the default runs both):
- build: for N problems, sample G responses and grade them. Cut the first response at a uniformly random
  space character (seeded): that prefix is the state. Sample n continuations from it for the ground truth
  and, separately, 1, 2 and K more for the Monte Carlo estimators. Also sample G responses to other (train
  split) problems, on which PPO's critic and PRIME's PRM are trained. Everything goes to one JSONL file, a
  chunk of problems at a time; an interrupted build resumes where it stopped.
- eval: read that file, run every estimator, write a markdown table, a bar chart, JSON and the critic-
  collapse check to the output folder.

The estimators, each imported from the script that trains with it, so the benchmark measures that code:
| estimator        | value of the state                                              | code                          |
| GRPO             | mean reward of the G responses (the baseline every token gets)   | numca.grpo_advantages' mean   |
| MC@1, MC@2, MC@K | mean reward of 1, 2, K continuations from the state (K = 9)      | vineppo.estimate_values       |
| Numca            | table of the G responses' number-sets, read at the cut           | numca.number_milestones, NumcaTable |
| Hista            | 1/d-weighted kNN over the G responses' hidden-state prefixes     | hista.ema_smooth ... knn_value |
| PPO-1 l=1, 0.95  | a critic trained on the other problems' responses, read at the cut | ppo.Critic, compute_gae, ppo_value_loss |
| PRIME            | sigmoid(beta * sum of the PRM/reference log-ratio up to the cut), | prime_implicit_prm.implicit_process_rewards, |
|                  | PRM trained with its CE loss on the other problems' responses    | prm_ce_loss                   |
The ground truth uses vineppo.estimate_values too (with k = n): the same budget rule (a continuation may use
what the prefix left of max_new_tokens) and the same grading.

Choices and departures (shared/docs/ALGORITHMS.md section 7):
- Sizes. The paper: G = 32 responses, n = 20 continuations, T = 0.7, Qwen2.5-1.5B-Instruct, thousands of
  problems. The CPU default: 48 problems, G = 8, n = 16, K = 9, 64 training problems (build time: see README)
  on 2 cores. Everything scales by flags; on a GPU use `--backend vllm`.
- Default task: the project's `arithmetic` (2 terms, SmolLM2-135M right ~10-30% of the time at T = 0.7). We
  measured the 135M model on tasks that need intermediate numbers (3-term chain sums and + - * of one
  digit, reasoning-gym leg counting; 12 problems x 8 samples at T = 0.7): 0-8% right, with 0 of 12
  problems whose correct responses hold 4 new numbers. At this scale the "number" field is nearly empty
  whatever the task; a benchmark whose ground truth is ~0 everywhere would rank nothing, so we keep the
  task the model can do, and report the field counts as they fall.
- The cut: the first response with a space character (the first one, unless it has none) is cut at a
  uniformly random space; the state is the response's tokens that end at or before that space (with
  SmolLM2's tokenizer a space starts a token, so the prefix is exactly the text before the space).
- Numca and Hista see all G responses, the cut response included (its reward too), exactly as they do in
  training: Numca's table holds the whole group, Hista's pool holds the cut response's own prefixes no
  longer than the state. The ground truth comes from fresh continuations, never from those G responses.
- Hista at the cut: the state's representation is built from the cut prefix alone (the EMA is causal; its
  last window is the partial one that ends at the cut), k follows hista.py's linear schedule by the cut's
  position in its response (k_max at token 0, k_min at the end).
- PPO-1: the critic of ppo.py (a copy of the policy plus a linear head) trained as ppo.py trains it, a PPO
  step at a time: old values of a batch of num_prompts x samples responses, GAE targets (gamma 1, lambda 1
  or 0.95), ppo.py's epochs of clipped value loss, `--critic-passes` passes over the training problems.
  The paper trains at lr 3e-6 for one epoch on far more data; we keep ppo.py's lr (1e-5).
- PRIME: the PRM is a copy of the policy trained as prime_implicit_prm.py trains it (one CE pass per
  batch, `--prm-passes` passes over the training problems), the reference is the frozen policy. Its value
  at the cut is sigmoid(beta * the log-ratio summed over the prefix), 0.5 at the empty prefix.
- Fields: "number" when the problem's correct responses, together, hold at least 4 distinct numbers that
  are not in the question; "other" otherwise (problems with no correct response are "other"). The paper
  has five fields; a generated arithmetic task only has these two. Tiers by the G responses' pass rate:
  none right, below half, half or more, all right.

Run:  python sveb_eval.py                                  # CPU, offline: build, then evaluate
      python sveb_eval.py --stage eval --bench-file runs/sveb/bench.jsonl
      python sveb_eval.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset math --backend vllm \\
          --num-problems 500 --group-size 32 --num-truth 20 --max-new-tokens 2048   # the paper's scale, one GPU
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm

import hista
import numca
import ppo
import prime_implicit_prm as prime
import vineppo
from common.data import DEFAULT_DATASET, DataError, load_problems, prompt_ids
from common.generation import make_generator
from common.models import DEFAULT_MODEL, ModelLoadError, default_device, load_model, load_tokenizer, resolve_model_path

ESTIMATORS = ("GRPO", "MC@1", "MC@2", "MC@K", "Numca", "Hista", "PPO-1/lam1", "PPO-1/lam0.95", "PRIME")
FIELDS = ("number", "other")
TIERS = ("none right", "below half", "half or more", "all right")
# The paper's MAE (Qwen2.5-1.5B-Instruct, G = 32, n = 20) on its number and math fields, for the same estimators.
# Its PPO figure is PPO-N (trained on 80% of the same problems); ours is PPO-1 (other problems only).
PAPER_MAE = {"GRPO": (0.175, 0.208), "Numca": (0.132, 0.194), "Hista": (0.142, 0.145),
             "PPO-1/lam1": (0.159, 0.187), "PPO-1/lam0.95": (0.159, 0.187),
             "MC@1": (0.223, 0.235), "MC@2": (0.133, 0.160)}


@dataclass
class Args:
    stage: Literal["all", "build", "eval"] = "all"
    """build the benchmark file, evaluate the estimators on it, or both"""
    model: str = DEFAULT_MODEL
    """hub name or local folder of an instruct model (eval reads the build's model from the file)"""
    dataset: str = DEFAULT_DATASET
    """arithmetic, gsm8k, math, rg:<task>[:k=v,...], or a .jsonl/.parquet file; benchmark problems come from its
    test split, the critic's and PRM's training problems from its train split"""
    backend: Literal["hf", "vllm"] = "hf"
    """generation backend for the build: hf (transformers, CPU or GPU) or vllm (one GPU)"""
    seed: int = 1
    """seed of the problems' order, the sampling, the cuts and the estimators' training"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: bool = True
    """bfloat16 autocast for the forwards and backwards of the eval stage"""
    output_dir: str = "runs/sveb"
    """where the benchmark file (by default) and the results go"""
    bench_file: str | None = None
    """the benchmark file (default: {output_dir}/bench.jsonl); build appends to it, eval reads it"""

    # ---- build ----
    num_problems: int = 48
    """N: benchmark problems (test split)"""
    group_size: int = 8
    """G: responses per problem (the paper: 32)"""
    num_truth: int = 16
    """n: continuations from the state for the ground truth (the paper: 20)"""
    mc_k: int = vineppo.Args.num_mc_rollouts
    """K of the MC@K estimator (VinePPO's default)"""
    num_train_problems: int = 64
    """problems of the train split whose G responses train PPO's critic and PRIME's PRM (64 x 8 = 16 PPO steps
    of 32 responses, close to the 20 steps of `python ppo.py`)"""
    temperature: float = 0.7
    """sampling temperature of responses and continuations (the paper's 0.7)"""
    top_p: float = 1.0
    """nucleus sampling"""
    max_new_tokens: int | None = None
    """response length limit (None: 128 for generated tasks, 512 for gsm8k, math and files)"""
    chunk_size: int = 8
    """problems per generation call, and per piece written to the file (the unit of resuming)"""
    gen_batch_size: int = 64
    """sequences per generate call of the hf backend"""
    vllm_gpu_memory_utilization: float = 0.6
    """share of GPU memory vLLM may take during the build"""

    # ---- eval ----
    estimators: tuple[str, ...] = ESTIMATORS
    """which estimators to run (the model-free ones take seconds; Hista, PPO-1 and PRIME load models)"""
    number_min_count: int = 4
    """a problem is in the number field when its correct responses hold this many new numbers"""
    min_gap: int = numca.Args.min_gap
    """Numca: milestones closer than this many characters are merged"""
    interval: int = hista.Args.interval
    """Hista: candidate prefixes every this many response tokens (and the end)"""
    ema_alpha: float = hista.Args.ema_alpha
    """Hista: EMA smoothing of the hidden states"""
    window: int = hista.Args.window
    """Hista: tokens per averaged window"""
    k_max: int = hista.Args.k_max
    """Hista: neighbours at the start of a response"""
    k_min: int = hista.Args.k_min
    """Hista: neighbours at its end"""
    d_min: float = hista.Args.d_min
    """Hista: distance floor"""
    critic_learning_rate: float = ppo.Args.critic_learning_rate
    """PPO-1: critic learning rate (ppo.py's; the paper: 3e-6)"""
    critic_passes: int = 1
    """PPO-1: passes over the training problems (each a sequence of PPO-style steps)"""
    value_clip: float = ppo.Args.value_clip
    """PPO-1: value clipping of ppo_value_loss"""
    steps_batch: int = ppo.Args.num_prompts * ppo.Args.samples_per_prompt
    """PPO-1 and PRIME: responses per training step (ppo.py's batch)"""
    critic_epochs: int = ppo.Args.num_epochs
    """PPO-1: epochs over each step's batch (ppo.py's)"""
    beta: float = prime.Args.beta
    """PRIME: implicit reward scale"""
    prm_learning_rate: float = prime.Args.prm_learning_rate
    """PRIME: PRM learning rate"""
    prm_passes: int = 1
    """PRIME: passes over the training problems (one CE pass per step's batch, as in training)"""
    minibatch_size: int = ppo.Args.minibatch_size
    """samples per optimizer step of the critic and the PRM"""
    micro_batch_size: int = ppo.Args.micro_batch_size
    """samples per forward/backward"""


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: the cut, fields and tiers, the error statistics. Each is tested on hand-made examples.
# ---------------------------------------------------------------------------------------------------------
def choose_cut(text: str, rng: random.Random) -> int | None:
    """A uniformly random space character of `text`: its index, or None when there is none."""
    spaces = [i for i, ch in enumerate(text) if ch == " "]
    return rng.choice(spaces) if spaces else None


def tokens_before(char_ends: list[int], char: int) -> int:
    """How many leading tokens end at or before character `char` (char_ends: each token's end in the text)."""
    return sum(1 for end in char_ends if end <= char)


def new_numbers(question: str, text: str) -> set[str]:
    """The distinct numbers of `text` that the question does not contain (numca.py's notion of a number)."""
    asked = {m.group().replace(",", "") for m in numca.NUMBER.finditer(question)}
    return {m.group().replace(",", "") for m in numca.NUMBER.finditer(text)} - asked


def problem_field(question: str, texts: list[str], rewards: list[float], min_count: int = 4) -> str:
    """"number" when the correct responses, together, hold >= min_count distinct numbers not in the question."""
    found: set[str] = set()
    for text, reward in zip(texts, rewards):
        if reward > 0:
            found |= new_numbers(question, text)
    return "number" if len(found) >= min_count else "other"


def pass_tier(pass_rate: float) -> str:
    """Difficulty tier by the share of the G responses that are right."""
    if pass_rate <= 0:
        return TIERS[0]
    if pass_rate >= 1:
        return TIERS[3]
    return TIERS[1] if pass_rate < 0.5 else TIERS[2]


def mae_with_se(estimates: list[float], truths: list[float]) -> tuple[float, float, int]:
    """Mean absolute error, its standard error (std of the absolute errors, ddof 1, / sqrt(count)), count.
    NaN for no pair; SE NaN for a single pair."""
    errors = np.abs(np.asarray(estimates, dtype=float) - np.asarray(truths, dtype=float))
    if len(errors) == 0:
        return float("nan"), float("nan"), 0
    se = float(errors.std(ddof=1) / math.sqrt(len(errors))) if len(errors) > 1 else float("nan")
    return float(errors.mean()), se, len(errors)


def paired_difference(errors_a: list[float], errors_b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same states, and its standard error (ddof 1): is estimator a better than b?
    Far tighter than comparing two MAEs' own standard errors, since both err on the same hard states."""
    d = np.asarray(errors_a, dtype=float) - np.asarray(errors_b, dtype=float)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan")), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def correlation(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() < 1e-12 or y.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# ---------------------------------------------------------------------------------------------------------
# The model-free estimators: GRPO, Numca. (MC@k values come from the build.)
# ---------------------------------------------------------------------------------------------------------
def grpo_value(rewards: list[float]) -> float:
    """GRPO's baseline for every state of every response: the group's mean reward (numca.grpo_advantages
    subtracts exactly this before dividing by the group std)."""
    return float(np.mean(rewards))


def numca_value(texts: list[str], rewards: list[float], cut_response: int, cut_char: int, min_gap: int) -> float:
    """Numca's value of the state that response `cut_response` reaches at character `cut_char`: a table of
    the group's number-sets (each response adds its reward to every state it passes, the empty set
    included), read at the set of numbers whose milestones start before the cut. As in numca.py's training,
    the state of a token is that of the segment it starts in; the token right after the cut starts at
    cut_char, so its segment counts the milestones strictly before it."""
    table = numca.NumcaTable()
    for text, reward in zip(texts, rewards):
        table.update("problem", [frozenset()] + [state for _, state in numca.number_milestones(text, min_gap)], reward)
    before = [state for position, state in numca.number_milestones(texts[cut_response], min_gap) if position < cut_char]
    return table.value("problem", before[-1] if before else frozenset())


# ---------------------------------------------------------------------------------------------------------
# The estimators that need a model: Hista (the policy's hidden states), PPO-1 (a critic), PRIME (a PRM).
# ---------------------------------------------------------------------------------------------------------
def hista_value(hidden: list[torch.Tensor], rewards: list[float], cut_response: int, cut_tokens: int,
                args: Args) -> float:
    """Hista's value of the prefix of `cut_tokens` tokens of response `cut_response`.

    hidden[g]: (T_g, D) last-layer hidden states of response g's tokens. The pool is hista.py's: every
    `interval` tokens and the end of every response, labelled with its reward; of the cut response only
    prefixes no longer than the state. The state is represented from its own tokens (the EMA is causal, the
    last window ends at the cut), appended to the distance computation as one more sequence.
    """
    if cut_tokens == 0:
        return float(np.mean(rewards))  # the first state is the group mean, as in training
    reps = [hista.window_means(hista.ema_smooth(h.float(), args.ema_alpha), args.window) for h in hidden]
    query = hista.window_means(hista.ema_smooth(hidden[cut_response][:cut_tokens].float(), args.ema_alpha),
                               args.window)
    D = hista.prefix_distances(reps + [query])  # (G + 1, G + 1, L, L)
    cand_g, cand_w = hista.candidate_prefixes([h.shape[0] for h in hidden], args.interval, args.window)
    w = query.shape[0]
    dist = D[len(hidden), cand_g, w - 1, cand_w - 1]  # (num candidates,) from the state to each candidate
    dist = torch.where((cand_g == cut_response) & (cand_w > w), torch.full_like(dist, float("inf")), dist)
    k = hista.linear_k(cut_tokens, hidden[cut_response].shape[0] + 1, args.k_max, args.k_min)
    return hista.knn_value(dist, torch.tensor(rewards)[cand_g], k, args.d_min)


def training_steps(rows: list[dict], size: int, seed: int) -> list[list[dict]]:
    """The training responses (one dict per response, with prompt ids) shuffled and cut into steps of `size`."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def train_critic(critic: ppo.Critic, rows: list[dict], lam: float, args: Args, pad_id: int, autocast) -> dict:
    """Train ppo.py's critic as ppo.py does, one PPO step per `steps_batch` responses: old values, GAE
    returns (gamma 1, lambda `lam`), `critic_epochs` epochs of clipped value loss in minibatches."""
    opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5)
    losses = []
    steps = [s for p in range(args.critic_passes) for s in training_steps(rows, args.steps_batch, args.seed + p)]
    for step_rows in tqdm(steps, desc=f"critic lambda={lam:g}", dynamic_ncols=True, leave=False):
        batch = ppo.make_batch([r["prompt_ids"] for r in step_rows], [r["token_ids"] for r in step_rows], pad_id)
        mask = batch.response_mask
        scores = torch.tensor([r["reward"] for r in step_rows])
        rewards = ppo.place_rewards(scores, mask.sum(1).long(), mask.shape[1])
        with torch.no_grad(), autocast():
            critic.eval()
            old_values = ppo.in_micro_batches(lambda b: ppo.critic_values(critic, b), batch,
                                              args.micro_batch_size) * mask
        _, returns = ppo.compute_gae(rewards, old_values, mask, 1.0, lam)
        critic.train()
        for _ in range(args.critic_epochs):
            for mb in torch.randperm(len(step_rows)).split(args.minibatch_size):
                mb_tokens = mask[mb].sum()
                for micro in mb.split(args.micro_batch_size):
                    sub = batch.rows(micro)
                    m = sub.response_mask
                    with autocast():
                        values = ppo.critic_values(critic, sub)
                        loss = ppo.ppo_value_loss(values, old_values[micro, : m.shape[1]],
                                                  returns[micro, : m.shape[1]], m, args.value_clip)
                    (loss * m.sum() / mb_tokens).backward()
                    losses.append(float(loss.detach()))
                torch.nn.utils.clip_grad_norm_(critic.parameters(), ppo.Args.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {"final_value_loss": float(np.mean(losses[-8:])) if losses else float("nan")}


def critic_state_values(critic: ppo.Critic, states: list[dict], args: Args, pad_id: int, autocast) -> list[float]:
    """V(state) = the critic's value read where ppo.py reads it for the token right after the cut."""
    batch = ppo.make_batch([s["prompt_ids"] for s in states], [s["token_ids"] for s in states], pad_id)
    with torch.no_grad(), autocast():
        critic.eval()
        values = ppo.in_micro_batches(lambda b: ppo.critic_values(critic, b), batch, args.micro_batch_size)
    return [float(values[i, s["cut_tokens"]]) for i, s in enumerate(states)]


def train_prm(prm, reference, rows: list[dict], args: Args, temperature: float, pad_id: int, autocast) -> dict:
    """Train PRIME's implicit PRM as prime_implicit_prm.py does: per step's batch, reference log-probs, then
    one pass of prm_ce_loss in minibatches. Returns the PRM accuracy on each batch before its update."""
    opt = torch.optim.AdamW(prm.parameters(), lr=args.prm_learning_rate, eps=1e-5)
    accuracies, losses = [], []
    steps = [s for p in range(args.prm_passes) for s in training_steps(rows, args.steps_batch, args.seed + p)]
    for step_rows in tqdm(steps, desc="PRIME's PRM", dynamic_ncols=True, leave=False):
        batch = prime.make_batch([r["prompt_ids"] for r in step_rows], [r["token_ids"] for r in step_rows], pad_id)
        mask = batch.response_mask
        labels = torch.tensor([r["reward"] for r in step_rows])
        with torch.no_grad(), autocast():
            prm.eval()
            ref_lp = prime.in_micro_batches(lambda b: prime.response_logprobs(reference, b, temperature), batch,
                                            args.micro_batch_size) * mask
            prm_lp = prime.in_micro_batches(lambda b: prime.response_logprobs(prm, b, temperature), batch,
                                            args.micro_batch_size) * mask
        logits = prime.implicit_process_rewards(prm_lp, ref_lp, mask, args.beta).sum(1)
        accuracies.append(float(((logits > 0).float() == labels).float().mean()))
        prm.train()
        for mb in torch.randperm(len(step_rows)).split(args.minibatch_size):
            for micro in mb.split(args.micro_batch_size):
                sub = batch.rows(micro)
                m = sub.response_mask
                with autocast():
                    lp = prime.response_logprobs(prm, sub, temperature)
                    loss = prime.prm_ce_loss(lp, ref_lp[micro, : m.shape[1]], m, labels[micro], args.beta)
                (loss * len(micro) / len(mb)).backward()
                losses.append(float(loss.detach()))
            torch.nn.utils.clip_grad_norm_(prm.parameters(), prime.Args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"prm_accuracy_per_step": accuracies, "final_prm_loss": float(np.mean(losses[-8:])) if losses else float("nan")}


def prm_state_values(prm, reference, states: list[dict], args: Args, temperature: float, pad_id: int,
                     autocast) -> list[float]:
    """PRIME's implicit PRM read as a value: sigmoid(beta * sum of log pi_prm - log pi_ref over the prefix)."""
    batch = prime.make_batch([s["prompt_ids"] for s in states], [s["token_ids"] for s in states], pad_id)
    prefix = torch.zeros_like(batch.response_mask)
    for i, s in enumerate(states):
        prefix[i, : s["cut_tokens"]] = 1
    with torch.no_grad(), autocast():
        prm.eval()
        prm_lp = prime.in_micro_batches(lambda b: prime.response_logprobs(prm, b, temperature), batch,
                                        args.micro_batch_size)
        ref_lp = prime.in_micro_batches(lambda b: prime.response_logprobs(reference, b, temperature), batch,
                                        args.micro_batch_size)
    rewards = prime.implicit_process_rewards(prm_lp, ref_lp, prefix, args.beta)
    return torch.sigmoid(rewards.sum(1)).tolist()


# ---------------------------------------------------------------------------------------------------------
# Build: responses, cuts, continuations -> the benchmark file, a chunk of problems at a time.
# ---------------------------------------------------------------------------------------------------------
def build_config(args: Args) -> dict:
    """What the file's contents depend on; a resumed build must match it."""
    return {"model": args.model, "dataset": args.dataset, "seed": args.seed, "group_size": args.group_size,
            "num_truth": args.num_truth, "mc_k": args.mc_k, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "chunk_size": args.chunk_size}


def read_bench(path: str) -> tuple[dict | None, list[dict]]:
    """(header, records) of a benchmark file. A last line cut short by an interruption is dropped from the
    file, so that appending continues from the last complete chunk."""
    if not os.path.exists(path):
        return None, []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "wb") as f:
            f.write(complete)
    lines = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
    if not lines:
        return None, []  # interrupted before its first line was written
    if lines[0].get("kind") != "header":
        raise DataError(f"{path} is not an SVEB benchmark file (no header line); choose another --bench-file")
    return lines[0]["config"], lines[1:]


def build(args: Args) -> str:
    """Write (or complete) the benchmark file and return its path."""
    path = args.bench_file
    config = build_config(args)
    header, records = read_bench(path)
    if header is not None and header != config:
        diff = ", ".join(f"{k}: file {header.get(k)!r} vs now {v!r}" for k, v in config.items() if header.get(k) != v)
        raise SystemExit(f"error: {path} was built with other settings ({diff}); pass the same flags to resume, "
                         "or a new --bench-file")
    bench_problems = load_problems(args.dataset, "test", size=args.num_problems, seed=args.seed)
    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    todo = []
    for kind, problems in (("bench", bench_problems), ("train", train_problems)):
        done = {r["index"]: r["question"] for r in records if r["kind"] == kind}
        for i, p in enumerate(problems):
            if i in done and done[i] != p.question:
                raise SystemExit(f"error: {path} holds other {kind} problems than --dataset {args.dataset} gives now; "
                                 "use a new --bench-file")
            if i not in done:
                todo.append((kind, i, p))
    if not todo:
        print(f"{path}: all {len(bench_problems)} benchmark and {len(train_problems)} training problems are built")
        return path
    if len(bench_problems) < args.num_problems:
        print(f"note: the test split has only {len(bench_problems)} problems")

    tokenizer = load_tokenizer(args.model)
    device = default_device() if args.device == "auto" else args.device
    policy = load_model(args.model, device=device)
    generator = make_generator(args.backend, policy, tokenizer, resolve_model_path(args.model),
                               batch_size=args.gen_batch_size, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                               seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as out:
        if header is None:
            out.write(json.dumps({"kind": "header", "config": config}) + "\n")
        progress = tqdm(total=len(todo), desc="sveb build", unit="problem", dynamic_ncols=True)
        for start in range(0, len(todo), args.chunk_size):
            chunk = todo[start : start + args.chunk_size]
            out.write("".join(json.dumps(record) + "\n" for record in build_chunk(chunk, generator, tokenizer, args)))
            out.flush()
            os.fsync(out.fileno())  # a chunk on disk is a chunk never redone
            progress.update(len(chunk))
        progress.close()
    return path


def build_chunk(chunk: list[tuple], generator, tokenizer, args: Args) -> list[dict]:
    """Records for a chunk of (kind, index, problem): G graded responses each; for benchmark problems also
    the cut and the continuation values (ground truth with n, MC with 1, 2 and K). Seeded by the chunk's
    first problem, so a resumed build samples what an uninterrupted one would have."""
    kind0, index0, _ = chunk[0]
    base = args.seed * 1_000_003 + index0 * 10 + (5 if kind0 == "train" else 0)
    prompts = [prompt_ids(tokenizer, p.question) for _, _, p in chunk]
    outs = generator.generate(prompts, n=args.group_size, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=base)
    records, states = [], []
    for (kind, index, p), prompt, completions in zip(chunk, prompts, outs):
        rewards = vineppo.outcome_rewards([c.text for c in completions], [c.finished for c in completions],
                                          [p.answer] * len(completions))
        record = {"kind": kind, "index": index, "question": p.question, "answer": p.answer, "prompt_ids": prompt,
                  "responses": [{"token_ids": c.token_ids, "text": c.text, "finished": c.finished, "reward": r}
                                for c, r in zip(completions, rewards)]}
        if kind == "bench":
            rng = random.Random(args.seed * 1_000_003 + index)
            cut_response, space = 0, None
            for g, c in enumerate(completions):  # the first response, unless it has no space at all
                space = choose_cut(c.text, rng)
                if space is not None:
                    cut_response = g
                    break
            tokens = completions[cut_response].token_ids
            char_ends = vineppo.token_char_ends(tokenizer, tokens)
            cut_tokens = tokens_before(char_ends, space) if space is not None else 0
            record |= {"cut_response": cut_response, "cut_space": space, "cut_tokens": cut_tokens,
                       "cut_char": char_ends[cut_tokens - 1] if cut_tokens else 0,
                       "cut_text": tokenizer.decode(tokens[:cut_tokens], skip_special_tokens=True)}
            states.append((record, prompt, tokens))
        records.append(record)
    if states:
        # Continuations from each state: vineppo.estimate_values, one batched call per estimate.
        for name, k, offset in (("truth", args.num_truth, 1), ("mc1", 1, 2), ("mc2", 2, 3), ("mck", args.mc_k, 4)):
            values, _ = vineppo.estimate_values(
                generator, tokenizer, [s[1] for s in states], [s[2] for s in states],
                [[s[0]["cut_tokens"]] for s in states], [s[0]["answer"] for s in states], k, args.max_new_tokens,
                args.temperature, args.top_p, seed=base + offset)
            for (record, _, _), v in zip(states, values):
                record[name] = v[0]
    return records


# ---------------------------------------------------------------------------------------------------------
# Eval: every estimator on every state; tables, chart, JSON.
# ---------------------------------------------------------------------------------------------------------
def evaluate_estimators(args: Args, config: dict, bench: list[dict],
                        train: list[dict]) -> tuple[dict[str, list[float]], dict]:
    """({estimator: [value of each benchmark state]} for the estimators in args.estimators, and what their
    training reported: the critics' final value losses, the PRM's accuracy per step)."""
    wanted = set(args.estimators)
    estimates: dict[str, list[float]] = {}
    training: dict = {}
    texts = lambda r: [x["text"] for x in r["responses"]]  # noqa: E731
    rewards = lambda r: [x["reward"] for x in r["responses"]]  # noqa: E731
    if "GRPO" in wanted:
        estimates["GRPO"] = [grpo_value(rewards(r)) for r in bench]
    for name, key in (("MC@1", "mc1"), ("MC@2", "mc2"), ("MC@K", "mck")):
        if name in wanted:
            estimates[name] = [r[key] for r in bench]
    if "Numca" in wanted:
        estimates["Numca"] = [numca_value(texts(r), rewards(r), r["cut_response"], r["cut_char"], args.min_gap)
                              for r in bench]
    needs_model = wanted & {"Hista", "PPO-1/lam1", "PPO-1/lam0.95", "PRIME"}
    if not needs_model:
        return estimates, training

    device = default_device() if args.device == "auto" else args.device
    autocast = (lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)) if args.bf16 \
        else contextlib.nullcontext
    tokenizer = load_tokenizer(config["model"])
    pad_id = tokenizer.pad_token_id
    policy = load_model(config["model"], device=device).eval().requires_grad_(False)
    states = [{"prompt_ids": r["prompt_ids"], "token_ids": r["responses"][r["cut_response"]]["token_ids"],
               "cut_tokens": r["cut_tokens"]} for r in bench]
    train_rows = [{"prompt_ids": r["prompt_ids"], "token_ids": x["token_ids"], "reward": x["reward"]}
                  for r in train for x in r["responses"]]
    if "Hista" in wanted:
        t0 = time.time()
        values = []
        for r in tqdm(bench, desc="hista", dynamic_ncols=True, leave=False):
            responses = [x["token_ids"] for x in r["responses"]]
            batch = hista.make_batch([r["prompt_ids"]] * len(responses), responses, pad_id)
            with torch.no_grad(), autocast():  # hidden states from the pass that computes the old log-probs
                _, hidden = hista.in_micro_batches(
                    lambda b: hista.response_logprobs(policy, b, config["temperature"], with_hidden=True), batch,
                    args.micro_batch_size)
            hidden = [hidden[g, : len(x)] for g, x in enumerate(responses)]
            values.append(hista_value(hidden, rewards(r), r["cut_response"], r["cut_tokens"], args))
        estimates["Hista"] = values
        print(f"hista: {time.time() - t0:.0f} s")
    for lam in (1.0, 0.95):
        name = f"PPO-1/lam{lam:g}"
        if name not in wanted:
            continue
        t0 = time.time()
        torch.manual_seed(args.seed)
        critic = ppo.Critic(load_model(config["model"], device=device).get_decoder(),
                            policy.config.hidden_size).to(device)
        info = train_critic(critic, train_rows, lam, args, pad_id, autocast)
        estimates[name] = critic_state_values(critic, states, args, pad_id, autocast)
        training[name] = info
        print(f"{name}: trained on {len(train_rows)} responses in {time.time() - t0:.0f} s, "
              f"final value loss {info['final_value_loss']:.4f}")
        del critic
    if "PRIME" in wanted:
        t0 = time.time()
        torch.manual_seed(args.seed)
        prm = load_model(config["model"], device=device)
        info = train_prm(prm, policy, train_rows, args, config["temperature"], pad_id, autocast)
        estimates["PRIME"] = prm_state_values(prm, policy, states, args, config["temperature"], pad_id, autocast)
        acc = info["prm_accuracy_per_step"]
        print(f"PRIME: PRM trained on {len(train_rows)} responses in {time.time() - t0:.0f} s; accuracy before each "
              f"step's update: {' '.join(f'{a:.2f}' for a in acc)}")
        training["PRIME"] = info
        del prm
    return estimates, training


def fmt(mae: float, se: float) -> str:
    if math.isnan(mae):
        return "-"
    return f"{mae:.3f} ± {se:.3f}" if not math.isnan(se) else f"{mae:.3f}"


def summarise(bench: list[dict], estimates: dict[str, list[float]], args: Args) -> dict:
    """MAE and SE per estimator, per field and per tier; the critic-collapse check."""
    truth = [r["truth"] for r in bench]
    fields = [problem_field(r["question"], [x["text"] for x in r["responses"]], [x["reward"] for x in r["responses"]],
                            args.number_min_count) for r in bench]
    tiers = [pass_tier(float(np.mean([x["reward"] for x in r["responses"]]))) for r in bench]
    names = [n for n in ESTIMATORS if n in estimates]
    results = {"num_problems": len(bench), "fields": {f: fields.count(f) for f in FIELDS},
               "tiers": {t: tiers.count(t) for t in TIERS}, "mae": {}, "mae_by_tier": {}}
    for name in names:
        est = estimates[name]
        results["mae"][name] = {"all": mae_with_se(est, truth)}
        for f in FIELDS:
            idx = [i for i, x in enumerate(fields) if x == f]
            results["mae"][name][f] = mae_with_se([est[i] for i in idx], [truth[i] for i in idx])
        results["mae_by_tier"][name] = {}
        for t in TIERS:
            idx = [i for i, x in enumerate(tiers) if x == t]
            results["mae_by_tier"][name][t] = mae_with_se([est[i] for i in idx], [truth[i] for i in idx])
    if "GRPO" in estimates:  # each estimator's error minus the group mean's, state by state
        grpo_err = np.abs(np.asarray(estimates["GRPO"]) - np.asarray(truth))
        results["minus_grpo"] = {name: paired_difference(np.abs(np.asarray(estimates[name]) - np.asarray(truth)),
                                                         grpo_err) for name in names}
    # The noise floor: even a perfect estimator differs from an n-sample ground truth by about this much.
    results["truth_sampling_se"] = float(np.mean([math.sqrt(v * (1 - v) / max(1, args.num_truth)) for v in truth]))
    group_mean = [grpo_value([x["reward"] for x in r["responses"]]) for r in bench]
    results["critic_collapse"] = {}
    for name in names:
        if name.startswith("PPO-1"):
            diff = np.asarray(estimates[name]) - np.asarray(group_mean)
            results["critic_collapse"][name] = {
                "corr_with_group_mean": correlation(estimates[name], group_mean),
                "corr_with_truth": correlation(estimates[name], truth),
                "std_of_critic_minus_group_mean": float(diff.std()),
                "mean_of_critic_minus_group_mean": float(diff.mean()),
                "std_of_critic": float(np.std(estimates[name])), "std_of_group_mean": float(np.std(group_mean)),
            }
    results["per_problem"] = [{"index": r["index"], "field": f, "tier": t, "truth": r["truth"],
                               **{name: estimates[name][i] for name in names}}
                              for i, (r, f, t) in enumerate(zip(bench, fields, tiers))]
    return results


def markdown_tables(results: dict, config: dict) -> str:
    f, t = results["fields"], results["tiers"]
    k = config["mc_k"]
    lines = [f"SVEB: MAE against MC@{config['num_truth']} ground truth (± standard error), {results['num_problems']} "
             f"states, {config['model']}, {config['dataset']}, G = {config['group_size']}, T = {config['temperature']}",
             "", f"| estimator | number (n={f['number']}) | other (n={f['other']}) | all (n={results['num_problems']}) "
             "| all minus GRPO (paired) | paper: number / math |", "|---|---|---|---|---|---|"]
    for name, m in results["mae"].items():
        paper = PAPER_MAE.get(name)
        label = name.replace("MC@K", f"MC@{k} (VinePPO)")
        d, d_se = results.get("minus_grpo", {}).get(name, (float("nan"), float("nan")))
        paired = "-" if math.isnan(d) or name == "GRPO" else f"{d:+.3f} ± {d_se:.3f}"
        lines.append(f"| {label} | {fmt(*m['number'][:2])} | {fmt(*m['other'][:2])} | {fmt(*m['all'][:2])} | "
                     f"{paired} | " + (f"{paper[0]:.3f} / {paper[1]:.3f} |" if paper else "- |"))
    lines += ["", "By difficulty tier (pass rate of the G responses):", "",
              "| estimator | " + " | ".join(f"{x} (n={t[x]})" for x in TIERS) + " |", "|---" * (len(TIERS) + 1) + "|"]
    for name, m in results["mae_by_tier"].items():
        lines.append(f"| {name.replace('MC@K', f'MC@{k}')} | " + " | ".join(fmt(*m[x][:2]) for x in TIERS) + " |")
    lines += ["", f"Sampling noise of the ground truth itself: mean sqrt(v(1-v)/n) = {results['truth_sampling_se']:.3f}."]
    for name, c in results["critic_collapse"].items():
        lines.append(f"Critic collapse, {name}: corr(critic, group mean) = {c['corr_with_group_mean']:.2f}, "
                     f"corr(critic, truth) = {c['corr_with_truth']:.2f}, std(critic - group mean) = "
                     f"{c['std_of_critic_minus_group_mean']:.3f} (std of the critic {c['std_of_critic']:.3f}, "
                     f"of the group mean {c['std_of_group_mean']:.3f}).")
    lines.append("Paper: Qwen2.5-1.5B-Instruct, G = 32, n = 20; its PPO row is PPO-N (trained on the same problems).")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: str) -> None:
    """MAE ± SE per estimator, one bar per field (and all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["mae"])
    groups = [g for g in FIELDS if results["mae"][names[0]][g][2]]
    groups += ["all"] if len(groups) > 1 else []  # "all" would repeat the only non-empty field
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    width = 0.8 / len(groups)
    for j, g in enumerate(groups):
        ys = [results["mae"][n][g][0] for n in names]
        es = [0 if math.isnan(results["mae"][n][g][1]) else results["mae"][n][g][1] for n in names]
        ax.bar(np.arange(len(names)) + (j - (len(groups) - 1) / 2) * width, ys, width, yerr=es, capsize=2,
               label=f"{g} (n={results['mae'][names[0]][g][2]})")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("MAE vs Monte Carlo ground truth")
    ax.set_title("SVEB: state value estimation error (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(args: Args) -> dict:
    config, records = read_bench(args.bench_file)
    if config is None:
        raise SystemExit(f"error: {args.bench_file} does not exist; run the build stage first (--stage build)")
    bench = sorted((r for r in records if r["kind"] == "bench"), key=lambda r: r["index"])
    train = [r for r in records if r["kind"] == "train"]
    if not bench:
        raise SystemExit(f"error: {args.bench_file} holds no benchmark problem yet; run --stage build")
    if not train and set(args.estimators) & {"PPO-1/lam1", "PPO-1/lam0.95", "PRIME"}:
        raise SystemExit("error: the file has no training problems for PPO-1 and PRIME; build with "
                         "--num-train-problems > 0 or leave those out of --estimators")
    t0 = time.time()
    estimates, training = evaluate_estimators(args, config, bench, train)
    results = summarise(bench, estimates, args)
    results["training"] = training
    results["config"] = config
    results["eval_seconds"] = time.time() - t0
    os.makedirs(args.output_dir, exist_ok=True)
    table = markdown_tables(results, config)
    print(table)
    with open(os.path.join(args.output_dir, "sveb_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "sveb_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    bar_chart(results, os.path.join(args.output_dir, "sveb_mae.png"))
    print(f"wrote sveb_table.md, sveb_results.json and sveb_mae.png to {args.output_dir}")
    return results


def check_args(args: Args) -> None:
    if args.bench_file is None:
        args.bench_file = os.path.join(args.output_dir, "bench.jsonl")
    if args.max_new_tokens is None:
        generated = not (args.dataset in ("gsm8k", "math") or args.dataset.endswith((".jsonl", ".json", ".parquet")))
        args.max_new_tokens = 128 if generated else 512
    for name in ("num_problems", "group_size", "num_truth", "mc_k", "chunk_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.num_train_problems < 0:
        raise SystemExit("error: --num-train-problems must be >= 0")
    if args.temperature <= 0:
        raise SystemExit("error: --temperature must be > 0 (the states' values are those of the sampling policy)")
    unknown = set(args.estimators) - set(ESTIMATORS)
    if unknown:
        raise SystemExit(f"error: unknown estimator(s) {sorted(unknown)}; choose from {list(ESTIMATORS)}")
    trained = {"PPO-1/lam1", "PPO-1/lam0.95", "PRIME"} & set(args.estimators)
    if args.stage == "all" and args.num_train_problems == 0 and trained:
        raise SystemExit(f"error: {sorted(trained)} need training problems: --num-train-problems > 0, or leave them "
                         "out of --estimators")
    if args.minibatch_size % args.micro_batch_size:
        raise SystemExit(f"error: --micro-batch-size {args.micro_batch_size} must divide --minibatch-size "
                         f"{args.minibatch_size}")


def main(args: Args) -> None:
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.stage in ("all", "build"):
        t0 = time.time()
        build(args)
        print(f"build: {time.time() - t0:.0f} s -> {args.bench_file}")
    if args.stage in ("all", "eval"):
        evaluate(args)


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:
        main(cli_args)
    except (ModelLoadError, DataError) as e:
        sys.exit(f"error: {e}")
