"""PRIME (Cui et al. 2025, arXiv 2502.01456): dense token rewards from an implicit process reward model (PRM)
trained online from outcome labels only. No critic.

Three models start from the same weights: the policy, the implicit PRM (a causal LM that is trained) and
a frozen reference. The PRM's token reward is r_t = beta * (log pi_prm(y_t | y_<t) - log pi_ref(y_t | y_<t)),
exactly 0 at the start. Each step, the PRM is trained with a cross-entropy loss that makes
sigmoid(beta * sum_t of that log-ratio) predict the outcome (correct / wrong), so the sum of the token
rewards learns to be a log-odds of success and each token's share of it a process reward. The policy's
advantage is RLOO over K samples per prompt, in two parts computed separately and added: the outcome
part R_i - mean_{j != i} R_j, and the process part, at token t the sum over later tokens of
r_s - mean_{j != i}(mean token reward of response j). PPO clipped loss, no KL. Prompts whose K samples
are all right or all wrong teach nothing: an online filter keeps prompts with 20% to 80% right.

Choices and departures (shared/docs/ALGORITHMS.md section 3):
- `--process-reward-coef 0` is plain RLOO with outcome rewards only, the paper's baseline, from this file.
- The process returns are used as the paper writes them. The official code also divides them by the
  batch's largest absolute return and whitens the sum of both parts: `--official-normalisation`. It is
  off by default so that `--process-reward-coef 0` is exactly the RLOO the paper compares against.
- The policy's rewards come from the PRM before this step's PRM update (the paper's default, "single
  forward"); `--prm-update-first` updates the PRM first and re-reads them.
- Defaults sized for the offline CPU run as in ppo.py (8 prompts x K = 4, lr 1e-5 for policy and PRM,
  T = 0.6, 128 new tokens); the paper: 256 prompts x 4, policy lr 5e-7, PRM lr 1e-6, T = 1.0.
- `--ref-on-cpu` keeps the frozen reference on the CPU when GPU memory is short.

Run:  python prime_implicit_prm.py                                         # CPU, offline, default
      python prime_implicit_prm.py --process-reward-coef 0                 # the RLOO baseline
      python prime_implicit_prm.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset math --backend vllm   # one GPU
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
import torch.nn.functional as F
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
    exp_name: str = "prime"
    """name of the experiment, first part of the run folder"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    bf16: bool = True
    """compute forwards and backwards under bfloat16 autocast (weights and optimizer stay float32)"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy and the PRM"""
    num_prompts: int = 8
    """prompts per iteration (after the accuracy filter)"""
    samples_per_prompt: int = 4
    """K: responses sampled per prompt (RLOO's group); the batch is num_prompts * K samples"""
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
    beta: float = 0.05
    """scale of the implicit process reward beta * (log pi_prm - log pi_ref)"""
    prm_learning_rate: float = 1e-5
    """AdamW learning rate of the implicit PRM (the paper: 1e-6 at its scale)"""
    process_reward_coef: float = 1.0
    """weight of the process part of the advantage (0: plain RLOO with outcome rewards, the baseline)"""
    prm_update_first: bool = False
    """update the PRM before reading the policy's rewards (default: rewards from the PRM before its update)"""
    official_normalisation: bool = False
    """official code: process returns / the batch's largest |return|, then whiten the sum of both parts"""
    filter_low: float = 0.2
    """keep prompts whose K samples are right at least this often..."""
    filter_high: float = 0.8
    """...and at most this often"""
    max_prompt_draws: int = 4
    """draw at most this many times num_prompts prompts per step to fill the batch (then go with what passed)"""
    no_filter: bool = False
    """keep every prompt"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    kl_coef: float = 0.0
    """coefficient of a k3 KL to the reference in the loss (the paper: none)"""
    ref_on_cpu: bool = False
    """keep the frozen reference on the CPU (slower; for GPUs short of memory)"""

    # ---- computed at runtime ----
    batch_size: int = 0
    """(computed) samples per iteration when the filter fills the batch: num_prompts * samples_per_prompt"""


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
    return centred.flip(1).cumsum(1).flip(1) * mask  # reverse cumulative sum: returns to go


def accuracy_filter(scores: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(num_prompts, K) outcome rewards -> (num_prompts,) bool: keep prompts right between low and high of
    the time (both ends included), i.e. those whose samples disagree and so carry a learning signal."""
    accuracy = scores.float().mean(1)
    return (accuracy >= low - 1e-9) & (accuracy <= high + 1e-9)


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
    if args.samples_per_prompt < 2:
        raise SystemExit("error: RLOO needs --samples-per-prompt of at least 2 (a leave-one-out baseline)")
    if not 0 <= args.filter_low <= args.filter_high <= 1 or args.max_prompt_draws < 1:
        raise SystemExit("error: need 0 <= --filter-low <= --filter-high <= 1 and --max-prompt-draws >= 1")
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
    # The PRM and the reference start as copies of the policy. With --process-reward-coef 0 (plain RLOO) the
    # PRM is not needed, and the reference only for a KL term.
    use_prm = args.process_reward_coef != 0
    prm = load_model(args.model, device=device, gradient_checkpointing=args.gradient_checkpointing) if use_prm else None
    reference = load_model(args.model, device="cpu" if args.ref_on_cpu else device).eval().requires_grad_(False) \
        if use_prm or args.kl_coef > 0 else None
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=1e-5)
    prm_opt = torch.optim.AdamW(prm.parameters(), lr=args.prm_learning_rate, eps=1e-5) if use_prm else None
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
    cursor = 0  # next training problem to draw
    progress = tqdm(range(1, args.num_steps + 1), desc=args.exp_name, dynamic_ncols=True)
    for step in progress:
        t_step = time.time()

        # 2.1 Sample prompts, generate K responses each and grade them; keep the prompts the accuracy filter
        #     accepts (some right, some wrong), drawing more until num_prompts are kept or the draws run out.
        t0 = time.time()
        K = args.samples_per_prompt
        problems, prompts, completions, score_rows = [], [], [], []
        drawn = 0
        for draw in range(args.max_prompt_draws):
            first = (cursor + drawn) % len(train_problems)
            candidates = [train_problems[(first + i) % len(train_problems)] for i in range(args.num_prompts)]
            drawn += args.num_prompts
            candidate_prompts = [prompt_ids(tokenizer, p.question) for p in candidates]
            outs = generator.generate(candidate_prompts, n=K, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p,
                                      seed=args.seed * 100_003 + step * 101 + draw)
            rows = torch.tensor([outcome_rewards([c.text for c in row], [c.finished for c in row], [p.answer] * K)
                                 for p, row in zip(candidates, outs)])  # (num_prompts, K)
            keep = torch.ones(len(rows), dtype=torch.bool) if args.no_filter else \
                accuracy_filter(rows, args.filter_low, args.filter_high)
            for i in keep.nonzero().flatten().tolist()[: args.num_prompts - len(problems)]:
                problems.append(candidates[i])
                prompts.append(candidate_prompts[i])
                completions += outs[i]
                score_rows.append(rows[i])
            if len(problems) == args.num_prompts:
                break
        cursor += drawn
        t_gen = time.time() - t0
        filter_stats = {"prime/filter_acceptance": len(problems) / drawn,
                        "prime/prompts_drawn_per_kept": drawn / max(1, len(problems))}
        if not problems:  # every drawn prompt was all right or all wrong: nothing to learn from this step
            history.write(json.dumps({"step": step, "wall_s": time.time() - start_time, **filter_stats}) + "\n")
            tqdm.write(f"step {step}: no prompt passed the filter in {drawn} draws; skipping the update")
            continue

        # 2.2 The kept batch: B = len(problems) * K samples, prompt-major; outcome reward on the EOS token.
        scores = torch.stack(score_rows).flatten()  # (B,)
        batch = make_batch([p for p in prompts for _ in range(K)], [c.token_ids for c in completions],
                           tokenizer.pad_token_id)
        mask = batch.response_mask  # (B, T)
        lengths = mask.sum(1).long()  # (B,)
        B = len(scores)

        # 2.3 PRIME's own part: log-probs of the policy (old), the reference and the PRM; implicit process
        #     rewards; one PRM update with the outcome labels; RLOO advantages in two parts.
        t0 = time.time()
        with torch.no_grad(), autocast():
            policy.eval()
            old_logprobs = in_micro_batches(lambda b: response_logprobs(policy, b, args.temperature), batch,
                                            args.micro_batch_size) * mask  # (B, T)
            ref_logprobs = in_micro_batches(lambda b: response_logprobs(reference, b, args.temperature), batch,
                                            args.micro_batch_size) * mask if reference is not None else None
        t_ref = time.time() - t0
        t0 = time.time()
        prime_stats = {}
        process_adv = torch.zeros_like(mask)  # (B, T)
        if use_prm:
            def prm_rewards():
                with torch.no_grad(), autocast():
                    prm.eval()
                    prm_logprobs = in_micro_batches(lambda b: response_logprobs(prm, b, args.temperature), batch,
                                                    args.micro_batch_size) * mask
                return implicit_process_rewards(prm_logprobs, ref_logprobs, mask, args.beta)  # (B, T)

            #   a. process rewards from the PRM before its update (the paper's default)
            token_rewards = prm_rewards()
            implicit_logits = token_rewards.sum(1)  # (B,) beta * sum of the log-ratio: the PRM's outcome log-odds
            prime_stats["prime/prm_accuracy"] = float(((implicit_logits > 0).float() == scores).float().mean())
            #   b. one pass of the cross-entropy update of the PRM on this batch's outcome labels
            prm.train()
            prm_losses = []
            for mb in torch.randperm(B).split(args.minibatch_size):
                for micro in mb.split(args.micro_batch_size):
                    sub = batch.rows(micro)
                    m = sub.response_mask
                    with autocast():
                        prm_logprobs = response_logprobs(prm, sub, args.temperature)
                        loss = prm_ce_loss(prm_logprobs, ref_logprobs[micro, : m.shape[1]], m, scores[micro], args.beta)
                    (loss * len(micro) / len(mb)).backward()
                    prm_losses.append(float(loss.detach()))
                torch.nn.utils.clip_grad_norm_(prm.parameters(), args.max_grad_norm)
                prm_opt.step()
                prm_opt.zero_grad(set_to_none=True)
            if args.prm_update_first:
                token_rewards = prm_rewards()
            #   c. the process part: returns to go of r_t minus the leave-one-out mean token reward
            process_adv = rloo_process_advantages(token_rewards, mask, K)  # (B, T)
            mean_token_reward = (token_rewards.sum(1) / lengths)  # (B,)
            prime_stats |= {
                "prime/prm_loss": np.mean(prm_losses),
                "prime/process_reward_correct": float(mean_token_reward[scores == 1].mean()) if (scores == 1).any() else float("nan"),
                "prime/process_reward_wrong": float(mean_token_reward[scores == 0].mean()) if (scores == 0).any() else float("nan"),
            }
        t_prm = time.time() - t0
        #   d. the outcome part R_i - mean_{j != i} R_j on every token, plus the weighted process part
        outcome_adv = rloo_outcome_advantages(scores.view(-1, K)).flatten()[:, None] * mask  # (B, T)
        if args.official_normalisation:
            process_adv = process_adv / process_adv.abs().max().clamp(min=1e-8)
        advantages = outcome_adv + args.process_reward_coef * process_adv
        if args.official_normalisation:
            advantages = masked_whiten(advantages, mask)

        # 2.4 Update: num_epochs passes over shuffled minibatches, gradients accumulated over micro-batches.
        #     (The filter may leave fewer than num_prompts prompts, so the last minibatch may be smaller.)
        t0 = time.time()
        policy.train()
        stats = {k: [] for k in ("policy_loss", "clipfrac", "approx_kl", "entropy", "kl_k3")}
        for _ in range(args.num_epochs):
            for mb in torch.randperm(B).split(args.minibatch_size):
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
                        kl = (kl_k3(logprobs, cut(ref_logprobs)) * m).sum(1).mean() if args.kl_coef > 0 \
                            else torch.zeros(())  # summed per sequence
                    # weight turns micro-batch token means into the minibatch token mean; the KL, a mean
                    # over sequences, takes each micro-batch's share of the minibatch's sequences.
                    (pg_loss * weight + args.kl_coef * kl * len(micro) / len(mb)).backward()
                    for k, v in (("policy_loss", pg_loss), ("clipfrac", clipfrac), ("approx_kl", approx_kl),
                                 ("entropy", masked_mean(entropy, m)), ("kl_k3", kl)):
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
            "time/generation": t_gen, "time/reference": t_ref, "time/prm": t_prm, "time/update": t_update,
            "prime/prm_time_share": t_prm / step_time, **filter_stats, **prime_stats,
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
