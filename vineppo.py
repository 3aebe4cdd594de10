"""VinePPO (Kazemnejad et al. 2024, arXiv 2410.01679): PPO without a critic, values by Monte Carlo from prefixes.

Each response is split into reasoning steps (lines for GSM8K-like text, sentences with math spans kept whole
for MATH). For the prompt and the prefix after every step but the last, K = 9 continuations are sampled with
the training sampler (identical prefixes once); V(s_i) is their mean reward. Step i's advantage is
V(s_{i+1}) - V(s_i), the last step's R - V(s_last); every token takes its step's advantage. The rest is
ppo.py without the critic: whitened advantages, clipped surrogate, k3 KL to the reference in the loss;
`diff ppo.py vineppo.py` shows the idea and little else. Official code: McGill-NLP/VinePPO
(math_episode_generator_with_mc_advantages.py, ppo_trainer.py, configs/polIter_*_vineppo_*.jsonnet).

Departures from the official code (docs/vineppo.md gives the reasons):
- Defaults sized for the offline CPU run (8 prompts x 4, lr 3e-6, 128 new tokens); K = 9 as in the paper.
- Top-p 1.0 by default (the paper: 0.9).
- Estimation cap by splitting style: 25 boundaries for the newline style, none for math (as the configs).
- A continuation gets exactly the response budget its prefix left (official: context size minus the prefix).
- A token straddling a step boundary belongs to the step where it ends (official: where it starts).
- The separator at a boundary ends the step before it (official: it starts the next one).
- Advantages whitened once over the batch (official: within each micro-batch, every epoch).
- Dropout left as the model's config has it (official: disabled).
- One micro-batch partition per step, shared by every pass and epoch (batch invariance).
- Logits only at response positions, float32 log-softmax in chunks; the reference stays float32 on the CPU.
- Float32 weights, under bf16 autocast on CUDA, float32 compute on the CPU; sampling from a bf16 copy (hf) or vLLM.
- The math splitter's thresholds and abbreviation rule differ in detail from split_solution_inplace.
- Loss is the token mean over the minibatch (official: the mean of micro-batch token means).

Docs: docs/vineppo.md
Run:  python vineppo.py                                               # CPU, offline, default
      python vineppo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --backend vllm   # one GPU
      torchrun --nproc-per-node 8 vineppo.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --fsdp   # 8 GPUs
      python vineppo.py --model Qwen/Qwen2.5-7B-Instruct --backend vllm --lora-rank 16   # LoRA, one GPU
"""

from __future__ import annotations

import bisect
import math
import re
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.utils.checkpoint
import tyro
from tokenizers import decoders

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
    exp_name: str = "vineppo"
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
    """nucleus sampling (the paper: 0.9); below 1 the update is slightly off-policy"""
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
    num_mc_rollouts: int = 9
    """K: continuations sampled from each state to estimate its value"""
    step_style: Literal["auto", "newline", "math"] = "auto"
    """how responses are split into reasoning steps (auto: math for the math dataset, else newline)"""
    max_estimated_steps: int | None = None
    """step boundaries estimated per response after the prompt (VinePPO's max_step_for_value_estimation); later
    states take V = R (advantage 0); 0: only the prompt's value. None: 25 for the newline style (VinePPO's
    GSM8K configs), every boundary for the math style (its MATH configs)"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    kl_coef: float = 1e-4
    """coefficient of the k3 KL to the reference in the loss (per token clamped to [0, 10], summed per sequence)"""
    max_ratio: float = 10.0
    """skip a micro-batch whose mean ratio pi/pi_old exceeds this (VinePPO's code); counted in losses/skipped"""
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        "none"
    """importance weights p_learner / p_sampler on each token's policy loss, for the sampler-learner mismatch (TRL's
    vllm_importance_sampling_mode; see rollout_correction). Default none: VinePPO's code recomputes the old log-probs
    with the trained model and never reads the sampler's"""
    rollout_correction_cap: float = 3.0
    """upper cap C of those weights: *_truncate clips a ratio at C, *_mask gives 0 above C (TRL's default, 3)"""
    whiten_advantages: bool = True
    """normalise advantages over the batch's response tokens (VinePPO's code: over each micro-batch's)"""

    # ---- computed at runtime ----
    batch_size: int = 0
    """(computed) samples per iteration: num_prompts * samples_per_prompt"""


# ---------------------------------------------------------------------------------------------------------
# The algorithm's pure functions: each is tested on its own in tests/test_vineppo.py.
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


def outcome_rewards(texts: list[str], finished: list[bool], answers: list[str], questions: list[str]) -> list[float]:
    """1.0 for a correct final answer, 0.0 otherwise; a response cut by the length limit scores 0. The grader
    reads the question too: an answer that only hands its calculation back (\\boxed{59 * 100}) scores 0."""
    return [grade(text, gold, question=q) if done else 0.0
            for text, done, gold, q in zip(texts, finished, answers, questions)]


# "math" style. A math span is one of these, found left to right; an escaped character (`\$` is money, not
# math) is matched only so that it cannot open or close a span, and is not protected.
MATH_SPAN = re.compile(
    r"\[asy\].*?\[/asy\]"  # Asymptote code
    r"|\\begin\{(?P<env>[^}]*)\}.*?\\end\{(?P=env)\}"  # environments: align*, equation, array, ...
    r"|\\\[.*?\\\]|\\\(.*?\\\)"  # \[ display \], \( inline \)
    r"|\$\$(?:\\.|[^\\$])*\$\$"  # $$ display $$
    r"|\$(?:\\.|[^\\$])+\$"  # $ inline $; an escaped \$ inside neither closes nor opens it
    r"|(?P<escape>\\.)",  # an escaped character outside math, e.g. \$ (money)
    re.DOTALL)
SPAN_OPENING = re.compile(r"\\begin\{[^}]*\}(?:\{[^}]*\})*|\$\$?|\\[\[(]|\[asy\]")  # at a span's start
SPAN_CLOSING = re.compile(r"(?:\\end\{[^}]*\}|\$\$?|\\[\])]|\[/asy\])$")  # at a span's end
# a sentence's end: . ! or ? (possibly closing a math span, as in "$x = 5.$"), then spaces
SENTENCE_END = re.compile(r"[.!?](?:\$\$?|\\[)\]])?\s+")
WORD_BEFORE = re.compile(r"(?<![\w.])[A-Za-z][A-Za-z.]*$")  # the word a period follows ("Dr", "e.g", "x")
ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "etc", "cf", "approx", "fig", "eq", "eqs"}
MIN_STEP_CHARS = 10  # pieces shorter than this (stripped) are merged into the next one
MAX_STEP_CHARS = 100  # pieces longer than this are split near their middle...
MIN_SPLIT_CHARS = 20  # ...where both halves keep at least this many characters: every step costs K continuations


def split_into_steps(text: str, style: str) -> list[str]:
    """Split a response into reasoning steps; `"".join(steps) == text` always, and there is >= 1 step.

    "newline" (GSM8K): a step per line (blank lines stay with the line before); a final `#### n` line
    is merged into the step before it.
    "math" (MATH), after VinePPO's `split_solution_inplace`:
    - math spans ($...$, $$...$$, \\[...\\], \\(...\\), \\begin..\\end, [asy]..[/asy]) are never cut, except at
      a line break that has content of the span on both sides (long display math, one step per line or so);
    - cut after every line break, and after a sentence's end (. ! ? then spaces) when the next word starts
      with a capital letter and the period does not end an abbreviation (a single letter as in "e.g.",
      "i.e." or "x.", or one of ABBREVIATIONS such as "Dr." and "etc.");
    - pieces under MIN_STEP_CHARS (stripped) are merged into the next one; pieces over MAX_STEP_CHARS are
      split at the space (preferably after a comma, ":", "and" or "=") nearest their middle, outside math
      spans, leaving at least MIN_SPLIT_CHARS on each side.
    The separator (line break, spaces after a sentence) ends the step before a cut; VinePPO's splitter
    starts the next step with it.
    """
    if style == "newline":
        steps = re.split(r"(?<=\n)(?=[^\n])", text)
        if len(steps) > 1 and not steps[0].strip():  # leading blank lines join the first line
            steps[:2] = [steps[0] + steps[1]]
        if len(steps) > 1 and steps[-1].lstrip().startswith("####"):
            steps[-2:] = [steps[-2] + steps[-1]]
        return steps
    if style != "math":
        raise ValueError(f"unknown step style {style!r}: use newline or math")
    spans = [(m.start(), m.end()) for m in MATH_SPAN.finditer(text) if m.group("escape") is None]
    inside = lambda i: any(a < i < b for a, b in spans)  # noqa: E731  a cut at i splits a span

    def line_cut_ok(i: int) -> bool:  # a cut after a line break at i: outside math, or between two lines of it
        for a, b in spans:
            if a < i < b:
                head = text[a:i][SPAN_OPENING.match(text, a).end() - a :]  # the span before i, less its opening
                tail = SPAN_CLOSING.sub("", text[i:b])  # the span after i, less its closing
                return bool(head.strip()) and bool(tail.strip())
        return True

    cuts = {m.end() for m in re.finditer(r"\n+", text) if line_cut_ok(m.end())}
    for m in SENTENCE_END.finditer(text):
        next_char = text[m.end() : m.end() + 1]
        plain_period = text[m.start()] == "." and text[m.start() + 1].isspace()  # not "x.$": math before it
        word = WORD_BEFORE.search(text, max(0, m.start() - 12), m.start()) if plain_period else None
        abbreviation = word is not None and (len(word.group()) == 1 or "." in word.group()
                                             or word.group().lower() in ABBREVIATIONS)
        if next_char.isupper() and not abbreviation and not inside(m.end()):
            cuts.add(m.end())
    cuts = sorted(cuts - {0, len(text)})
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    merged: list[str] = []  # tiny pieces join the piece after them
    carry = ""
    for piece in pieces:
        carry += piece
        if len(carry.strip()) >= MIN_STEP_CHARS:
            merged.append(carry)
            carry = ""
    if carry:
        if merged:
            merged[-1] += carry
        else:
            merged.append(carry)
    steps: list[str] = []
    offset = 0
    for piece in merged:
        steps.extend(_split_long(piece, offset, inside))
        offset += len(piece)
    return steps or [text]  # the empty response is one (empty) step


def _split_long(piece: str, offset: int, inside) -> list[str]:
    if len(piece) <= MAX_STEP_CHARS:
        return [piece]
    mid = len(piece) / 2
    # candidate cuts: after a space, not inside math, MIN_SPLIT_CHARS from either end; after ",", ":", "and"
    # or "=" preferred
    spaces = [i + 1 for i, ch in enumerate(piece[:-1]) if ch == " " and not inside(offset + i + 1)
              and MIN_SPLIT_CHARS <= i + 1 <= len(piece) - MIN_SPLIT_CHARS]
    preferred = [i for i in spaces if re.search(r"([,:=]|\band)\s$", piece[max(0, i - 5) : i])]
    pool = preferred or spaces
    if not pool:
        return [piece]
    cut = min(pool, key=lambda i: abs(i - mid))
    return _split_long(piece[:cut], offset, inside) + _split_long(piece[cut:], offset + cut, inside)


def token_step_index(token_ends: list[int], step_lengths: list[int]) -> list[int]:
    """The step each token belongs to, from the character offset where each token's text ends.

    A token belongs to the step that holds its last character, so one that straddles a boundary goes
    to the later step; a token with no text (EOS) belongs to the step where the text before it ends.
    """
    bounds = np.cumsum(step_lengths)[:-1].tolist()  # character offsets where steps 1.. start
    return [bisect.bisect_left(bounds, end) if end > 0 else 0 for end in token_ends]


GSM8K_MAX_BOUNDARIES = 25  # VinePPO's GSM8K configs (max_step_for_value_estimation); its MATH configs: no cap


def state_starts(token_step: list[int], num_steps: int, max_boundaries: int | None) -> list[int]:
    """Token offsets where the estimated states end: 0 (the prompt), then the first token of steps 1, 2, ...
    (the state after each step but the last), at most `max_boundaries` of them (None: all). A step that
    holds no token (its text ends inside a straddling token) starts where the next step does."""
    num_estimated = num_steps if max_boundaries is None else min(num_steps, 1 + max_boundaries)
    return [bisect.bisect_left(token_step, i) for i in range(num_estimated)]


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: the 188 printable bytes stand for themselves, the 68
    others (controls, space, ...) for chr(256), chr(257), ... in byte order. Token strings are written in it."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


BYTE_OF_CHAR = byte_level_alphabet()
TO_LATIN1 = str.maketrans({c: chr(b) for c, b in BYTE_OF_CHAR.items()})  # then .encode("latin-1") gives the bytes
CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # 0b10xxxxxx: the 2nd to 4th bytes of a UTF-8 character


def token_char_ends(tokenizer, token_ids: list[int]) -> list[int]:
    """For each token i, len(decode(token_ids[: i + 1])) (special tokens skipped), capped at the length of the
    whole decoded text and made non-decreasing: a prefix can end in half a UTF-8 character, which decodes
    to one replacement character U+FFFD.

    Linear for byte-level BPE tokenizers (a plain ByteLevel decoder: SmolLM2, Qwen2.5, Llama 3). Their
    decode() maps each token's characters back to bytes (a token with a character outside the alphabet,
    such as an added token "my tok", gives its own UTF-8), joins them and decodes the bytes as UTF-8, bad
    bytes replaced. A character never spans the start of a byte that is not a continuation byte, nor more
    than 4 bytes: before the last such point the characters are settled, and only the bytes after it are
    decoded again for each prefix. Other tokenizers, and a text that decode() post-processes (its total
    length differs), decode every prefix: quadratic.
    """
    text_len = len(tokenizer.decode(token_ids, skip_special_tokens=True))
    lengths = None
    if isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), decoders.ByteLevel):
        skipped = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        data = bytearray()  # the bytes of the tokens so far
        settled, settled_chars = 0, 0  # data[:settled] decodes to settled_chars characters, whatever follows
        lead = -4  # position of the last byte that is not a continuation byte
        lengths = []
        for i, piece in zip(token_ids, tokenizer.convert_ids_to_tokens(token_ids)):
            if piece is not None and i not in skipped:
                in_alphabet = set(piece) <= BYTE_OF_CHAR.keys()
                raw = piece.translate(TO_LATIN1).encode("latin-1") if in_alphabet else piece.encode()
                data += raw
                if raw.rstrip(CONTINUATION_BYTES):
                    lead = len(data) - len(raw) + len(raw.rstrip(CONTINUATION_BYTES)) - 1
                # the last point no character spans: the last byte if it is 4 or more past `lead` (a run of
                # stray continuation bytes, one U+FFFD each), else `lead`
                point = len(data) - 1 if len(data) - 1 - lead >= 4 else lead
                if point > settled:
                    settled_chars += len(data[settled:point].decode("utf-8", "replace"))
                    settled = point
            lengths.append(settled_chars + len(data[settled:].decode("utf-8", "replace")))
        if lengths and lengths[-1] != text_len:
            lengths = None
    if lengths is None:
        lengths = [len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)) for i in range(len(token_ids))]
    ends, last = [], 0
    for n in lengths:
        last = max(last, min(text_len, n))
        ends.append(last)
    return ends


def step_advantages(values: list[float], reward: float) -> list[float]:
    """values[i] = V(state before step i) (values[0] is the prompt's): A_i = V_{i+1} - V_i, last: R - V_last."""
    return [values[i + 1] - values[i] for i in range(len(values) - 1)] + [reward - values[-1]]


def estimate_values(generator, tokenizer, prompts: list[list[int]], responses: list[list[int]],
                    starts: list[list[int]], answers: list[str], k: int, max_new_tokens: int,
                    temperature: float, top_p: float, seed: int | None,
                    questions: list[str]) -> tuple[list[list[float]], int]:
    """Monte Carlo values of the states of every response, with identical prefixes sampled once.

    starts[b] lists, for response b, the token offsets where its estimated states end (0 = the
    prompt); answers[b] and questions[b] are its problem's, for the grader. Returns V for each of them
    (the mean reward of k continuations) and the number of distinct prefixes sampled. Each continuation
    is generated with exactly the budget its prefix leaves of the response's: max_new_tokens minus the
    prefix's response tokens. One cut by that budget is unfinished and scores 0, as the whole response
    would be.
    """
    unique: dict[tuple[int, ...], int] = {}
    keys = []  # keys[b][i]: index of the prefix of state i of response b in `unique`
    for prompt, response, response_starts in zip(prompts, responses, starts):
        row = []
        for start in response_starts:
            key = tuple(prompt + response[:start])
            row.append(unique.setdefault(key, len(unique)))
        keys.append(row)
    prefixes = list(unique)
    owner = {}  # prefix index -> (prompt length, gold answer, question); equal prefixes have equal prompts
    for b, row in enumerate(keys):
        for u in row:
            owner[u] = (len(prompts[b]), answers[b], questions[b])
    # One batched call for all prefixes, each with its own budget: what its response prefix left.
    budgets = [max_new_tokens - (len(p) - owner[u][0]) for u, p in enumerate(prefixes)]
    outs = generator.generate([list(p) for p in prefixes], n=k, max_new_tokens=budgets,
                              temperature=temperature, top_p=top_p, seed=seed)
    means = []
    for u, (prefix, conts) in enumerate(zip(prefixes, outs)):
        prompt_len, answer, question = owner[u]
        response_prefix = list(prefix[prompt_len:])
        rewards = []
        for c in conts:  # unfinished = cut by its budget: 0, as outcome_rewards scores a truncated response
            text = tokenizer.decode(response_prefix + c.token_ids, skip_special_tokens=True)
            rewards.append(grade(text, answer, question=question) if c.finished else 0.0)
        means.append(float(np.mean(rewards)))
    return [[means[u] for u in row] for row in keys], len(prefixes)


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
# A logged statistic, and the checks of the arguments.
# ---------------------------------------------------------------------------------------------------------
def correlation(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    if np.std(x) < 1e-12 or np.std(y) < 1e-12:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def check_args(args: Args) -> None:
    """Reject out-of-range values and inconsistent batch sizes before anything is loaded or written."""
    check_shared_args(args)
    check_ranges(args, {">= 1": ["num_mc_rollouts"], ">= 0": ["kl_coef", "max_estimated_steps"],
                        "> 0": ["clip_eps", "max_ratio"]})


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
    # reference therefore starts above 0 (a floor of rounding, docs/vineppo.md), not at exactly 0.
    ref_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    # Fail now, with one line, if the run clearly cannot fit (estimated from the config: no weight is loaded).
    check_memory(args.model, device, trainable=1, frozen=1, frozen_dtype=ref_dtype, backend=args.backend,
                 vllm_share=args.vllm_gpu_memory_utilization, micro_batch=args.micro_batch_size,
                 max_new_tokens=args.max_new_tokens, checkpointing=checkpointing, **memory_layout(args))
    style = args.step_style if args.step_style != "auto" else ("math" if args.dataset == "math" else "newline")
    # Step boundaries estimated per response: VinePPO's GSM8K configs cap them at 25, its MATH configs do not.
    max_boundaries = args.max_estimated_steps if args.max_estimated_steps is not None else \
        (GSM8K_MAX_BOUNDARIES if style == "newline" else None)

    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    eval_problems = load_problems(args.dataset, "test", size=args.num_eval_problems, seed=0)
    tokenizer = load_tokenizer(args.model)
    # The policy: LoRA adapters with --lora-rank; under torchrun wrapped in DDP (or FSDP2 with --fsdp).
    policy = dist.wrap(load_trained(args, device, checkpointing), args.fsdp)
    reference = load_reference(args, policy, ref_dtype, device)  # with LoRA: the policy with its adapters off
    # AdamW as VinePPO's code sets it (eps 1e-8, no weight decay), warm-up then linear decay over the run's
    # optimizer steps: num_steps x num_epochs x minibatches per batch.
    total_opt_steps = args.num_steps * args.num_epochs * (args.batch_size // args.minibatch_size)
    schedule = lambda s: lr_multiplier(s, total_opt_steps, args.warmup_ratio, args.lr_decay)  # noqa: E731
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                   weight_decay=args.weight_decay)
    policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, schedule)
    generator = make_run_generator(args, policy, tokenizer)

    # The run folder, metrics, checkpoints (with --resume: everything below restored from the newest one).
    # The run-long state is that of ppo.py (weights, optimizer, schedule, random generators): the Monte Carlo
    # continuations are seeded by the step, so a resumed run samples the same ones.
    run = Run(args, "vineppo.py", models={"policy": policy}, optimizers={"policy": policy_opt},
              schedulers={"policy": policy_sched}, generator=generator, tokenizer=tokenizer, eval_problems=eval_problems)

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
        batch = make_batch([p for p in prompts for _ in range(args.samples_per_prompt)],
                           [c.token_ids for c in completions], tokenizer.pad_token_id)
        mask = batch.response_mask.to(device)  # (B, T), on the run's device as every (B, T) tensor the loss reads
        lengths = mask.sum(1).long()  # (B,)

        # 2.3 VinePPO's own part: Monte Carlo values at step boundaries, then old and reference log-probs.
        t0 = time.time()
        #   a. split each response into steps and find the step of every token
        token_steps, num_steps, starts = [], [], []  # per sample: step of each token; steps; state starts
        for c in completions:
            steps = split_into_steps(c.text, style)
            token_step = token_step_index(token_char_ends(tokenizer, c.token_ids), [len(x) for x in steps])
            token_steps.append(token_step)
            num_steps.append(len(steps))
            starts.append(state_starts(token_step, len(steps), max_boundaries))
        #   b. K continuations from every distinct state (prompt included), in one batched call
        mc_values, num_prefixes = estimate_values(
            generator, tokenizer, [p for p in prompts for _ in range(args.samples_per_prompt)],
            [c.token_ids for c in completions], starts, answers, args.num_mc_rollouts, args.max_new_tokens,
            args.temperature, args.top_p, seed=args.seed * 100_003 + step + 50_000, questions=questions)
        #   c. step advantages V(s_{i+1}) - V(s_i), last R - V(s_last); states past the cap take V = R
        advantages = torch.zeros(mask.shape)  # (B, T), filled row by row on the CPU
        all_step_advantages = []
        for b, (token_step, values) in enumerate(zip(token_steps, mc_values)):
            values = values + [float(scores[b])] * (num_steps[b] - len(values))
            adv = step_advantages(values, float(scores[b]))
            all_step_advantages += adv
            advantages[b, : len(token_step)] = torch.tensor([adv[i] for i in token_step])
        t_mc = time.time() - t0
        raw_advantages = np.array(all_step_advantages)
        advantages = advantages.to(device)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        # Under torchrun every rank holds the whole batch, its Monte Carlo values (the continuations were
        # generated split over the ranks) and its advantages; each trains on its share of the prompts with all
        # their samples (B below is then B / ranks). Without torchrun the share is every row.
        batch = batch.rows(dist.share(torch.arange(len(mask))))
        mask, advantages = batch.response_mask.to(device), dist.share(advantages)[:, : batch.response_mask.shape[1]]
        #   d. old and reference log-probs. The micro-batches are fixed once per step: these no-grad passes
        #   and every epoch of the update see the same rows with the same padding, so in bf16 they run the
        #   same arithmetic and the ratio is exactly 1 at unchanged weights. The epochs shuffle the order of
        #   micro-batches, not their contents.
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
                        pg_loss, clipfrac, approx_kl, ratio = ppo_policy_loss(
                            logprobs, cut(old_logprobs), cut(advantages), m, args.clip_eps, cut(is_weights))
                        kl = kl_k3(logprobs, cut(ref_logprobs), m).sum(1).mean()  # summed per sequence
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

        # 2.5 Log; evaluate every eval_every steps.
        kl_k1 = ((old_logprobs - ref_logprobs) * mask).sum(1).mean()
        prompt_values = [mc_values[i * args.samples_per_prompt][0] for i in range(args.num_prompts)]
        group_means = scores.view(args.num_prompts, args.samples_per_prompt).mean(1).tolist()
        step_time = time.time() - t_step
        logs = {
            "charts/reward_mean": scores.mean(), "charts/response_length": lengths.float().mean(),
            "charts/truncated_frac": 1 - np.mean([c.finished for c in completions]),
            "charts/step_time": step_time, "charts/learning_rate": lr,
            "losses/policy_loss": np.mean(stats["policy_loss"]),
            "losses/clipfrac": np.mean(stats["clipfrac"]), "losses/approx_kl": np.mean(stats["approx_kl"]),
            "losses/entropy": np.mean(stats["entropy"]), "losses/kl_ref_k3": np.mean(stats["kl_k3"]),
            "losses/kl_ref_k1": kl_k1, "losses/skipped": skipped,
            "time/generation": t_gen, "time/reference": t_ref, "time/mc_values": t_mc, "time/update": t_update,
            **mismatch,  # the sampler-learner mismatch and the rollout correction's weights
            "time/mc_share": t_mc / step_time,  # a wall-clock ratio: under time/, as the other timings
            "vine/continuations": num_prefixes * args.num_mc_rollouts,
            "vine/mean_abs_advantage": np.abs(raw_advantages).mean(),
            "vine/zero_advantage_frac": (raw_advantages == 0).mean(),
            "vine/prompt_value_corr": correlation(prompt_values, group_means),
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
