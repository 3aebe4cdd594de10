"""Peak memory of one update micro-batch and of one no-grad log-prob pass, with a script's own functions.

    python benchmarks/memory.py --script ppo --shape qwen2.5-0.5b --micro-batch 1 --response-len 1024
    python benchmarks/memory.py --script vineppo --shape qwen2.5-1.5b --micro-batch 8 --device cuda
    python benchmarks/memory.py --table     # the README's GPU-scale estimates (check_memory's arithmetic)

The model is built from a config written below (a real architecture, random weights: nothing is downloaded),
float32 weights as the trainers keep them, bfloat16 autocast as they compute. Each phase runs in a fresh
process so that memory freed by one phase cannot hide the next one's peak:
- `nograd`: the old/reference log-prob pass of one micro-batch (`response_logprobs` under no_grad);
- `update`: the policy's forward with entropy, the clipped loss and the k3 KL, and the backward, into
  gradients allocated beforehand (so the figure is what the micro-batch adds: activations, logits, chunks);
- `critic` (scripts with a critic): the critic's forward, value loss and backward (a separate peak: the
  policy's graph is freed before the critic's forward).
Peak = the phase's high-water mark minus the memory in use just before it: on CUDA from
torch.cuda.max_memory_allocated, on the CPU from the kernel's resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs). The estimate printed beside it is common.models.training_memory_gib's
update-phase part: the bf16 weight copies autocast keeps, the activations and logits, the logits' gradient and
a float32 log-softmax chunk.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.models import memory_phases, training_memory_gib  # noqa: E402

# Shapes of real models (their config.json values), so that no download is needed.
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
# What each trainer holds, as its check_memory call says: (trained models, frozen models, bytes per frozen parameter).
HOLDS = {"ppo.py (policy + critic + bf16 reference)": (2, 1, 2),
         "prime_implicit_prm.py (policy + PRM + float32 reference)": (2, 1, 4),
         "vineppo.py (policy + bf16 reference)": (1, 1, 2),
         "numca.py, hista.py (policy; no reference at KL 0)": (1, 0, 2)}


def shape_of(name: str) -> dict:
    """training_memory_gib's shape of SHAPES[name], from its config on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return {"params": params, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers, "vocab": config.vocab_size}


def estimate_table(total_gib: float = 79.2, share: float = 0.3, micro_batch: int = 8, prompt_len: int = 256,
                   response_len: int = 1024) -> str:
    """The README's table: check_memory's estimate (update / generation phase, GiB) of each trainer with
    --backend vllm and gradient checkpointing on, on a GPU of total_gib (an H100 80GB: 79.2 GiB)."""
    names = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"]
    shapes = {n: shape_of(n) for n in names}
    lines = ["| script | " + " | ".join(f"{n.split('-')[1].upper()}: update / generation (GiB)" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for label, (trainable, frozen, frozen_bytes) in HOLDS.items():
        cells = []
        for n in names:
            parts = training_memory_gib(shapes[n], trainable, frozen, frozen_bytes, 0, micro_batch,
                                        prompt_len + response_len, response_len, True)
            cells.append(table_cell(parts, total_gib, share))
        lines.append(f"| `{label.split(' (')[0]}` ({label.split(' (')[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_cell(parts: dict, total_gib: float, share: float) -> str:
    """One cell of the README's memory tables: update / generation peaks in GiB on a CUDA GPU of `total_gib`
    with vLLM's `share`, and the memory check's verdict."""
    p = memory_phases(parts, cuda=True, vllm_gib=share * total_gib)
    verdict = ": refused" if p["need"] > total_gib else (": within the margin" if p["need"] * 1.15 > total_gib
                                                         else "")
    return f"{p['update']:.1f} / {p['generation']:.1f}{verdict}"


def parallel_table(total_gib: float = 79.2, share: float = 0.3, micro_batch: int = 8, prompt_len: int = 256,
                   response_len: int = 1024, lora_rank: int = 16, gpus: tuple[int, ...] = (4, 8)) -> str:
    """The README's table past one GPU, for Qwen2.5-7B in the setting of estimate_table: LoRA adapters of rank
    `lora_rank` on every linear layer on one GPU (bf16 base, the reference the base itself), and full fine-tuning
    sharded by FSDP2 over each number of GPUs in `gpus` (per GPU: weights, gradients, optimizer state and the
    frozen reference split; vLLM's share and the activations whole on every GPU)."""
    shape = shape_of("qwen2.5-7b")
    settings = [(f"LoRA r{lora_rank}, 1 GPU", dict(lora_rank=lora_rank, base_bytes=2), True)]
    settings += [(f"full, FSDP2 over {n} GPUs", dict(shards=n), False) for n in gpus]
    lines = ["| script | " + " | ".join(label for label, _, _ in settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for label, (trainable, frozen, frozen_bytes) in HOLDS.items():
        cells = []
        for _, layout, lora in settings:
            parts = training_memory_gib(shape, trainable, 0 if lora else frozen, frozen_bytes, 0, micro_batch,
                                        prompt_len + response_len, response_len, True, **layout)
            cells.append(table_cell(parts, total_gib, share))
        lines.append(f"| `{label.split(' (')[0]}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build(shape: str, device: str, checkpointing: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=32768, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def resident_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_phase(args) -> dict:
    """One phase in this process: returns its peak (GiB) above the memory in use before it, and its time."""
    algo = importlib.import_module(args.script)
    device = args.device
    model = build(args.shape, device, args.gradient_checkpointing)
    V = model.config.vocab_size
    B, P, T = args.micro_batch, args.prompt_len, args.response_len
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (B, P), generator=g).tolist()
    responses = torch.randint(0, V, (B, T), generator=g).tolist()
    batch = algo.make_batch(prompts, responses, pad_id=0)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    if args.phase == "critic":
        model = algo.Critic(model.get_decoder(), model.config.hidden_size).to(device)
    if args.phase in ("update", "critic"):
        model.train()
        for p in model.parameters():  # gradients exist before the phase, as from the second micro-batch on
            p.grad = torch.zeros_like(p)
    else:
        model.eval()

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resident_gib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    t0 = time.time()
    mask = batch.response_mask.to(device)  # the trainers keep log-probs, values and the loss on the device
    if args.phase == "nograd":
        with torch.no_grad(), autocast:
            algo.response_logprobs(model, batch, 0.6)
    elif args.phase == "update":
        old = torch.zeros(B, T, device=device)
        with autocast:
            logprobs, entropy = algo.response_logprobs(model, batch, 0.6, with_entropy=True)
            out = algo.ppo_policy_loss(logprobs, old, torch.ones(B, T, device=device), mask, *args.clip)
            loss = out[0] + 1e-4 * algo.kl_k3(logprobs, old, mask).sum(1).mean()
        loss.backward()
    else:
        with autocast:
            values = algo.critic_values(model, batch)
            loss = algo.ppo_value_loss(values, torch.zeros(B, T, device=device), torch.ones(B, T, device=device), mask,
                                       0.2)
        loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 - before
    else:
        peak = resident_gib("VmHWM") - before
    return {"peak_gib": peak, "seconds": time.time() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="ppo", choices=["ppo", "vineppo", "numca", "hista", "prime_implicit_prm"])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per sequence")
    parser.add_argument("--response-len", type=int, default=1024, help="response tokens per sequence")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--phases", nargs="+", default=None, help="default: nograd update (+ critic for ppo)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    parser.add_argument("--table", action="store_true", help="print the README's GPU-scale estimate table and exit")
    args = parser.parse_args()
    if args.table:
        print(estimate_table())
        print()
        print(parallel_table())
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    # DAPO scripts take (eps_low, eps_high), the others one eps.
    args.clip = (0.2, 0.28) if args.script in ("numca", "hista") else (0.2,)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return

    phases = args.phases or (["nograd", "update"] + (["critic"] if args.script == "ppo" else []))
    shape = shape_of(args.shape)
    params = shape["params"]
    parts = training_memory_gib(shape, 1, 0, 0, 0, args.micro_batch, args.prompt_len + args.response_len,
                                args.response_len, args.gradient_checkpointing)
    estimate = parts["autocast"] + parts["activations"] + parts["logits_grad"]
    tokens = args.micro_batch * (args.prompt_len + args.response_len)
    print(f"{args.script} on {args.shape} ({params / 1e6:.0f}M parameters), {args.device}, micro-batch "
          f"{args.micro_batch} x ({args.prompt_len} + {args.response_len}) tokens, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"weights (float32) {params * 4 / 2**30:.2f} GiB; estimated update phase {estimate:.2f} GiB (autocast's "
          f"weight copies {parts['autocast']:.2f}, activations and logits {parts['activations']:.2f}, the logits' "
          f"gradient and a log-softmax chunk {parts['logits_grad']:.2f})")
    for phase in phases:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--phase", phase]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            print(f"  {phase:7s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {phase:7s} peak {r['peak_gib']:6.2f} GiB  ({r['peak_gib'] * 2**10 / tokens:.2f} MiB per token)  "
              f"{r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
