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
- `metrics.jsonl`: one JSON line per step (`step`, `wall_s`, `train_s` and every logged number) and one per
  evaluation (`step`, `eval_accuracy`, `wall_s`, `train_s`); a resumed run first cuts it back to what its
  checkpoint had seen. `wall_s` is the run's wall-clock from the end of model loading; `train_s` is the same
  less the time spent in held-out evaluations: the clock of --max-minutes and of --eval-every-minutes, so
  that evaluating more problems, or more often, costs no arm of a comparison any training time;
- TensorBoard events (the same numbers, the hyperparameters, and a few evaluation samples as text); with
  --track the same numbers go to Weights & Biases too (its files under `wandb/` in the run folder);
- `checkpoints/step_NNNNNN/` (common/checkpoint.py) and `final_model/` (save_pretrained, written whole or not
  at all).

Under torchrun (common/distributed.py) every process runs all of the above; rank 0 alone writes the folder. The
logged numbers are averaged over the processes, the held-out evaluation is generated split over them, and they
stop together (--max-minutes, Ctrl-C). A checkpoint holds whole tensors (FSDP2's shards gathered), so a run may
resume with another number of processes; with LoRA it holds what trains (adapters, a value head), and the base
is --model again. The final model is a plain transformers model (LoRA merged in).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

from common import distributed as dist
from common.args import check_device, check_ranges
from common.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, saved_args, set_rng_state
from common.data import default_max_new_tokens, prompt_ids
from common.generation import make_generator
from common.grading import grade
from common.models import AdapterOff, default_device, is_plain, load_model, plain_model, resolve_model_path


# ---------------------------------------------------------------------------------------------------------
# Before anything is loaded: the arguments, the random generators, the device.
# ---------------------------------------------------------------------------------------------------------
def resume_args(cls, args):
    """With --resume DIR, the arguments DIR's run was started with (its args.json) and DIR as the run folder;
    without, `args` unchanged. A folder of another script's run (its args.json has flags this script does not
    know: every trainer has flags of its own), or one without a checkpoint, is refused here, in one line, before
    any model is loaded. A flag added to the script after the run started takes its default, and is named."""
    if args.resume is None:
        return args
    saved = saved_args(args.resume)
    known = {f.name for f in dataclasses.fields(cls)}
    if set(saved) - known:
        alien = sorted(set(saved) - known)[:3]
        raise SystemExit(f"error: {args.resume} is not a run of this script (its args.json has "
                         f"{', '.join(alien)}): resume it with the script that started it")
    if known - set(saved):
        say(f"{args.resume} was started before these flags existed; they take their defaults: "
            + ", ".join(f"--{n.replace('_', '-')}" for n in sorted(known - set(saved))))
    if latest_checkpoint(args.resume) is None:
        raise SystemExit(f"error: {args.resume} has no checkpoint yet (runs write them with --save-every N, or on Ctrl-C)")
    return cls(**{**saved, "resume": args.resume})


def check_shared_args(args) -> None:
    """The checks of the flags every trainer shares (each script's check_args adds its own): ranges (a rollout
    correction's cap below 1 would cut even the weights of tokens where sampler and learner agree), batch
    sizes that divide (under torchrun: over the ranks too), the response length default, LoRA and FSDP2's
    flags, CUDA, wandb and peft present when asked for."""
    world = int(os.environ.get("WORLD_SIZE", 1)) if dist.launched() else 1
    if args.lora_rank < 0:
        raise SystemExit(f"error: --lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise SystemExit(f"error: --lora-alpha must be > 0, got {args.lora_alpha}")
    if args.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SystemExit("error: --lora-rank needs peft: pip install -r requirements.txt") from None
    if args.fsdp and world == 1:
        raise SystemExit("error: --fsdp shards the models over the processes of torchrun: run with "
                         "torchrun --nproc-per-node N (N >= 2)")
    if world > 1:
        if args.num_prompts % world:
            raise SystemExit(f"error: --num-prompts {args.num_prompts} must divide by the {world} processes of "
                             f"torchrun (each trains on its share of the prompts, all their samples)")
        share = args.num_prompts // world * args.samples_per_prompt
        if share % args.micro_batch_size or (args.minibatch_size // world) % args.micro_batch_size \
                or args.minibatch_size % world:
            raise SystemExit(f"error: under torchrun each of the {world} processes takes {share} samples of "
                             f"every batch and --minibatch-size / {world} of every minibatch: "
                             f"--micro-batch-size {args.micro_batch_size} must divide both "
                             f"(--minibatch-size {args.minibatch_size})")
    check_ranges(args, {
        ">= 1": ["num_steps", "num_prompts", "samples_per_prompt", "max_new_tokens", "num_epochs", "minibatch_size",
                 "micro_batch_size", "gen_batch_size", "num_train_problems", "num_eval_problems", "eval_every",
                 "keep_checkpoints", "vllm_max_model_len", "rollout_correction_cap"],
        ">= 0": ["learning_rate", "weight_decay", "num_logged_samples", "save_every"],
        "> 0": ["temperature", "adam_eps", "max_grad_norm", "max_minutes", "eval_every_minutes"],
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
    """Seed Python, NumPy and torch; under torchrun join the process group (common/distributed.py); return
    (device, autocast, gradient checkpointing on?). The device is this rank's (cuda:LOCAL_RANK under torchrun
    on CUDA). Every rank is seeded alike: they draw the same micro-batch shuffles. `autocast()` is a context:
    bfloat16 autocast on the run's device with --bf16 on (auto: on CUDA), else nothing (float32)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = dist.init(default_device() if args.device == "auto" else args.device)
    say(f"{args.exp_name}: loading {args.model} on {device} (--backend {args.backend})" + ("" if args.resume else
        f", then a held-out evaluation of {args.num_eval_problems} problems before step 1"))
    bf16 = {True: "on", False: "off"}.get(args.bf16, args.bf16)  # a run's args.json from before "auto": a bool
    if bf16 == "on" or (bf16 == "auto" and device.startswith("cuda")):
        autocast = lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto"
                                                            and device.startswith("cuda"))
    return device, autocast, checkpointing


def load_trained(args, device: str, checkpointing: bool):
    """A model that trains (the policy, PPO's critic backbone, PRIME's PRM): --model, with LoRA adapters of
    --lora-rank if asked (common.models.load_model). Not yet wrapped for torchrun: the trainer wraps what it
    trains with common.distributed.wrap, before building its optimizer."""
    return load_model(args.model, device=device, gradient_checkpointing=checkpointing, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha, lora_target_modules=args.lora_target_modules)


def load_reference(args, policy, dtype: str, device: str):
    """The frozen reference: with LoRA the policy's own base, its adapters switched off (AdapterOff: no second
    copy); else --model loaded again in `dtype`, frozen, and with --fsdp sharded like the policy."""
    if args.lora_rank:
        return AdapterOff(policy)
    reference = load_model(args.model, dtype=dtype, device=device).eval().requires_grad_(False)
    return dist.fsdp_shard(reference) if args.fsdp else reference


def memory_layout(args) -> dict:
    """check_memory's keywords for LoRA and sharding: the adapters' rank, and how many ranks FSDP2 shards over."""
    return {"lora_rank": args.lora_rank, "shards": dist.world() if args.fsdp else 1}


def say(message: str) -> None:
    """A line for the user, at once (rank 0's only under torchrun); tqdm.write keeps a progress bar intact."""
    if dist.is_main():
        tqdm.write(message)


def make_run_generator(args, policy, tokenizer):
    """The sampler of --backend with the run's generation flags, already holding the policy's weights."""
    say("starting vLLM's engine (its first start compiles: a minute or more)" if args.backend == "vllm" else
        "copying the policy into the sampler (bfloat16)")
    return make_generator(args.backend, policy, tokenizer, resolve_model_path(args.model),
                          batch_size=args.gen_batch_size, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          seed=args.seed, max_model_len=args.vllm_max_model_len, enforce_eager=args.vllm_enforce_eager)


# ---------------------------------------------------------------------------------------------------------
# The held-out evaluation.
# ---------------------------------------------------------------------------------------------------------
def evaluate(generator, tokenizer, problems, max_new_tokens: int) -> tuple[float, list[tuple[str, str, float]]]:
    """Greedy accuracy on held-out problems, and (question, response, score) for each; a response cut by the
    length limit scores 0, and the grader reads the question, as in training. Under a progress bar, in the hf
    generator's own chunks (so the same batches, the same greedy tokens, as one call); vLLM takes them at once."""
    prompts = [prompt_ids(tokenizer, p.question) for p in problems]
    chunk = getattr(generator, "batch_size", None) or len(prompts) or 1
    outs = []
    with tqdm(total=len(prompts), desc="held-out evaluation", unit="problem", leave=False, dynamic_ncols=True,
              disable=not dist.is_main()) as bar:
        for start in range(0, len(prompts), chunk):
            outs += generator.generate(prompts[start : start + chunk], n=1, max_new_tokens=max_new_tokens,
                                       temperature=0.0)
            bar.update(len(prompts[start : start + chunk]))
    scores = [grade(o[0].text, p.answer, question=p.question) if o[0].finished else 0.0 for p, o in zip(problems, outs)]
    return float(np.mean(scores)), [(p.question, o[0].text, s) for p, o, s in zip(problems, outs, scores)]


def samples_markdown(samples: list[tuple[str, str, float]]) -> str:
    rows = ["| question | response | reward |", "|---|---|---|"]
    for q, r, s in samples:
        rows.append(f"| {q} | {r} | {s:.0f} |".replace("\n", "<br>"))
    return "\n".join(rows)


def is_lora_like(model) -> bool:
    """True for a model part of whose parameters are frozen (LoRA's base): its checkpoint keeps what trains."""
    return not all(p.requires_grad for p in dist.unwrap(model).parameters())


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
        self.main = dist.is_main()  # under torchrun only rank 0 writes the run folder; every rank computes
        # Every rank's name for the folder is rank 0's (their clocks may read different seconds).
        self.dir = dist.broadcast(args.resume or os.path.join(args.output_dir,
                                                              f"{args.exp_name}__{args.seed}__{int(time.time())}"))
        metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.start_step, elapsed, self.eval_acc, self.checkpoint = 1, 0.0, float("nan"), None
        self.eval_seconds = 0.0  # wall-clock spent in held-out evaluations: not training time
        self.last_eval_train_s = 0.0  # train_s at the latest evaluation (--eval-every-minutes counts from it)
        if args.resume:  # restore everything the checkpoint holds; the metrics written after it are dropped
            self.checkpoint = load_checkpoint(latest_checkpoint(self.dir))
            self._load_state(self.checkpoint)
            generator.sync_weights(models["policy"])
            if self.main:
                os.truncate(metrics_path, self.checkpoint["metrics_bytes"])
            self.start_step, elapsed = self.checkpoint["step"] + 1, self.checkpoint["elapsed"]
            self.eval_acc = self.checkpoint["eval_acc"]
            self.eval_seconds = self.checkpoint.get("eval_s", 0.0)  # checkpoints written before train_s: none
            self.last_eval_train_s = self.checkpoint.get("last_eval_train_s", 0.0)
            self.say(f"resuming {self.dir} after step {self.checkpoint['step']}")
        elif self.main:
            os.makedirs(self.dir, exist_ok=True)
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=1)
        self.writer = self.history = None
        if self.main:
            self._open_logs(metrics_path)
        self.start_time = time.time() - elapsed
        self.last = {}  # the last step's logged numbers, for the progress bar
        # Ctrl-C asks the loop to stop after the current step and write a checkpoint; a second one stops at once.
        self.stop_requested = False
        signal.signal(signal.SIGINT, self._on_interrupt)

    def _open_logs(self, metrics_path: str) -> None:
        """metrics.jsonl, TensorBoard, and with --track wandb (rank 0 only)."""
        args = self.args
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

    def say(self, message: str) -> None:
        """A line for the user (rank 0's only under torchrun): the module's say."""
        say(message)

    def _state(self) -> dict:
        """Every model's, optimizer's, scheduler's and run-long state, as one process holds it. A model with
        frozen parameters (LoRA) keeps only what trains (its adapters, a value head): the base is --model, loaded
        again on resume. Under FSDP2 a collective (the shards are gathered): every rank calls it."""
        models = self.parts["models"]
        state = {"models": {}, "optimizers": {}}
        for name, model in models.items():
            full = dist.full_state_dict(model)
            trained = {n for n, p in dist.unwrap(model).named_parameters() if p.requires_grad}
            state["models"][name] = {k: v for k, v in full.items() if k in trained} if is_lora_like(model) else full
        for name, opt in self.parts["optimizers"].items():
            state["optimizers"][name] = dist.optimizer_state_dict(models[name], opt)
        for group in ("schedulers", "state"):
            state[group] = {name: obj.state_dict() for name, obj in self.parts[group].items()}
        return state

    def _load_state(self, checkpoint: dict) -> None:
        models = self.parts["models"]
        for name, model in models.items():
            dist.load_full_state_dict(model, checkpoint["models"][name], strict=not is_lora_like(model))
        for name, opt in self.parts["optimizers"].items():
            dist.load_optimizer_state_dict(models[name], opt, checkpoint["optimizers"][name])
        for group in ("schedulers", "state"):
            for name, obj in self.parts[group].items():
                obj.load_state_dict(checkpoint[group][name])

    def _on_interrupt(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write("Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to quit now)")

    def elapsed(self) -> float:
        """Wall-clock seconds since the end of model loading (a resumed run goes on from its checkpoint's)."""
        return time.time() - self.start_time

    def train_seconds(self) -> float:
        """elapsed() less the held-out evaluations: the clock of --max-minutes and --eval-every-minutes."""
        return self.elapsed() - self.eval_seconds

    def steps(self):
        """The steps still to run, under a progress bar. Before the first: a fresh run's evaluation at step 0;
        a resumed run's random generators exactly as they were after its checkpoint's step."""
        if self.checkpoint is None:
            self.evaluate(0)
        else:
            set_rng_state(self.checkpoint["rng"])
        self.progress = tqdm(range(self.start_step, self.args.num_steps + 1), desc=self.args.exp_name,
                             dynamic_ncols=True, disable=not self.main)
        return self.progress

    def evaluate(self, step: int) -> float:
        """Greedy accuracy on the held-out problems, logged with a few samples; its time is not training time."""
        started = time.time()
        acc, samples = evaluate(self.generator, self.tokenizer, self.eval_problems, self.args.max_new_tokens)
        self.eval_seconds += time.time() - started
        self.eval_acc, self.last_eval_train_s = acc, self.train_seconds()
        if not self.main:  # every rank generated its share of the problems; rank 0 writes
            return acc
        self.writer.add_scalar("charts/eval_accuracy", acc, step)
        self.writer.add_text("samples/eval", samples_markdown(samples[: self.args.num_logged_samples]), step)
        self.history.write(json.dumps({"step": step, "eval_accuracy": acc, **self._clocks()}) + "\n")
        on = f" on {len(self.eval_problems)} problems" if step == 0 else ""
        tqdm.write(f"step {step}: held-out greedy accuracy {acc:.3f}{on}")
        return acc

    def log(self, step: int, logs: dict) -> None:
        """One step's numbers, to metrics.jsonl and TensorBoard (and through it wandb). A number that has no
        value this step is left out, not written as NaN: the losses of a step whose every micro-batch was
        skipped by the ratio guard (the mean of no values), an explained variance of a constant target. Under
        torchrun each number is the mean over the ranks that have a value for it (every rank logs the same names;
        a number computed from the whole batch, which every rank holds, is the same on every rank)."""
        if dist.active():
            names = sorted(logs)
            values = torch.tensor([float(logs[k]) for k in names], dtype=torch.float64)
            valid = ~torch.isnan(values)
            means = dist.all_sum(torch.where(valid, values, 0.0)) / dist.all_sum(valid.double())  # NaN: no rank has one
            logs = dict(zip(names, means.tolist()))
        logs = {k: v for k, v in logs.items() if not math.isnan(float(v))}
        self.last = logs
        if not self.main:
            return
        for k, v in logs.items():
            self.writer.add_scalar(k, float(v), step)
        self.history.write(json.dumps({"step": step, **self._clocks(), **{k: float(v) for k, v in logs.items()}}) + "\n")

    def _clocks(self) -> dict:
        wall = self.elapsed()
        return {"wall_s": wall, "train_s": wall - self.eval_seconds}

    def end_step(self, step: int) -> bool:
        """What ends every step: the evaluation when due (every --eval-every steps, or with --eval-every-minutes
        at the first step end after each further M minutes of training; at the last step; and when --max-minutes
        of training have run out), a checkpoint when due (every --save-every steps, and after Ctrl-C). True:
        leave the loop (Ctrl-C, or --max-minutes reached)."""
        args = self.args
        train_s = self.train_seconds()
        out_of_time = args.max_minutes is not None and train_s > 60 * args.max_minutes
        if args.eval_every_minutes is None:
            due = step % args.eval_every == 0
        else:
            due = train_s - self.last_eval_train_s >= 60 * args.eval_every_minutes
        # Under torchrun the ranks stop together: when any of them is out of time or was interrupted.
        out_of_time, self.stop_requested = dist.any_rank(out_of_time), dist.any_rank(self.stop_requested)
        due = dist.any_rank(due)  # the ranks' clocks differ a little: they evaluate together
        if due or step == args.num_steps or out_of_time:
            self.evaluate(step)
        if "charts/reward_mean" in self.last and self.main:
            self.progress.set_postfix(reward=f"{float(self.last['charts/reward_mean']):.2f}",
                                      eval=f"{self.eval_acc:.3f}", s=f"{float(self.last['charts/step_time']):.0f}")
        if self.stop_requested or (args.save_every and step % args.save_every == 0):
            state = self._state()  # on every rank (FSDP2 gathers its shards); rank 0 writes it
            if self.main:
                self.history.flush()
                save_checkpoint(self.dir, step, {**state, "rng": rng_state(), "metrics_bytes": self.history.tell(),
                                                 "elapsed": self.elapsed(), "eval_s": self.eval_seconds,
                                                 "last_eval_train_s": self.last_eval_train_s, "eval_acc": self.eval_acc},
                                keep=args.keep_checkpoints)
            dist.barrier()
        if self.stop_requested:
            launcher = "torchrun ... " if dist.active() else "python "
            self.say(f"stopped after step {step}; continue with: {launcher}{self.script} --resume {self.dir}")
            return True
        if out_of_time:
            self.say(f"stopping: --max-minutes {args.max_minutes} reached after step {step}")
        return out_of_time

    def finish(self, policy, tokenizer) -> None:
        """Save the final policy (into a temporary folder first, so that a crash leaves no half model) unless
        Ctrl-C stopped the run (its checkpoint is written; the run is not over); close the logs."""
        if self.args.save_model and not self.stop_requested:
            final, tmp = os.path.join(self.dir, "final_model"), os.path.join(self.dir, "final_model.tmp")
            # A plain transformers model: LoRA's adapters merged in, DDP's wrapper removed, FSDP2's shards
            # gathered (on every rank; rank 0 writes).
            plain = policy if is_plain(policy) else plain_model(policy, device="cpu")
            if self.main:
                plain.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                shutil.move(tmp, final)
                tqdm.write(f"saved the final policy to {final}")
        if self.main:
            self.history.close()
            self.writer.close()
            if self.args.track:
                import wandb

                wandb.finish()
        dist.barrier()  # the process group stays until exit: vLLM's engine cleans up its own groups then

