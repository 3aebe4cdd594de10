"""SVEB, the State Value Estimation Benchmark (Chen et al., "Hista and Numca", arXiv 2605.29782).

How far each value estimator of this repository is from Monte Carlo ground truth, on the same states. A state
is a response cut at a random space; its ground truth is the mean reward of n fresh continuations from it.
Reported: MAE and its standard error per field and per pass-rate tier, the paired difference against the group
mean, and the critic-collapse check. Two stages: build (pre-samples, G responses, the cut, continuations: one
resumable JSONL file) and eval (every estimator: sveb_table.md, sveb_mae.png, sveb_results.json). Estimators,
each imported from the script that trains with it:
  GRPO           the group mean of the G responses
  MCS@1, 2, K    the mean of k of the ground truth's own continuations (K = 9, VinePPO's)
  Numca          numca.py's table of the G responses' number-sets, read at the cut
  Hista          hista.py's kNN over the G responses' hidden-state prefixes, at the cut
  PPO-1          the paper's critic (lambda 1 and 0.95), trained on other problems
  PRIME          sigmoid(beta * the PRM/reference log-ratio summed to the cut)

Departures from the official code (docs/sveb_eval.md gives the reasons):
- CPU-scale defaults: SmolLM2-135M, 56 candidates, G = 8, n = 16, 32 training problems (paper: G 32, n 20)
- critic training: warm-up from lr/w, MSE over the whole batch, held-out loss every step, round(20%) held out
- PPO-1 only (the paper's PPO row is PPO-N)
- default task arithmetic; two fields, "number" and "other"
- the number field is judged from the G fresh responses, against the question's numbers only
- Hista is read at the cut itself; official: at the last candidate prefix before the cut
- a response with no space is skipped for the next one; official: cut at its end
- continuations get what the prefix left of --max-new-tokens; official: the full length each
- Numca is read from the table directly; official: summed from lambda-0 segment advantages
- frozen policy float32 under bf16 autocast, as the critic and the PRM (official: bf16 weights)
- extensions: MCS@K and the PRIME row; --population all, --no-train-filters

Docs: docs/sveb_eval.md

Run:  python sveb_eval.py                                  # CPU, offline: build, then evaluate (runs/sveb/)
      python sveb_eval.py --stage eval --bench-file runs/sveb/bench.jsonl
      python sveb_eval.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset math --backend vllm \\
          --num-problems 1000 --num-train-problems 1000 --group-size 32 --num-truth 20   # one GPU
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
import torch.nn as nn
import tyro
from tqdm import tqdm

import hista
import numca
import ppo
import prime_implicit_prm as prime
import vineppo
from common.args import check_device, check_ranges
from common.data import DEFAULT_DATASET, DataError, default_max_new_tokens, load_problems, prompt_ids
from common.generation import make_generator
from common.models import DEFAULT_MODEL, ModelLoadError, default_device, load_model, load_tokenizer, resolve_model_path

ESTIMATORS = ("GRPO", "MCS@1", "MCS@2", "MCS@K", "Numca", "Hista", "PPO-1/lam1", "PPO-1/lam0.95", "PRIME")
TRAINED = ("PPO-1/lam1", "PPO-1/lam0.95", "PRIME")
FIELDS = ("number", "other")
TIERS = ("0717", "1737", "3777")  # the paper's names: pass rate in (0.07, 0.17], (0.17, 0.37], (0.37, 0.77]
TIER_LABELS = {"0717": "(0.07, 0.17]", "1737": "(0.17, 0.37]", "3777": "(0.37, 0.77]", "outside": "outside"}
CRITIC_PASS_RANGE = (0.0, 0.77)  # PPO-1's training problems: pass rate in (0, 0.77] (process_critic_sft_data.py)
BUILD_FORMAT = 2  # bumped when the file's records change meaning; a file of another format is refused
# The paper's MAE (Qwen2.5-1.5B-Instruct, G = 32, n = 20) on its number and math fields, for the same estimators.
# Its PPO figure is PPO-N (trained on 80% of the same problems); ours is PPO-1 (other problems only).
PAPER_MAE = {"GRPO": (0.175, 0.208), "Numca": (0.132, 0.194), "Hista": (0.142, 0.145),
             "PPO-1/lam1": (0.159, 0.187), "PPO-1/lam0.95": (0.159, 0.187),
             "MCS@1": (0.223, 0.235), "MCS@2": (0.133, 0.160)}


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
    """generation backend for the build: hf (transformers, CPU or GPU) or vllm (one GPU, or vLLM's CPU build)"""
    seed: int = 1
    """seed of the problems' order, the sampling, the cuts and the estimators' training"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: bool = True
    """bfloat16 autocast for the forwards and backwards of the eval stage"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward pass of the critic and the PRM (far less memory, ~30% more
    compute); auto: on for CUDA only"""
    output_dir: str = "runs/sveb"
    """where the benchmark file (by default) and the results go"""
    bench_file: str | None = None
    """the benchmark file (default: {output_dir}/bench.jsonl); build appends to it, eval reads it"""

    # ---- build ----
    num_problems: int = 56
    """candidate benchmark problems (test split), each pre-sampled; those with pass rate in (0.07, 0.77] are the
    benchmark (about half of them with the default model and task)"""
    num_presamples: int = 20
    """responses per problem that measure its pass rate, for the benchmark's population and tiers and for the
    training problems' filters (the paper's 20); the training problems' are also what PPO-1 and PRIME train on"""
    population: Literal["paper", "all"] = "paper"
    """paper: build only the problems whose pass rate is in (0.07, 0.77]; all: every candidate (for a model
    that solves nothing, or to compare with the unfiltered population)"""
    group_size: int = 8
    """G: fresh responses per benchmark problem (the paper: 32)"""
    num_truth: int = 16
    """n: continuations from the state for the ground truth (the paper: 20)"""
    num_train_problems: int = 32
    """candidate training problems (train split), each pre-sampled num_presamples times; PPO-1's critic trains on
    those with pass rate in (0, 0.77], PRIME's PRM on those in [0.2, 0.8]"""
    temperature: float = 0.7
    """sampling temperature of every response and continuation (the paper's 0.7)"""
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
    vllm_max_model_len: int | None = None
    """vLLM's context length in tokens (None: the model's own limit, at most 4096)"""
    vllm_enforce_eager: bool = False
    """vLLM without torch.compile / CUDA graphs: starts in seconds, generates slower (the tests use it)"""

    # ---- eval ----
    estimators: tuple[str, ...] = ESTIMATORS
    """which estimators to run (the model-free ones take seconds; Hista, PPO-1 and PRIME load models)"""
    mc_k: int = vineppo.Args.num_mc_rollouts
    """K of the MCS@K row (VinePPO's K); at most --num-truth"""
    number_min_count: int = 4
    """a problem is in the number field when its correct responses hold this many new numbers"""
    train_filters: bool = True
    """PPO-1 trains on problems with pass rate in (0, 0.77], PRIME's PRM on [0.2, 0.8]; --no-train-filters: on
    every training problem"""
    micro_batch_size: int = ppo.Args.micro_batch_size
    """samples per forward/backward of the critic, the PRM and Hista's hidden states"""
    min_gap_chars: int = 50
    """Numca: milestones closer than this many CHARACTERS are merged (the official SVEB script; numca.py's
    training merges at 50 tokens)"""
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
    critic_learning_rate: float = 3e-6
    """PPO-1: peak learning rate (the paper's)"""
    critic_batch_size: int = 64
    """PPO-1: responses per optimizer step (the paper's 64)"""
    critic_epochs: int = 1
    """PPO-1: passes over the training responses (the paper: 1)"""
    critic_warmup_ratio: float = 0.05
    """PPO-1: share of the optimizer steps with a linear warm-up (the paper's 5%)"""
    critic_min_lr_ratio: float = 0.1
    """PPO-1: the cosine schedule ends at this share of the peak (the official recipe's min_lr_rate)"""
    critic_eval_every: int = 1
    """PPO-1: held-out loss every this many optimizer steps and after the last; the best checkpoint is kept
    (the official recipe: every 40 steps, of ~750)"""
    critic_heldout: float = 0.2
    """PPO-1: share of the training problems held out for the checkpoint choice (the paper's 80/20)"""
    beta: float = prime.Args.beta
    """PRIME: implicit reward scale"""
    prm_learning_rate: float = prime.Args.prm_learning_rate
    """PRIME: PRM learning rate (prime_implicit_prm.py's; constant, no warm-up, as there)"""
    prm_batch_size: int = prime.Args.num_prompts * prime.Args.samples_per_prompt
    """PRIME: responses per PRM training step (prime_implicit_prm.py's batch)"""
    prm_minibatch_size: int = prime.Args.minibatch_size
    """PRIME: responses per PRM optimizer step (prime_implicit_prm.py's minibatch)"""
    prm_passes: int = 1
    """PRIME: passes over the training responses (one CE pass per batch, as in training)"""


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: the cut, population and tiers, fields, MCS@k, the error statistics. Each is tested on
# hand-made examples.
# ---------------------------------------------------------------------------------------------------------
def choose_cut(text: str, rng: random.Random) -> int | None:
    """A uniformly random space character of `text`: its index, or None when there is none."""
    spaces = [i for i, ch in enumerate(text) if ch == " "]
    return rng.choice(spaces) if spaces else None


def tokens_before(char_ends: list[int], char: int) -> int:
    """How many leading tokens end at or before character `char` (char_ends: each token's end in the text)."""
    return sum(1 for end in char_ends if end <= char)


def pass_tier(pass_rate: float) -> str | None:
    """The paper's difficulty tier of a problem by its pre-sample pass rate: "0717" for (0.07, 0.17], "1737" for
    (0.17, 0.37], "3777" for (0.37, 0.77]; None outside (0.07, 0.77]: not in the benchmark's population."""
    if 0.07 < pass_rate <= 0.17:
        return "0717"
    if 0.17 < pass_rate <= 0.37:
        return "1737"
    if 0.37 < pass_rate <= 0.77:
        return "3777"
    return None


def critic_problem(pass_rate: float) -> bool:
    """Whether a training problem trains PPO-1's critic: pass rate in (0, 0.77] (the official
    filter_by_difficulty, lower bound exclusive, upper inclusive)."""
    return CRITIC_PASS_RANGE[0] < pass_rate <= CRITIC_PASS_RANGE[1]


def heldout_split(num_problems: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) problem indices: a seeded shuffle, then round(share * n) held out, at least one,
    and at least one left to train on (n >= 2)."""
    order = list(range(num_problems))
    random.Random(seed).shuffle(order)
    held = min(num_problems - 1, max(1, round(share * num_problems)))
    return sorted(order[held:]), sorted(order[:held])


def mcs_value(truth_rewards: list[float], k: int, rng: random.Random) -> float:
    """MCS@k: the mean reward of k of the ground truth's own continuations, drawn without replacement (the
    official noise_maes). k = n gives the ground truth itself."""
    picked = rng.sample(range(len(truth_rewards)), min(k, len(truth_rewards)))
    return float(np.mean([truth_rewards[i] for i in picked]))


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
# The model-free estimators: GRPO, Numca. (MCS@k comes from the ground truth's continuations.)
# ---------------------------------------------------------------------------------------------------------
def grpo_value(rewards: list[float]) -> float:
    """GRPO's baseline for every state of every response: the group's mean reward (numca.grpo_advantages
    subtracts exactly this before dividing by the group std)."""
    return float(np.mean(rewards))


def numca_value(texts: list[str], rewards: list[float], cut_response: int, cut_char: int, min_gap: int) -> float:
    """Numca's value of the state that response `cut_response` reaches at character `cut_char`: a table of
    the group's number-sets (each response adds its reward to every state it passes, unmerged, the empty set
    included: numca.number_states), read at the set of numbers whose milestones (merged at `min_gap`
    characters, numca.number_milestones) start before the cut. As in numca.py's training, the state of a
    token is that of the segment it starts in; the token right after the cut starts at cut_char, so its
    segment counts the milestones strictly before it."""
    table = numca.NumcaTable()
    for text, reward in zip(texts, rewards):
        table.update("problem", numca.number_states(text), reward)
    before = [state for position, state in numca.number_milestones(texts[cut_response], min_gap) if position < cut_char]
    return table.value("problem", before[-1] if before else frozenset())


# ---------------------------------------------------------------------------------------------------------
# The estimators that need a model: Hista (the policy's hidden states), PPO-1 (a critic), PRIME (a PRM).
# ---------------------------------------------------------------------------------------------------------
def hista_value(hidden: list[torch.Tensor], prompt_len: int, rewards: list[float], cut_response: int,
                cut_tokens: int, args: Args) -> float:
    """Hista's value of the prefix of `cut_tokens` response tokens of response `cut_response`.

    hidden[g]: (P + T_g, D) last-layer hidden states of the prompt's P tokens and response g's tokens. The
    pool is hista.py's: of every response its prompt-only prefix, a prefix every `interval` response tokens
    and the whole response, labelled with its reward; of the cut response only prefixes no longer than the
    state. The state is represented from the prompt and its own tokens (the EMA is causal, the last window
    ends at the cut), appended to the distance computation as one more sequence. k follows hista.py's
    schedule (linear_k over the response's n = ceil(T / interval) - 1 estimated states) at the state whose
    segment holds the cut: index floor(cut / interval) - 1, or 0 for a cut in the first segment (which
    training gives the group mean; here the cut itself is estimated, with k_max).
    """
    if cut_tokens == 0:
        return float(np.mean(rewards))  # the first state is the group mean, as in training
    reps = [hista.state_representation(h, prompt_len, args.ema_alpha, args.window) for h in hidden]
    query = hista.state_representation(hidden[cut_response][: prompt_len + cut_tokens], prompt_len,
                                       args.ema_alpha, args.window)
    D = hista.prefix_distances(reps + [query])  # (G + 1, G + 1, L, L)
    lengths = [h.shape[0] - prompt_len for h in hidden]
    cand_g, cand_w = hista.candidate_prefixes(lengths, args.interval, args.window, -(-prompt_len // args.window))
    cand_g, cand_w = cand_g.to(D.device), cand_w.to(D.device)
    w = query.shape[0]
    dist = D[len(hidden), cand_g, w - 1, cand_w - 1]  # (num candidates,) from the state to each candidate
    dist = torch.where((cand_g == cut_response) & (cand_w > w), torch.full_like(dist, float("inf")), dist)
    num_states = -(-lengths[cut_response] // args.interval) - 1  # states hista.py estimates on this response
    k = hista.linear_k(max(cut_tokens // args.interval - 1, 0), num_states, args.k_max, args.k_min)
    return hista.knn_value(dist, torch.tensor(rewards, device=D.device)[cand_g], k, args.d_min)


# ---- PPO-1: the official critic --------------------------------------------------------------------------
class CriticOnHidden(nn.Module):
    """The official PPO critic (src/ppo_sft): a trainable copy of the policy's transformer that reads the frozen
    policy's last hidden states as its input embeddings, and a value head without bias, initialised to zero,
    so that V = 0 everywhere before training."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) frozen hidden states -> (B, L) values, one per column (the state that ends at that token)."""
        out = self.backbone(inputs_embeds=hidden.to(self.head.weight.dtype), attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(out.float()).squeeze(-1)  # under bf16 autocast the head still runs in bfloat16


def critic_values(critic: CriticOnHidden, policy, batch: ppo.Batch) -> torch.Tensor:
    """(B, L) values at every column of `batch` (prompt and response; padding columns hold junk): the frozen
    policy's last hidden states (no gradient), then the critic on them."""
    dev = critic.head.weight.device
    ids, attention, positions = (x.to(dev) for x in (batch.input_ids, batch.attention_mask, batch.position_ids))
    with torch.no_grad():
        hidden = policy.get_decoder()(input_ids=ids, attention_mask=attention, position_ids=positions,
                                      use_cache=False).last_hidden_state  # (B, L, D)
    return critic(hidden, attention, positions)


def value_targets(values: torch.Tensor, attention_mask: torch.Tensor, scores: torch.Tensor, lam: float) -> torch.Tensor:
    """The official critic's regression targets: GAE with gamma 1 over every non-padding column of a
    left-padded prompt + right-padded response row, from the detached `values` themselves; the outcome
    score is the reward of the row's last real token. (B, L) values, (B, L) attention mask, (B,) scores ->
    (B, L) targets, 0 on padding. lambda = 1: the score at every token."""
    mask = attention_mask.float().cpu()
    L = mask.shape[1]
    last = L - 1 - mask.flip(1).argmax(1)  # (B,) column of each row's last real token
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), last] = scores.float().cpu()
    _, returns = ppo.compute_gae(rewards, values.detach().float().cpu() * mask, mask, 1.0, lam)
    return returns


def masked_mse(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (V - target)^2 over the mask's positions (every non-padding token of the batch)."""
    mask = mask.to(values.device).float()
    return (((values - targets.to(values.device)) ** 2) * mask).sum() / mask.sum().clamp(min=1)


def cosine_lr_multiplier(opt_step: int, total_steps: int, warmup_ratio: float, min_ratio: float) -> float:
    """Learning-rate factor of optimizer step `opt_step` (0-based) of `total_steps`: a linear warm-up 1/w, 2/w,
    ..., 1 over the first w = ceil(warmup_ratio * total) steps, then a half cosine from 1 down towards
    min_ratio (transformers' cosine_with_min_lr: min + (1 - min) (1 + cos(pi progress)) / 2)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if opt_step < warmup:
        return (opt_step + 1) / warmup
    progress = (opt_step - warmup) / max(1, total_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BestCheckpoint:
    """Keeps a CPU copy of a module's weights whenever its held-out loss is the lowest seen so far (the official
    recipe's save_strategy "best" on the eval loss), and puts the best one back at the end."""

    def __init__(self):
        self.loss, self.step, self.state = float("inf"), None, None

    def update(self, loss: float, step: int, module: nn.Module) -> bool:
        if not loss < self.loss:  # ties and NaN keep the earlier checkpoint
            return False
        self.loss, self.step = loss, step
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        return True

    def restore(self, module: nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


def critic_loss_sums(critic: CriticOnHidden, policy, batch: ppo.Batch, scores: torch.Tensor, lam: float,
                     micro_batch_size: int, autocast, backward_scale: float | None = None) -> tuple[float, int]:
    """(sum of squared errors, token count) of the critic on `batch` against its own GAE targets, a micro-batch at
    a time. With backward_scale, each micro-batch's loss (its token mean) is weighted by its share of
    backward_scale tokens and back-propagated: the gradient of the whole batch's token mean."""
    total, count = 0.0, 0
    for rows in torch.arange(len(scores)).split(micro_batch_size):
        sub = batch.rows(rows)
        with autocast(), (contextlib.nullcontext() if backward_scale else torch.no_grad()):
            values = critic_values(critic, policy, sub)  # (b, L)
            targets = value_targets(values, sub.attention_mask, scores[rows], lam)
            loss = masked_mse(values, targets, sub.attention_mask)
        tokens = int(sub.attention_mask.sum())
        if backward_scale:
            (loss * tokens / backward_scale).backward()
        total, count = total + float(loss.detach()) * tokens, count + tokens
    return total, count


def train_critic(critic: CriticOnHidden, policy, train_rows: list[dict], heldout_rows: list[dict], lam: float,
                 args: Args, pad_id: int, autocast) -> dict:
    """Train the critic as the official recipe does: one pass (per epoch) over the shuffled training responses in
    batches of critic_batch_size, MSE to the GAE targets of the same forward, AdamW (eps 1e-8, no weight decay,
    clipping 1.0), cosine schedule after a warm-up; the held-out loss every critic_eval_every steps and after
    the last, and the best checkpoint restored. Returns the steps, losses and the chosen step."""
    def make(rows):
        return ppo.make_batch([r["prompt_ids"] for r in rows], [r["token_ids"] for r in rows], pad_id)

    gen = torch.Generator().manual_seed(args.seed)
    order = [i for _ in range(args.critic_epochs) for i in torch.randperm(len(train_rows), generator=gen).tolist()]
    steps = [order[i : i + args.critic_batch_size] for i in range(0, len(order), args.critic_batch_size)]
    params = [p for p in critic.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.critic_learning_rate, eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr_multiplier(
        s, len(steps), args.critic_warmup_ratio, args.critic_min_lr_ratio))
    heldout = make(heldout_rows)
    heldout_scores = torch.tensor([r["reward"] for r in heldout_rows])
    best, train_losses, heldout_losses = BestCheckpoint(), [], []
    for step, idx in enumerate(tqdm(steps, desc=f"critic lambda={lam:g}", dynamic_ncols=True, leave=False), 1):
        rows = [train_rows[i] for i in idx]
        batch = make(rows)
        critic.train()
        scores = torch.tensor([r["reward"] for r in rows])  # (B,)
        sse, tokens = critic_loss_sums(critic, policy, batch, scores, lam, args.micro_batch_size, autocast,
                                       backward_scale=float(batch.attention_mask.sum()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(sse / tokens)
        if step % args.critic_eval_every == 0 or step == len(steps):
            critic.eval()
            sse, tokens = critic_loss_sums(critic, policy, heldout, heldout_scores, lam, args.micro_batch_size,
                                           autocast)
            heldout_losses.append((step, sse / tokens))
            best.update(sse / tokens, step, critic)
    best.restore(critic)
    critic.eval()
    return {"optimizer_steps": len(steps), "train_responses": len(train_rows), "heldout_responses": len(heldout_rows),
            "train_loss_per_step": train_losses, "heldout_loss": heldout_losses, "best_step": best.step,
            "best_heldout_loss": best.loss}


def critic_state_values(critic: CriticOnHidden, policy, states: list[dict], args: Args, pad_id: int,
                        autocast) -> list[float]:
    """V(state) = the critic's value at the state's last token (the last prompt token for an empty prefix), as
    the official SVEB reads values[0, -1] of prompt + prefix."""
    batch = ppo.make_batch([s["prompt_ids"] for s in states], [s["token_ids"] for s in states], pad_id)
    out = []
    with torch.no_grad(), autocast():
        critic.eval()
        for rows in torch.arange(len(states)).split(args.micro_batch_size):
            sub = batch.rows(rows)
            values = critic_values(critic, policy, sub).float().cpu()  # (b, L)
            out += [float(values[i, sub.prompt_width - 1 + states[r]["cut_tokens"]])
                    for i, r in enumerate(rows.tolist())]
    return out


# ---- PRIME: the implicit PRM -----------------------------------------------------------------------------
def training_steps(rows: list[dict], size: int, seed: int) -> list[list[dict]]:
    """The training responses (one dict per response, with prompt ids) shuffled and cut into steps of `size`."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def train_prm(prm, reference, rows: list[dict], args: Args, pad_id: int, autocast) -> dict:
    """Train PRIME's implicit PRM as prime_implicit_prm.py does: per batch, the reference's log-probs at T = 1,
    then one pass of prm_ce_loss over the batch's micro-batches grouped into minibatches (single forward: the
    accuracy is read from the forward of each micro-batch's loss, before its minibatch's step), AdamW with
    prime's eps and PRM weight decay, PRM gradient clipping, constant learning rate."""
    opt = torch.optim.AdamW(prm.parameters(), lr=args.prm_learning_rate, eps=prime.Args.adam_eps,
                            weight_decay=prime.Args.prm_weight_decay)
    accumulation = max(1, args.prm_minibatch_size // args.micro_batch_size)
    accuracies, losses = [], []
    steps = [s for p in range(args.prm_passes) for s in training_steps(rows, args.prm_batch_size, args.seed + p)]
    dev = prm.device
    for step_rows in tqdm(steps, desc="PRIME's PRM", dynamic_ncols=True, leave=False):
        batch = prime.make_batch([r["prompt_ids"] for r in step_rows], [r["token_ids"] for r in step_rows], pad_id)
        mask = batch.response_mask.to(dev)
        labels = torch.tensor([r["reward"] for r in step_rows], device=dev)
        micro_batches = torch.randperm(len(step_rows)).split(args.micro_batch_size)
        with torch.no_grad(), autocast():
            ref_lp = prime.in_micro_batches(lambda b: prime.response_logprobs(reference, b, 1.0), batch,
                                            micro_batches) * mask  # (B, T) at T = 1
        prm.train()
        logits = torch.zeros(len(step_rows), device=dev)  # (B,) implicit outcome log-odds before each minibatch's step
        for group in torch.randperm(len(micro_batches)).split(accumulation):
            rows_in_minibatch = sum(len(micro_batches[i]) for i in group)
            for micro in (micro_batches[i] for i in group):
                sub = batch.rows(micro)
                m = sub.response_mask.to(dev)
                with autocast():
                    lp = prime.response_logprobs(prm, sub, 1.0)
                    loss = prime.prm_ce_loss(lp, ref_lp[micro, : m.shape[1]], m, labels[micro], args.beta)
                (loss * len(micro) / rows_in_minibatch).backward()
                logits[micro] = prime.implicit_process_rewards(lp.detach(), ref_lp[micro, : m.shape[1]], m,
                                                               args.beta).sum(1)
                losses.append(float(loss.detach()))
            torch.nn.utils.clip_grad_norm_(prm.parameters(), prime.Args.prm_max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        accuracies.append(float(((logits > 0).float() == labels).float().mean()))
    return {"prm_steps": len(steps), "train_responses": len(rows),
            "right_share": float(np.mean([r["reward"] for r in rows])) if rows else float("nan"),
            "prm_accuracy_per_step": accuracies,
            "final_prm_loss": float(np.mean(losses[-8:])) if losses else float("nan")}


def prm_state_values(prm, reference, states: list[dict], args: Args, pad_id: int, autocast) -> list[float]:
    """PRIME's implicit PRM read as a value: sigmoid(beta * sum of log pi_prm - log pi_ref over the prefix), both
    log-probs at T = 1 as in training."""
    batch = prime.make_batch([s["prompt_ids"] for s in states], [s["token_ids"] for s in states], pad_id)
    prefix = torch.zeros_like(batch.response_mask)
    for i, s in enumerate(states):
        prefix[i, : s["cut_tokens"]] = 1
    micro_batches = torch.arange(len(states)).split(args.micro_batch_size)
    with torch.no_grad(), autocast():
        prm.eval()
        prm_lp = prime.in_micro_batches(lambda b: prime.response_logprobs(prm, b, 1.0), batch, micro_batches)
        ref_lp = prime.in_micro_batches(lambda b: prime.response_logprobs(reference, b, 1.0), batch, micro_batches)
    rewards = prime.implicit_process_rewards(prm_lp, ref_lp, prefix.to(prm_lp.device), args.beta)
    return torch.sigmoid(rewards.sum(1)).tolist()


# ---------------------------------------------------------------------------------------------------------
# Build: pre-samples, responses, cuts, continuations -> the benchmark file, a chunk of problems at a time.
# ---------------------------------------------------------------------------------------------------------
def build_config(args: Args) -> dict:
    """What the file's contents depend on; a resumed build must match it."""
    return {"format": BUILD_FORMAT, "model": args.model, "dataset": args.dataset, "seed": args.seed,
            "num_presamples": args.num_presamples, "population": args.population, "group_size": args.group_size,
            "num_truth": args.num_truth, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "chunk_size": args.chunk_size}


def read_bench(path: str) -> tuple[dict | None, list[dict]]:
    """(header, records) of a benchmark file. A last line cut short by an interruption is dropped from the
    file, so that appending continues from the last complete chunk; a file that is not a benchmark file is
    refused before anything in it is touched."""
    if not os.path.exists(path):
        return None, []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    try:
        lines = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        lines = [None]
    if not lines and data.strip() and not data.startswith(b'{"kind": "header"'):
        lines = [None]  # one line, no newline, and not the start of a header: someone else's file
    if lines and not (isinstance(lines[0], dict) and lines[0].get("kind") == "header"
                      and isinstance(lines[0].get("config"), dict)
                      and all(isinstance(r, dict) and "kind" in r for r in lines[1:])):
        raise DataError(f"{path} is not an SVEB benchmark file (no header line, or lines that are not its "
                        "records); choose another --bench-file")
    if len(complete) != len(data):
        with open(path, "wb") as f:
            f.write(complete)
    if not lines:
        return None, []  # interrupted before its first line was written
    return lines[0]["config"], lines[1:]


def check_header(path: str, header: dict | None, config: dict) -> None:
    """Refuse, in one line, a file built with other settings (or by another version of this script)."""
    if header is not None and header != config:
        keys = list(config) + [k for k in header if k not in config]
        diff = ", ".join(f"{k}: file {header.get(k)!r} vs now {config.get(k)!r}" for k in keys
                         if header.get(k) != config.get(k))
        raise SystemExit(f"error: {path} was built with other settings ({diff}); pass the same flags to resume, "
                         "or a new --bench-file")


def build(args: Args) -> str:
    """Write (or complete) the benchmark file and return its path."""
    path = args.bench_file
    config = build_config(args)
    header, records = read_bench(path)
    check_header(path, header, config)
    resolve_model_path(args.model)  # a missing model folder fails now, in one line, before the data is read
    bench_problems = load_problems(args.dataset, "test", size=args.num_problems, seed=args.seed)
    train_problems = (load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
                      if args.num_train_problems else [])  # (size 0 would mean the whole split)
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
                               seed=args.seed, max_model_len=args.vllm_max_model_len,
                               enforce_eager=args.vllm_enforce_eager)
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
    generator.sleep()  # vLLM frees its GPU memory before the eval stage loads its models
    return path


def continuation_rewards(generator, tokenizer, prompts: list[list[int]], prefixes: list[list[int]],
                         answers: list[str], questions: list[str], n: int, max_new_tokens: int, temperature: float,
                         top_p: float, seed: int) -> list[list[float]]:
    """The graded rewards of n continuations from each state (prompt + response prefix), one batched call.
    vineppo.estimate_values' rule, kept one reward per continuation: a continuation may use the budget its
    prefix left of max_new_tokens; one that does not finish within it scores 0."""
    outs = generator.generate([p + x for p, x in zip(prompts, prefixes)], n=n,
                              max_new_tokens=[max_new_tokens - len(x) for x in prefixes],
                              temperature=temperature, top_p=top_p, seed=seed)
    rewards = []
    for prefix, answer, question, conts in zip(prefixes, answers, questions, outs):
        texts = [tokenizer.decode(prefix + c.token_ids, skip_special_tokens=True) for c in conts]
        rewards.append(vineppo.outcome_rewards(texts, [c.finished for c in conts], [answer] * len(conts),
                                               [question] * len(conts)))
    return rewards


def build_chunk(chunk: list[tuple], generator, tokenizer, args: Args) -> list[dict]:
    """Records for a chunk of (kind, index, problem). Every problem: num_presamples graded responses, its pass
    rate (and, for benchmark problems, its tier; training problems keep the responses). Benchmark problems in
    the population: G fresh graded responses, the cut, and the n continuation rewards of the ground truth.
    Seeded by the chunk's first problem, so a resumed build samples what an uninterrupted one would have."""
    kind0, index0, _ = chunk[0]
    base = args.seed * 1_000_003 + index0 * 10 + (5 if kind0 == "train" else 0)
    prompts = [prompt_ids(tokenizer, p.question) for _, _, p in chunk]
    # 1. Pre-sample every problem: its pass rate.
    pre = generator.generate(prompts, n=args.num_presamples, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=base)
    records = []
    for (kind, index, p), prompt, completions in zip(chunk, prompts, pre):
        rewards = vineppo.outcome_rewards([c.text for c in completions], [c.finished for c in completions],
                                          [p.answer] * len(completions), [p.question] * len(completions))
        record = {"kind": kind, "index": index, "question": p.question, "answer": p.answer, "prompt_ids": prompt,
                  "pass_rate": float(np.mean(rewards))}
        if kind == "train":  # what PPO-1 and PRIME train on
            record["responses"] = [{"token_ids": c.token_ids, "reward": r} for c, r in zip(completions, rewards)]
        else:
            record |= {"presample_rewards": rewards, "tier": pass_tier(record["pass_rate"])}
        records.append(record)
    members = [(r, prompt) for r, prompt in zip(records, prompts)
               if r["kind"] == "bench" and (r["tier"] is not None or args.population == "all")]
    if not members:
        return records
    # 2. G fresh responses per benchmark problem, graded; the first one with a space is cut at a random space.
    outs = generator.generate([prompt for _, prompt in members], n=args.group_size,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=base + 1)
    for (record, _), completions in zip(members, outs):
        rewards = vineppo.outcome_rewards([c.text for c in completions], [c.finished for c in completions],
                                          [record["answer"]] * len(completions), [record["question"]] * len(completions))
        record["responses"] = [{"token_ids": c.token_ids, "text": c.text, "finished": c.finished, "reward": r}
                               for c, r in zip(completions, rewards)]
        rng = random.Random(args.seed * 1_000_003 + record["index"])
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
    # 3. n continuations from each state, graded one by one: their mean is the ground truth, and MCS@k draws
    #    from them.
    truth = continuation_rewards(
        generator, tokenizer, [prompt for _, prompt in members],
        [r["responses"][r["cut_response"]]["token_ids"][: r["cut_tokens"]] for r, _ in members],
        [r["answer"] for r, _ in members], [r["question"] for r, _ in members], args.num_truth, args.max_new_tokens,
        args.temperature, args.top_p, seed=base + 2)
    for (record, _), rewards in zip(members, truth):
        record |= {"truth_rewards": rewards, "truth": float(np.mean(rewards))}
    return records


# ---------------------------------------------------------------------------------------------------------
# Eval: every estimator on every state; tables, chart, JSON.
# ---------------------------------------------------------------------------------------------------------
def training_sets(train: list[dict], args: Args) -> dict[str, list[dict]]:
    """The training responses (one dict each, with its prompt) of each trained estimator: PPO-1's training and
    held-out sets (problems with pass rate in (0, 0.77], split by problem), PRIME's (prime's accuracy filter)."""
    def rows(records):
        return [{"prompt_ids": r["prompt_ids"], "token_ids": x["token_ids"], "reward": x["reward"]}
                for r in records for x in r["responses"]]

    train = sorted(train, key=lambda r: r["index"])
    critic_problems = [r for r in train if critic_problem(r["pass_rate"]) or not args.train_filters]
    train_idx, held_idx = heldout_split(len(critic_problems), args.critic_heldout, args.seed)
    if args.train_filters and train:
        scores = torch.tensor([[x["reward"] for x in r["responses"]] for r in train])
        keep = prime.accuracy_filter(scores, prime.Args.filter_low, prime.Args.filter_high).tolist()
        prm_problems = [r for r, k in zip(train, keep) if k]
    else:
        prm_problems = train
    return {"critic_train": rows([critic_problems[i] for i in train_idx]),
            "critic_heldout": rows([critic_problems[i] for i in held_idx]),
            "prm": rows(prm_problems), "critic_problems": len(critic_problems), "prm_problems": len(prm_problems)}


def evaluate_estimators(args: Args, config: dict, bench: list[dict],
                        train: list[dict]) -> tuple[dict[str, list[float]], dict]:
    """({estimator: [value of each benchmark state]} for the estimators in args.estimators, and what their
    training reported: the critics' steps and losses, the PRM's accuracy per step)."""
    wanted = set(args.estimators)
    estimates: dict[str, list[float]] = {}
    training: dict = {}
    texts = lambda r: [x["text"] for x in r["responses"]]  # noqa: E731
    rewards = lambda r: [x["reward"] for x in r["responses"]]  # noqa: E731
    if "GRPO" in wanted:
        estimates["GRPO"] = [grpo_value(rewards(r)) for r in bench]
    for name, k in (("MCS@1", 1), ("MCS@2", 2), ("MCS@K", args.mc_k)):
        if name in wanted:  # a fixed draw per (problem, k), whatever else runs
            estimates[name] = [mcs_value(r["truth_rewards"], k,
                                         random.Random(args.seed * 1_000_003 + r["index"] * 101 + k)) for r in bench]
    if "Numca" in wanted:
        estimates["Numca"] = [numca_value(texts(r), rewards(r), r["cut_response"], r["cut_char"], args.min_gap_chars)
                              for r in bench]
    if not wanted & {"Hista", *TRAINED}:
        return estimates, training

    device = default_device() if args.device == "auto" else args.device
    autocast = (lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)) if args.bf16 \
        else contextlib.nullcontext
    checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and device.startswith("cuda"))
    # The frozen policy (Hista's hidden states, the critic's inputs, PRIME's reference) never trains, and is
    # float32 under the same autocast on every device: as the PRM, so that at equal weights the PRM's log-probs
    # equal the reference's exactly (its value before training is exactly 0.5; a bfloat16 copy would start it at
    # rounding noise), and as the policy whose hidden states hista.py reads in training.
    frozen_dtype = "float32"
    tokenizer = load_tokenizer(config["model"])
    pad_id = tokenizer.pad_token_id
    policy = load_model(config["model"], dtype=frozen_dtype, device=device).eval().requires_grad_(False)
    states = [{"prompt_ids": r["prompt_ids"], "token_ids": r["responses"][r["cut_response"]]["token_ids"],
               "cut_tokens": r["cut_tokens"]} for r in bench]
    sets = training_sets(train, args)
    if "Hista" in wanted:
        t0 = time.time()
        values = []
        for r in tqdm(bench, desc="hista", dynamic_ncols=True, leave=False):
            responses = [x["token_ids"] for x in r["responses"]]
            batch = hista.make_batch([r["prompt_ids"]] * len(responses), responses, pad_id)
            with torch.no_grad(), autocast():  # hidden states from the pass that computes the old log-probs
                _, hidden = hista.in_micro_batches(
                    lambda b: hista.response_logprobs(policy, b, config["temperature"], with_hidden=True), batch,
                    torch.arange(len(responses)).split(args.micro_batch_size))
            values.append(hista_value(hidden, len(r["prompt_ids"]), rewards(r), r["cut_response"], r["cut_tokens"],
                                      args))
        estimates["Hista"] = values
        print(f"hista: {time.time() - t0:.0f} s")
    for lam in (1.0, 0.95):
        name = f"PPO-1/lam{lam:g}"
        if name not in wanted:
            continue
        t0 = time.time()
        torch.manual_seed(args.seed)
        backbone = load_model(config["model"], device=device, gradient_checkpointing=checkpointing).get_decoder()
        critic = CriticOnHidden(backbone, policy.config.hidden_size).to(device)
        info = train_critic(critic, policy, sets["critic_train"], sets["critic_heldout"], lam, args, pad_id, autocast)
        estimates[name] = critic_state_values(critic, policy, states, args, pad_id, autocast)
        info |= {"problems": sets["critic_problems"], "seconds": time.time() - t0}
        training[name] = info
        print(f"{name}: {info['optimizer_steps']} optimizer steps on {info['train_responses']} responses of "
              f"{sets['critic_problems']} problems in {info['seconds']:.0f} s; best held-out loss "
              f"{info['best_heldout_loss']:.4f} at step {info['best_step']}; mean value on the benchmark states "
              f"{np.mean(estimates[name]):.3f}")
        del critic, backbone
    if "PRIME" in wanted:
        t0 = time.time()
        torch.manual_seed(args.seed)
        prm = load_model(config["model"], device=device, gradient_checkpointing=checkpointing)
        info = train_prm(prm, policy, sets["prm"], args, pad_id, autocast)
        estimates["PRIME"] = prm_state_values(prm, policy, states, args, pad_id, autocast)
        info |= {"problems": sets["prm_problems"], "seconds": time.time() - t0}
        acc = info["prm_accuracy_per_step"]
        print(f"PRIME: PRM trained on {info['train_responses']} responses of {sets['prm_problems']} problems "
              f"({info['right_share']:.0%} right) in {info['seconds']:.0f} s; accuracy of each batch before its "
              f"update: {' '.join(f'{a:.2f}' for a in acc)}")
        training["PRIME"] = info
        del prm
    return estimates, training


def fmt(mae: float, se: float) -> str:
    if math.isnan(mae):
        return "-"
    return f"{mae:.3f} ± {se:.3f}" if not math.isnan(se) else f"{mae:.3f}"


def population_counts(candidates: list[dict]) -> dict:
    """How the pre-sampled benchmark candidates fall: per tier, and outside the population below / above it."""
    tiers = [pass_tier(r["pass_rate"]) for r in candidates]
    return {"candidates": len(candidates), **{t: tiers.count(t) for t in TIERS},
            "below": sum(t is None and r["pass_rate"] <= 0.07 for r, t in zip(candidates, tiers)),
            "above": sum(t is None and r["pass_rate"] > 0.77 for r, t in zip(candidates, tiers))}


def summarise(bench: list[dict], estimates: dict[str, list[float]], args: Args) -> dict:
    """MAE and SE per estimator, per field and per tier; the critic-collapse check."""
    truth = [r["truth"] for r in bench]
    fields = [problem_field(r["question"], [x["text"] for x in r["responses"]], [x["reward"] for x in r["responses"]],
                            args.number_min_count) for r in bench]
    tiers = [r["tier"] or "outside" for r in bench]
    tier_names = list(TIERS) + (["outside"] if "outside" in tiers else [])
    names = [n for n in ESTIMATORS if n in estimates]
    results = {"num_problems": len(bench), "fields": {f: fields.count(f) for f in FIELDS},
               "tiers": {t: tiers.count(t) for t in tier_names}, "mae": {}, "mae_by_tier": {}}
    for name in names:
        est = estimates[name]
        results["mae"][name] = {"all": mae_with_se(est, truth)}
        for f in FIELDS:
            idx = [i for i, x in enumerate(fields) if x == f]
            results["mae"][name][f] = mae_with_se([est[i] for i in idx], [truth[i] for i in idx])
        results["mae_by_tier"][name] = {}
        for t in tier_names:
            idx = [i for i, x in enumerate(tiers) if x == t]
            results["mae_by_tier"][name][t] = mae_with_se([est[i] for i in idx], [truth[i] for i in idx])
    if "GRPO" in estimates:  # each estimator's error minus the group mean's, state by state
        grpo_err = np.abs(np.asarray(estimates["GRPO"]) - np.asarray(truth))
        results["minus_grpo"] = {name: paired_difference(np.abs(np.asarray(estimates[name]) - np.asarray(truth)),
                                                         grpo_err) for name in names}
    # The noise floor: even a perfect estimator differs from an n-sample ground truth by about this much.
    n = [len(r["truth_rewards"]) for r in bench]
    results["truth_sampling_se"] = float(np.mean([math.sqrt(v * (1 - v) / k) for v, k in zip(truth, n)]))
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
                "mean_of_critic": float(np.mean(estimates[name])),
                "std_of_critic": float(np.std(estimates[name])), "std_of_group_mean": float(np.std(group_mean)),
            }
    results["per_problem"] = [{"index": r["index"], "field": f, "tier": t, "pass_rate": r["pass_rate"],
                               "truth": r["truth"], **{name: estimates[name][i] for name in names}}
                              for i, (r, f, t) in enumerate(zip(bench, fields, tiers))]
    return results


def markdown_tables(results: dict, config: dict, args: Args) -> str:
    f, t, p = results["fields"], results["tiers"], results["population"]
    label = lambda name: name.replace("MCS@K", f"MCS@{args.mc_k} (VinePPO's K)")  # noqa: E731
    lines = [f"SVEB: MAE against MC@{config['num_truth']} ground truth (± standard error), {results['num_problems']} "
             f"states, {config['model']}, {config['dataset']}, G = {config['group_size']}, T = {config['temperature']}",
             "", f"Population: {p['0717'] + p['1737'] + p['3777']} of {p['candidates']} pre-sampled problems have a "
             f"pass rate in (0.07, 0.77] over {config['num_presamples']} samples ({p['below']} at or below 0.07, "
             f"{p['above']} above 0.77)" + ("; --population all: every candidate is in the table." if
                                             config["population"] == "all" else "."),
             "", f"| estimator | number (n={f['number']}) | other (n={f['other']}) | all (n={results['num_problems']}) "
             "| all minus GRPO (paired) | paper: number / math |", "|---|---|---|---|---|---|"]
    for name, m in results["mae"].items():
        paper = PAPER_MAE.get(name)
        d, d_se = results.get("minus_grpo", {}).get(name, (float("nan"), float("nan")))
        paired = "-" if math.isnan(d) or name == "GRPO" else f"{d:+.3f} ± {d_se:.3f}"
        lines.append(f"| {label(name)} | {fmt(*m['number'][:2])} | {fmt(*m['other'][:2])} | {fmt(*m['all'][:2])} | "
                     f"{paired} | " + (f"{paper[0]:.3f} / {paper[1]:.3f} |" if paper else "- |"))
    lines += ["", f"By the paper's difficulty tiers (pass rate over {config['num_presamples']} pre-samples):", "",
              "| estimator | " + " | ".join(f"{TIER_LABELS[x]} (n={t[x]})" for x in t) + " |",
              "|---" * (len(t) + 1) + "|"]
    for name, m in results["mae_by_tier"].items():
        lines.append(f"| {label(name)} | " + " | ".join(fmt(*m[x][:2]) for x in t) + " |")
    lines += ["", "Sampling noise of the ground truth itself: mean sqrt(v(1-v)/n) = "
              f"{results['truth_sampling_se']:.3f}. MCS@k draws k of the ground truth's own continuations (the "
              "paper's noise reference)."]
    for name, c in results["critic_collapse"].items():
        tr = results["training"].get(name, {})
        lines.append(f"Critic collapse, {name}: mean value {c['mean_of_critic']:.3f}, corr(critic, group mean) = "
                     f"{c['corr_with_group_mean']:.2f}, corr(critic, truth) = {c['corr_with_truth']:.2f}, "
                     f"std(critic - group mean) = {c['std_of_critic_minus_group_mean']:.3f} (std of the critic "
                     f"{c['std_of_critic']:.3f}, of the group mean {c['std_of_group_mean']:.3f}); trained "
                     f"{tr.get('optimizer_steps', '?')} optimizer steps on {tr.get('train_responses', '?')} responses, "
                     f"best held-out loss at step {tr.get('best_step', '?')}.")
    lines.append("Paper: Qwen2.5-1.5B-Instruct, G = 32, n = 20; its PPO row is PPO-N (trained on the same problems).")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: str) -> None:
    """MAE ± SE per estimator, one bar per field (and all), and beside them the paper's number and math
    figures (hatched; no error bar: the paper gives none) for the estimators it reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["mae"])
    groups = [g for g in FIELDS if results["mae"][names[0]][g][2]]
    groups += ["all"] if len(groups) > 1 else []  # "all" would repeat the only non-empty field
    # (label, [MAE or nan per estimator], [SE per estimator], bar style): ours, then the paper's two fields.
    bars = [(f"ours: {g} (n={results['mae'][names[0]][g][2]})",
             [results["mae"][n][g][0] for n in names],
             [0 if math.isnan(results["mae"][n][g][1]) else results["mae"][n][g][1] for n in names], {})
            for g in groups]
    if any(n in PAPER_MAE for n in names):
        for j, field in enumerate(("number", "math")):
            ppo_n = " (its PPO is PPO-N)" if j == 0 and any(n.startswith("PPO") for n in names) else ""
            bars.append((f"paper: {field}{ppo_n}", [PAPER_MAE[n][j] if n in PAPER_MAE else math.nan for n in names],
                         None, {"color": ("0.55", "0.8")[j], "hatch": "//", "edgecolor": "0.3"}))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    width = 0.8 / len(bars)
    for j, (label, ys, es, style) in enumerate(bars):
        ax.bar(np.arange(len(names)) + (j - (len(bars) - 1) / 2) * width, ys, width, yerr=es,
               capsize=2 if es else 0, label=label, **style)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("MAE vs Monte Carlo ground truth")
    ax.set_title("SVEB: state value estimation error (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(args: Args) -> dict:
    config, records = read_bench(args.bench_file)
    if config is None:
        raise SystemExit(f"error: {args.bench_file} does not exist; run the build stage first (--stage build)")
    if config.get("format") != BUILD_FORMAT:
        raise SystemExit(f"error: {args.bench_file} was built by another version of sveb_eval.py (format "
                         f"{config.get('format')!r}, now {BUILD_FORMAT}); build a new one (--bench-file)")
    candidates = [r for r in records if r["kind"] == "bench"]
    bench = sorted((r for r in candidates if "truth" in r), key=lambda r: r["index"])
    train = [r for r in records if r["kind"] == "train"]
    if not bench:
        raise SystemExit(f"error: {args.bench_file} holds no benchmark state yet ({len(candidates)} candidates "
                         "pre-sampled, none in the population): build with more --num-problems")
    if args.mc_k > config["num_truth"] and "MCS@K" in args.estimators:
        raise SystemExit(f"error: --mc-k {args.mc_k} is more than the {config['num_truth']} continuations of the "
                         "ground truth it draws from")
    trained = set(args.estimators) & {"PPO-1/lam1", "PPO-1/lam0.95"}
    if trained:
        critic_problems = training_sets(train, args)["critic_problems"]
        if critic_problems < 2:
            raise SystemExit(f"error: PPO-1 needs at least 2 training problems with pass rate in (0, 0.77] (one to "
                             f"hold out); the file has {critic_problems}: build with more --num-train-problems, "
                             "pass --no-train-filters, or leave PPO-1 out of --estimators")
    if "PRIME" in args.estimators and not training_sets(train, args)["prm"]:
        raise SystemExit("error: PRIME's PRM has no training problem with pass rate in [0.2, 0.8]: build with more "
                         "--num-train-problems, pass --no-train-filters, or leave PRIME out of --estimators")
    t0 = time.time()
    estimates, training = evaluate_estimators(args, config, bench, train)
    results = summarise(bench, estimates, args)
    results["population"] = population_counts(candidates)
    results["training"] = training
    results["config"] = config
    results["eval_seconds"] = time.time() - t0
    os.makedirs(args.output_dir, exist_ok=True)
    table = markdown_tables(results, config, args)
    print(table)
    with open(os.path.join(args.output_dir, "sveb_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "sveb_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    bar_chart(results, os.path.join(args.output_dir, "sveb_mae.png"))
    print(f"wrote sveb_table.md, sveb_results.json and sveb_mae.png to {args.output_dir}")
    return results


def check_args(args: Args) -> None:
    """Reject out-of-range values and inconsistent settings before anything is loaded or written."""
    check_ranges(args, {
        ">= 1": ["num_problems", "num_presamples", "group_size", "num_truth", "max_new_tokens", "chunk_size",
                 "gen_batch_size", "vllm_max_model_len", "mc_k", "number_min_count", "micro_batch_size", "interval",
                 "window", "k_max", "k_min", "critic_batch_size", "critic_epochs", "critic_eval_every",
                 "prm_batch_size", "prm_minibatch_size", "prm_passes"],
        ">= 0": ["num_train_problems", "min_gap_chars", "critic_learning_rate", "prm_learning_rate"],
        "> 0": ["temperature", "d_min", "beta"],
        "in (0, 1]": ["top_p", "vllm_gpu_memory_utilization", "critic_heldout"],
        "in [0, 1]": ["ema_alpha", "critic_warmup_ratio", "critic_min_lr_ratio"],
    })
    if args.ema_alpha == 1:
        raise SystemExit("error: --ema-alpha must be < 1 (got 1.0): the EMA's bias correction divides by 1 - alpha^t")
    if args.critic_heldout == 1:
        raise SystemExit("error: --critic-heldout must be < 1 (got 1.0): the critic needs problems to train on")
    if args.k_min > args.k_max:
        raise SystemExit(f"error: --k-min {args.k_min} must be at most --k-max {args.k_max}")
    if args.bench_file is None:
        args.bench_file = os.path.join(args.output_dir, "bench.jsonl")
    if os.path.isfile(args.output_dir):
        raise SystemExit(f"error: --output-dir {args.output_dir} is a file: pass a folder")
    if os.path.isdir(args.bench_file):
        raise SystemExit(f"error: --bench-file {args.bench_file} is a folder: pass a file (.jsonl)")
    if args.max_new_tokens is None:
        args.max_new_tokens = default_max_new_tokens(args.dataset)
    check_device(args.device, args.backend)
    unknown = set(args.estimators) - set(ESTIMATORS)
    if unknown:
        raise SystemExit(f"error: unknown estimator(s) {sorted(unknown)}; choose from {list(ESTIMATORS)}")
    trained = set(TRAINED) & set(args.estimators)
    if args.stage == "all" and args.num_train_problems == 0 and trained:
        raise SystemExit(f"error: {sorted(trained)} need training problems: --num-train-problems > 0, or leave them "
                         "out of --estimators")
    if args.stage == "all" and args.mc_k > args.num_truth and "MCS@K" in args.estimators:
        raise SystemExit(f"error: --mc-k {args.mc_k} must be at most --num-truth {args.num_truth} (MCS@K draws from "
                         "the ground truth's continuations)")
    if args.prm_minibatch_size % args.micro_batch_size:
        raise SystemExit(f"error: --micro-batch-size {args.micro_batch_size} must divide --prm-minibatch-size "
                         f"{args.prm_minibatch_size}")


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
