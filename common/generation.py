"""Batched sampling with two interchangeable backends that return the same structure.

    generator = make_generator("hf", policy, tokenizer, model_path)   # or "vllm" (one GPU)
    out = generator.generate(inputs, n=4, max_new_tokens=128, temperature=1.0)
    out[i][j]            # the j-th of n completions of inputs[i], a `Completion`
    generator.sync_weights(policy)   # after every policy update

`inputs` are token-id lists. A prompt is one; so is a prompt followed by the first tokens of a response,
which is how VinePPO and the value benchmark "continue from a prefix": the completion is the rest.

- `hf`: transformers `generate`, batched, CPU or GPU. It samples from its own copy of the policy in the
  generation dtype (bfloat16 runs 1.7x faster than float32 on the CPUs we measured, and is what vLLM
  would use), refreshed by `sync_weights`. If the dtypes match it uses the policy itself.
- `vllm`: the vLLM engine in this process with prefix caching on. New weights reach it through a
  worker extension called with `LLM.collective_rpc` (vLLM's documented RLHF route), and the prefix
  cache is reset afterwards since its keys/values were computed with the old weights. vLLM is imported
  only here, only when chosen.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens only; ends with the EOS token when `finished`
    text: str  # the generated text, special tokens dropped
    finished: bool  # True: ended on EOS. False: cut by max_new_tokens (outcome reward 0)


class HFGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 64, dtype: torch.dtype | None = torch.bfloat16):
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # sequences per `generate` call (memory knob)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        if dtype is None or dtype == model.dtype:
            self.model = model  # sample from the policy itself: nothing to sync
        else:
            self.model = copy.deepcopy(model).to(dtype)
            self.model.config.use_cache = True
        self.model.eval()

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        if self.model is not model:
            self.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def generate(self, inputs: list[list[int]], n: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> list[list[Completion]]:
        """n completions for each input (temperature 0 = greedy). Same seed, same device: same output."""
        if seed is not None:
            torch.manual_seed(seed)
        flat = [ids for ids in inputs for _ in range(n)]  # (len(inputs) * n) rows, input i's rows adjacent
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        results: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            # Left padding: every row's last input token sits in the last column, new tokens follow.
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling,
            )
            for row in out[:, width:].tolist():
                results.append(self._completion(row))
        self.model.train(was_training)
        return [results[i * n : (i + 1) * n] for i in range(len(inputs))]

    def _completion(self, new_tokens: list[int]) -> Completion:
        # The first EOS ends the response (pad == EOS for many models, so look for the first one).
        for t, tok in enumerate(new_tokens):
            if tok in self.eos_ids:
                ids = new_tokens[: t + 1]
                return Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), True)
        return Completion(new_tokens, self.tokenizer.decode(new_tokens, skip_special_tokens=True), False)


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`); runs inside the engine."""

    def load_policy_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=named_tensors)


class VLLMGenerator:
    def __init__(self, model_path: str, tokenizer, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 4096, seed: int = 0):
        # The engine in this process, so `collective_rpc` hands it our tensors without copying between
        # processes (vLLM's V1 engine otherwise runs its core in a subprocess).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError:
            raise SystemExit("error: --backend vllm needs vLLM on a CUDA GPU: pip install -r requirements-gpu.txt") from None
        if not torch.cuda.is_available():
            raise SystemExit("error: --backend vllm needs a CUDA GPU; use --backend hf on this machine")
        self.tokenizer = tokenizer
        self.llm = LLM(
            model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
            max_model_len=max_model_len, enable_prefix_caching=True,
            worker_extension_cls="common.generation.WeightSyncExtension",
        )

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        self.llm.collective_rpc("load_policy_weights", args=(list(model.state_dict().items()),))
        self.llm.reset_prefix_cache()  # cached keys/values belong to the old weights

    def generate(self, inputs: list[list[int]], n: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in inputs], params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        results = []
        for o in outs:
            row = []
            for c in o.outputs:
                ids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not ids or ids[-1] != eos):
                    ids.append(eos)  # keep the EOS token: the outcome reward sits on it
                row.append(Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), finished))
            results.append(row)
        return results


def make_generator(backend: str, model, tokenizer, model_path: str, batch_size: int = 64,
                   dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3, seed: int = 0):
    """The generator for `backend` ("hf" or "vllm"), already holding `model`'s weights."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, batch_size=batch_size, dtype=getattr(torch, dtype))
    if backend == "vllm":
        gen = VLLMGenerator(model_path, tokenizer, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        gen.sync_weights(model)  # start from exactly the policy's weights
        return gen
    raise SystemExit(f"error: unknown backend {backend!r}: choose hf or vllm")
