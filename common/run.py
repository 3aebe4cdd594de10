"""A training run's bookkeeping, the same for every trainer: its folder, metrics, checkpoints, clock and
evaluation. Nothing in here knows what the algorithm computes; a trainer hands it dictionaries of numbers.

    args = resume_args(Args, args)            # --resume: the arguments the run was started with
    check_args(args)                          # the script's own checks (check_shared_args inside)
    device, autocast, checkpointing = setup(args)
    ... load data and models, build optimizers and the generator ...
    run = Run(args, "ppo.py", models={"policy": policy, "critic": critic}, optimizers=..., schedulers=...,
              generator=generator, tokenizer=tokenizer, eval_problems=eval_problems)
    for step in run.steps():                  # evaluates at step 0, or restores the random generators
        ... the algorithm's step ...
        run.log(step, {"charts/reward_mean": ..., "losses/policy_loss": ...})
        if run.end_step(step):                # evaluation, checkpoint, Ctrl-C, --max-minutes
            break
    run.finish(policy, tokenizer)             # the final model, unless Ctrl-C stopped the run

What a run folder holds (`{output_dir}/{exp_name}__{seed}__{unix time}`):
- `args.json`: every argument, read back by --resume;
- `metrics.jsonl`: one JSON line per step (`step`, `wall_s` and every logged number) and one per evaluation
  (`step`, `eval_accuracy`, `wall_s`); a resumed run first cuts it back to what its checkpoint had seen;
- TensorBoard events (the same numbers, the hyperparameters, and a few evaluation samples as text); with
  --track the same numbers go to Weights & Biases too (its files under `wandb/` in the run folder);
- `checkpoints/step_NNNNNN/` (common/checkpoint.py) and `final_model/` (save_pretrained, written whole or not
  at all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

from common.args import check_device, check_ranges
from common.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, saved_args, set_rng_state
from common.data import default_max_new_tokens, prompt_ids
from common.generation import make_generator
from common.grading import grade
from common.models import default_device, resolve_model_path


# ---------------------------------------------------------------------------------------------------------
# Before anything is loaded: the arguments, the random generators, the device.
# ---------------------------------------------------------------------------------------------------------
def resume_args(cls, args):
    """With --resume DIR, the arguments DIR's run was started with (its args.json) and DIR as the run folder;
    without, `args` unchanged. A folder of another script's run, or one without a checkpoint, is refused here,
    in one line, before any model is loaded."""
    if args.resume is None:
        return args
    saved = saved_args(args.resume)
    known = {f.name for f in dataclasses.fields(cls)}
    if set(saved) != known:
        alien = sorted(set(saved) ^ known)[:3]
        raise SystemExit(f"error: {args.resume} is not a run of this script (its args.json differs in "
                         f"{', '.join(alien)}): resume it with the script that started it")
    if latest_checkpoint(args.resume) is None:
        raise SystemExit(f"error: {args.resume} has no checkpoint yet (runs write them with --save-every N, or on Ctrl-C)")
    return cls(**{**saved, "resume": args.resume})


def check_shared_args(args) -> None:
    """The checks of the flags every trainer shares (each script's check_args adds its own): ranges (a rollout
    correction's cap below 1 would cut even the weights of tokens where sampler and learner agree), batch sizes
    that divide, the response length default, CUDA and wandb present when asked for."""
    check_ranges(args, {
        ">= 1": ["num_steps", "num_prompts", "samples_per_prompt", "max_new_tokens", "num_epochs", "minibatch_size",
                 "micro_batch_size", "gen_batch_size", "num_train_problems", "num_eval_problems", "eval_every",
                 "keep_checkpoints", "vllm_max_model_len", "rollout_correction_cap"],
        ">= 0": ["learning_rate", "weight_decay", "num_logged_samples", "save_every"],
        "> 0": ["temperature", "adam_eps", "max_grad_norm", "max_minutes"],
        "in (0, 1]": ["top_p", "vllm_gpu_memory_utilization"],
        "in [0, 1]": ["warmup_ratio"],
    })
    args.batch_size = args.num_prompts * args.samples_per_prompt
    if args.batch_size % args.minibatch_size:
        raise SystemExit(f"error: --minibatch-size {args.minibatch_size} must divide the batch "
                         f"(num_prompts * samples_per_prompt = {args.batch_size})")
    if args.minibatch_size % args.micro_batch_size:
        raise SystemExit(f"error: --micro-batch-size {args.micro_batch_size} must divide "
                         f"--minibatch-size {args.minibatch_size}")
    if args.max_new_tokens is None:
        args.max_new_tokens = default_max_new_tokens(args.dataset)
    check_device(args.device, args.backend)
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("error: --track needs wandb: pip install wandb") from None


def setup(args):
    """Seed Python, NumPy and torch; return (device, autocast, gradient checkpointing on?). `autocast()` is a
    context: bfloat16 autocast on the run's device with --bf16, else nothing."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = default_device() if args.device == "auto" else args.device
    if args.bf16:
        autocast = lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto"
                                                            and device.startswith("cuda"))
    return device, autocast, checkpointing


def make_run_generator(args, policy, tokenizer):
    """The sampler of --backend with the run's generation flags, already holding the policy's weights."""
    return make_generator(args.backend, policy, tokenizer, resolve_model_path(args.model),
                          batch_size=args.gen_batch_size, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          seed=args.seed, max_model_len=args.vllm_max_model_len, enforce_eager=args.vllm_enforce_eager)


# ---------------------------------------------------------------------------------------------------------
# The held-out evaluation.
# ---------------------------------------------------------------------------------------------------------
def evaluate(generator, tokenizer, problems, max_new_tokens: int) -> tuple[float, list[tuple[str, str, float]]]:
    """Greedy accuracy on held-out problems, and (question, response, score) for each; a response cut by the
    length limit scores 0, and the grader reads the question, as in training."""
    outs = generator.generate([prompt_ids(tokenizer, p.question) for p in problems], n=1,
                              max_new_tokens=max_new_tokens, temperature=0.0)
    scores = [grade(o[0].text, p.answer, question=p.question) if o[0].finished else 0.0 for p, o in zip(problems, outs)]
    return float(np.mean(scores)), [(p.question, o[0].text, s) for p, o, s in zip(problems, outs, scores)]


def samples_markdown(samples: list[tuple[str, str, float]]) -> str:
    rows = ["| question | response | reward |", "|---|---|---|"]
    for q, r, s in samples:
        rows.append(f"| {q} | {r} | {s:.0f} |".replace("\n", "<br>"))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------
class Run:
    """Owns the run folder, the metrics (metrics.jsonl, TensorBoard, wandb), Ctrl-C, checkpoints and
    --resume, the --max-minutes clock, the held-out evaluation and the final save.

    `models`, `optimizers`, `schedulers`: name -> object with state_dict() / load_state_dict(); the policy
    is `models["policy"]`. `state`: the algorithm's run-long state, name -> object with state_dict() /
    load_state_dict() (Numca's table, PRIME's prompt feed), saved in every checkpoint. On --resume all of
    them are restored here, the generator gets the restored policy, and metrics.jsonl is cut back to the
    checkpoint."""

    def __init__(self, args, script: str, *, models: dict, optimizers: dict, schedulers: dict, generator, tokenizer,
                 eval_problems, state: dict | None = None):
        self.args, self.script, self.generator, self.tokenizer = args, script, generator, tokenizer
        self.eval_problems = eval_problems
        self.parts = {"models": models, "optimizers": optimizers, "schedulers": schedulers, "state": state or {}}
        self.dir = args.resume or os.path.join(args.output_dir, f"{args.exp_name}__{args.seed}__{int(time.time())}")
        metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.start_step, elapsed, self.eval_acc, self.checkpoint = 1, 0.0, float("nan"), None
        if args.resume:  # restore everything the checkpoint holds; the metrics written after it are dropped
            self.checkpoint = load_checkpoint(latest_checkpoint(self.dir))
            for group, objects in self.parts.items():
                for name, obj in objects.items():
                    obj.load_state_dict(self.checkpoint[group][name])
            generator.sync_weights(models["policy"])
            os.truncate(metrics_path, self.checkpoint["metrics_bytes"])
            self.start_step, elapsed = self.checkpoint["step"] + 1, self.checkpoint["elapsed"]
            self.eval_acc = self.checkpoint["eval_acc"]
            tqdm.write(f"resuming {self.dir} after step {self.checkpoint['step']}")
        else:
            os.makedirs(self.dir, exist_ok=True)
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=1)
        # wandb first: with sync_tensorboard it patches TensorBoard, and only writers made after that reach it.
        if args.track:
            import wandb

            name = os.path.basename(os.path.normpath(self.dir))
            wandb.init(project=args.wandb_project, name=name, id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:],
                       dir=self.dir, config=dataclasses.asdict(args), sync_tensorboard=True,
                       resume="allow" if args.resume else None)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.dir, purge_step=self.start_step if args.resume else None)  # drop lost steps
        if not args.resume:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
        self.history = open(metrics_path, "a" if args.resume else "w", buffering=1)  # line-buffered: readable live
        self.start_time = time.time() - elapsed
        self.last = {}  # the last step's logged numbers, for the progress bar
        # Ctrl-C asks the loop to stop after the current step and write a checkpoint; a second one stops at once.
        self.stop_requested = False
        signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_interrupt(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write("Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to quit now)")

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def steps(self):
        """The steps still to run, under a progress bar. Before the first: a fresh run's evaluation at step 0;
        a resumed run's random generators exactly as they were after its checkpoint's step."""
        if self.checkpoint is None:
            self.evaluate(0)
        else:
            set_rng_state(self.checkpoint["rng"])
        self.progress = tqdm(range(self.start_step, self.args.num_steps + 1), desc=self.args.exp_name,
                             dynamic_ncols=True)
        return self.progress

    def evaluate(self, step: int) -> float:
        """Greedy accuracy on the held-out problems, logged with a few samples."""
        acc, samples = evaluate(self.generator, self.tokenizer, self.eval_problems, self.args.max_new_tokens)
        self.writer.add_scalar("charts/eval_accuracy", acc, step)
        self.writer.add_text("samples/eval", samples_markdown(samples[: self.args.num_logged_samples]), step)
        self.history.write(json.dumps({"step": step, "eval_accuracy": acc, "wall_s": self.elapsed()}) + "\n")
        on = f" on {len(self.eval_problems)} problems" if step == 0 else ""
        tqdm.write(f"step {step}: held-out greedy accuracy {acc:.3f}{on}")
        self.eval_acc = acc
        return acc

    def log(self, step: int, logs: dict) -> None:
        """One step's numbers, to metrics.jsonl and TensorBoard (and through it wandb)."""
        for k, v in logs.items():
            self.writer.add_scalar(k, float(v), step)
        self.history.write(json.dumps({"step": step, "wall_s": self.elapsed(), **{k: float(v) for k, v in logs.items()}})
                           + "\n")
        self.last = logs

    def end_step(self, step: int) -> bool:
        """What ends every step: the evaluation when due (every --eval-every steps, at the last step, and when
        --max-minutes has run out), a checkpoint when due (every --save-every steps, and after Ctrl-C). True:
        leave the loop (Ctrl-C, or --max-minutes reached)."""
        args = self.args
        out_of_time = args.max_minutes is not None and self.elapsed() > 60 * args.max_minutes
        if step % args.eval_every == 0 or step == args.num_steps or out_of_time:
            self.evaluate(step)
        if "charts/reward_mean" in self.last:
            self.progress.set_postfix(reward=f"{float(self.last['charts/reward_mean']):.2f}",
                                      eval=f"{self.eval_acc:.3f}", s=f"{float(self.last['charts/step_time']):.0f}")
        if self.stop_requested or (args.save_every and step % args.save_every == 0):
            self.history.flush()
            save_checkpoint(self.dir, step, {
                **{group: {name: obj.state_dict() for name, obj in objects.items()}
                   for group, objects in self.parts.items()},
                "rng": rng_state(), "metrics_bytes": self.history.tell(), "elapsed": self.elapsed(),
                "eval_acc": self.eval_acc}, keep=args.keep_checkpoints)
        if self.stop_requested:
            tqdm.write(f"stopped after step {step}; continue with: python {self.script} --resume {self.dir}")
            return True
        if out_of_time:
            tqdm.write(f"stopping: --max-minutes {args.max_minutes} reached after step {step}")
        return out_of_time

    def finish(self, policy, tokenizer) -> None:
        """Save the final policy (into a temporary folder first, so that a crash leaves no half model) unless
        Ctrl-C stopped the run (its checkpoint is written; the run is not over); close the logs."""
        if self.args.save_model and not self.stop_requested:
            final, tmp = os.path.join(self.dir, "final_model"), os.path.join(self.dir, "final_model.tmp")
            policy.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.move(tmp, final)
            tqdm.write(f"saved the final policy to {final}")
        self.history.close()
        self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish()

