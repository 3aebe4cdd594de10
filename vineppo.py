"""VinePPO (Kazemnejad et al. 2024, arXiv 2410.01679): PPO without a critic. A language environment can be
reset to any prefix, so the value of a state is estimated without bias by sampling K continuations from
it and averaging their rewards.

Each response is split into reasoning steps (lines for GSM8K-like text, sentences with math spans kept
whole for MATH). For the prompt and for the prefix after every step but the last, K continuations are
sampled with the training sampler; V(s_i) is their mean reward. Step i's advantage is
V(s_{i+1}) - V(s_i), the last step's is R - V(s_last); every token takes its step's advantage. The rest
is ppo.py: whitened advantages, clipped surrogate, k3 KL to the reference in the loss. `diff ppo.py
vineppo.py` shows the idea and little else.

Departures from the paper (shared/docs/ALGORITHMS.md section 2):
- Defaults sized for the offline CPU run, as in ppo.py (8 prompts x 4 samples, lr 1e-5, 128 new tokens).
  K = 9 as in the paper's main runs: on the CPU this makes the continuations most of the step's time.
- A continuation may use only the response budget left after its prefix (max_new_tokens minus the
  prefix length); one that runs past it is truncated and scores 0, as the original response would.
- A token that straddles a step boundary belongs to the step in which it ends: the state "after step i"
  must be a token prefix, and the prefix that stops before that token is the one the policy sampled from.

Run:  python vineppo.py                                                        # CPU, offline, default
      python vineppo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --backend vllm   # one GPU
"""

from __future__ import annotations

import contextlib
import bisect
import json
import os
import random
import re
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
    exp_name: str = "vineppo"
    """name of the experiment, first part of the run folder"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: bool = True
    """compute forwards and backwards under bfloat16 autocast (weights and optimizer stay float32)"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy"""
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
    num_mc_rollouts: int = 9
    """K: continuations sampled from each state to estimate its value"""
    step_style: Literal["auto", "newline", "math"] = "auto"
    """how responses are split into reasoning steps (auto: math for the math dataset, else newline)"""
    max_estimated_steps: int = 25
    """states estimated per response (the paper's GSM8K cap); later states take V = R (advantage 0)"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    kl_coef: float = 1e-4
    """coefficient of the k3 KL to the reference in the loss (summed per sequence)"""
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


MATH_SPAN = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\\[.*?\\\]|\\\(.*?\\\)|\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)
MIN_STEP_CHARS = 10  # "math" style: pieces shorter than this (stripped) are merged into the next one
MAX_STEP_CHARS = 100  # "math" style: pieces longer than this are split near their middle


def split_into_steps(text: str, style: str) -> list[str]:
    """Split a response into reasoning steps; `"".join(steps) == text` always, and there is >= 1 step.

    "newline" (GSM8K): a step per line (blank lines stay with the line before); a final `#### n` line
    is merged into the step before it.
    "math" (MATH): cut after line ends and after sentence ends (. ! ? followed by a space), never inside
    a math span ($...$, $$...$$, \\[...\\], \\(...\\), \\begin..\\end); pieces of under MIN_STEP_CHARS
    are merged into the next one; pieces over MAX_STEP_CHARS are split at the space (preferably after
    a comma, "and" or "=") nearest their middle, again outside math spans.
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
    protected = [(m.start(), m.end()) for m in MATH_SPAN.finditer(text)]
    inside = lambda i: any(a < i < b for a, b in protected)  # noqa: E731  a cut at i splits a span
    cuts = sorted({m.end() for m in re.finditer(r"\n+|[.!?]\s+", text) if not inside(m.end())} - {0, len(text)})
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
    # candidate cuts: after a space, not inside math; a space after ",", "and" or "=" is preferred
    spaces = [i + 1 for i, ch in enumerate(piece[:-1]) if ch == " " and not inside(offset + i + 1)]
    preferred = [i for i in spaces if re.search(r"(,|\band|=)\s$", piece[max(0, i - 5) : i])]
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


def token_char_ends(tokenizer, token_ids: list[int]) -> list[int]:
    """For each token, the length of the decoded text up to and including it (capped, non-decreasing)."""
    text_len = len(tokenizer.decode(token_ids, skip_special_tokens=True))
    ends, last = [], 0
    for i in range(len(token_ids)):
        # decoding a prefix can end in half a UTF-8 character (one replacement char): cap and keep monotone
        last = max(last, min(text_len, len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True))))
        ends.append(last)
    return ends


def step_advantages(values: list[float], reward: float) -> list[float]:
    """values[i] = V(state before step i) (values[0] is the prompt's): A_i = V_{i+1} - V_i, last: R - V_last."""
    return [values[i + 1] - values[i] for i in range(len(values) - 1)] + [reward - values[-1]]


def estimate_values(generator, tokenizer, prompts: list[list[int]], responses: list[list[int]],
                    state_starts: list[list[int]], answers: list[str], k: int, max_new_tokens: int,
                    temperature: float, top_p: float, seed: int | None) -> tuple[list[list[float]], int]:
    """Monte Carlo values of the states of every response, with identical prefixes sampled once.

    state_starts[b] lists, for response b, the token offsets where its estimated states end (0 = the
    prompt). Returns V for each of them (the mean reward of k continuations) and the number of distinct
    prefixes sampled. A continuation may use the budget left after its prefix; past it, it scores 0.
    """
    unique: dict[tuple[int, ...], int] = {}
    keys = []  # keys[b][i]: index of the prefix of state i of response b in `unique`
    for prompt, response, starts in zip(prompts, responses, state_starts):
        row = []
        for start in starts:
            key = tuple(prompt + response[:start])
            row.append(unique.setdefault(key, len(unique)))
        keys.append(row)
    prefixes = list(unique)
    owner = {}  # prefix index -> (prompt length, gold answer); equal prefixes have equal prompts
    for b, row in enumerate(keys):
        for u in row:
            owner[u] = (len(prompts[b]), answers[b])
    # One batched call for all prefixes, long enough for the one with the most budget left.
    shortest = min(len(p) - owner[u][0] for u, p in enumerate(prefixes))
    outs = generator.generate([list(p) for p in prefixes], n=k, max_new_tokens=max_new_tokens - shortest,
                              temperature=temperature, top_p=top_p, seed=seed)
    means = []
    for u, (prefix, conts) in enumerate(zip(prefixes, outs)):
        prompt_len, answer = owner[u]
        response_prefix = list(prefix[prompt_len:])
        rewards = []
        for c in conts:
            within = len(response_prefix) + len(c.token_ids) <= max_new_tokens
            text = tokenizer.decode(response_prefix + c.token_ids, skip_special_tokens=True)
            rewards.append(grade(text, answer) if c.finished and within else 0.0)
        means.append(float(np.mean(rewards)))
    return [[means[u] for u in row] for row in keys], len(prefixes)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float):
    """Clipped surrogate, token mean. Returns (loss, clip fraction, approx KL(old || new))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
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


def response_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False):
    """Log-prob of each response token under `model` at the sampling temperature: (B, T) [, entropy (B, T)]."""
    dev = model.device
    logits = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                   position_ids=batch.position_ids.to(dev), use_cache=False).logits
    T = batch.response_mask.shape[1]
    logits = logits[:, batch.prompt_width - 1 : batch.prompt_width - 1 + T].float() / temperature
    targets = batch.input_ids[:, batch.prompt_width :].to(dev)
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    if not with_entropy:
        return token_logprobs
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1).cpu()
    return token_logprobs, entropy


def in_micro_batches(fn, batch: Batch, size: int) -> torch.Tensor:
    """fn over micro-batches of `size` rows, outputs padded back to the batch's T and concatenated."""
    T = batch.response_mask.shape[1]
    outs = [fn(batch.rows(slice(i, i + size))) for i in range(0, batch.input_ids.shape[0], size)]
    return torch.cat([torch.nn.functional.pad(o, (0, T - o.shape[1])) for o in outs])


# ---------------------------------------------------------------------------------------------------------
# Evaluation and logging helpers.
# ---------------------------------------------------------------------------------------------------------
def evaluate(generator, tokenizer, problems, max_new_tokens: int) -> tuple[float, list[tuple[str, str, float]]]:
    """Greedy accuracy on held-out problems, and (question, response, score) for each."""
    outs = generator.generate([prompt_ids(tokenizer, p.question) for p in problems], n=1,
                              max_new_tokens=max_new_tokens, temperature=0.0)
    scores = outcome_rewards([o[0].text for o in outs], [o[0].finished for o in outs], [p.answer for p in problems])
    return float(np.mean(scores)), [(p.question, o[0].text, s) for p, o, s in zip(problems, outs, scores)]


def correlation(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    if np.std(x) < 1e-12 or np.std(y) < 1e-12:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


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
    if args.num_mc_rollouts < 1 or args.max_estimated_steps < 1:
        raise SystemExit("error: --num-mc-rollouts and --max-estimated-steps must be at least 1")
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

    style = args.step_style if args.step_style != "auto" else ("math" if args.dataset == "math" else "newline")
    train_problems = load_problems(args.dataset, "train", size=args.num_train_problems, seed=args.seed)
    eval_problems = load_problems(args.dataset, "test", size=args.num_eval_problems, seed=0)
    tokenizer = load_tokenizer(args.model)
    policy = load_model(args.model, device=device, gradient_checkpointing=args.gradient_checkpointing)
    reference = load_model(args.model, device=device).eval().requires_grad_(False)
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

        # 2.3 VinePPO's own part: old and reference log-probs, then Monte Carlo values at step boundaries.
        t0 = time.time()
        with torch.no_grad(), autocast():
            policy.eval()
            old_logprobs = in_micro_batches(lambda b: response_logprobs(policy, b, args.temperature), batch,
                                            args.micro_batch_size) * mask  # (B, T)
            ref_logprobs = in_micro_batches(lambda b: response_logprobs(reference, b, args.temperature), batch,
                                            args.micro_batch_size) * mask  # (B, T)
        t_ref = time.time() - t0
        t0 = time.time()
        #   a. split each response into steps and find the step of every token
        token_steps, num_steps, state_starts = [], [], []  # per sample: step of each token; steps; state starts
        for c in completions:
            steps = split_into_steps(c.text, style)
            token_step = token_step_index(token_char_ends(tokenizer, c.token_ids), [len(x) for x in steps])
            token_steps.append(token_step)
            num_steps.append(len(steps))
            # the state before step i is the prefix of tokens before the first token of step >= i
            num_estimated = min(len(steps), args.max_estimated_steps)
            state_starts.append([bisect.bisect_left(token_step, i) for i in range(num_estimated)])
        #   b. K continuations from every distinct state (prompt included), in one batched call
        mc_values, num_prefixes = estimate_values(
            generator, tokenizer, [p for p in prompts for _ in range(args.samples_per_prompt)],
            [c.token_ids for c in completions], state_starts, answers, args.num_mc_rollouts, args.max_new_tokens,
            args.temperature, args.top_p, seed=args.seed * 100_003 + step + 50_000)
        #   c. step advantages V(s_{i+1}) - V(s_i), last R - V(s_last); states past the cap take V = R
        advantages = torch.zeros_like(mask)  # (B, T)
        all_step_advantages = []
        for b, (token_step, values) in enumerate(zip(token_steps, mc_values)):
            values = values + [float(scores[b])] * (num_steps[b] - len(values))
            adv = step_advantages(values, float(scores[b]))
            all_step_advantages += adv
            advantages[b, : len(token_step)] = torch.tensor([adv[i] for i in token_step])
        t_mc = time.time() - t0
        raw_advantages = np.array(all_step_advantages)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

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
                                                                       m, args.clip_eps)
                        kl = (kl_k3(logprobs, cut(ref_logprobs)) * m).sum(1).mean()  # summed per sequence
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
        kl_k1 = ((old_logprobs - ref_logprobs) * mask).sum(1).mean()
        prompt_values = [mc_values[i * args.samples_per_prompt][0] for i in range(args.num_prompts)]
        group_means = scores.view(args.num_prompts, args.samples_per_prompt).mean(1).tolist()
        step_time = time.time() - t_step
        logs = {
            "charts/reward_mean": scores.mean(), "charts/response_length": lengths.float().mean(),
            "charts/truncated_frac": 1 - np.mean([c.finished for c in completions]),
            "charts/step_time": step_time, "charts/learning_rate": args.learning_rate,
            "losses/policy_loss": np.mean(stats["policy_loss"]),
            "losses/clipfrac": np.mean(stats["clipfrac"]), "losses/approx_kl": np.mean(stats["approx_kl"]),
            "losses/entropy": np.mean(stats["entropy"]), "losses/kl_ref_k3": np.mean(stats["kl_k3"]),
            "losses/kl_ref_k1": kl_k1,
            "time/generation": t_gen, "time/reference": t_ref, "time/mc_values": t_mc, "time/update": t_update,
            "vine/continuations": num_prefixes * args.num_mc_rollouts, "vine/mc_time_share": t_mc / step_time,
            "vine/mean_abs_advantage": np.abs(raw_advantages).mean(),
            "vine/zero_advantage_frac": (raw_advantages == 0).mean(),
            "vine/prompt_value_corr": correlation(prompt_values, group_means),
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
