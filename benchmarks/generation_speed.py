"""Generated tokens per second of common.generation's backends, as the training scripts use them.

    python benchmarks/generation_speed.py                          # hf, bfloat16 and float32, batch 32
    python benchmarks/generation_speed.py --backends hf vllm --dtypes bfloat16 --prompts 8 --samples 4

Samples `samples` completions of `prompts` prompts of the default task at the training temperature
and counts the tokens that belong to responses (up to and including EOS). With the hf backend, rows
that finish early still occupy their slot until the longest row of the batch is done, which is why
this is lower than a fixed-length measurement; vLLM schedules each sequence on its own. vLLM runs in
bfloat16, compiled unless --vllm-enforce-eager; its start-up is not counted.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data import DEFAULT_DATASET, load_problems, prompt_ids  # noqa: E402
from common.generation import HFGenerator, make_generator  # noqa: E402
from common.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--dataset", default=DEFAULT_DATASET)
parser.add_argument("--backends", nargs="+", default=["hf"], choices=["hf", "vllm"])
parser.add_argument("--prompts", type=int, default=32)
parser.add_argument("--samples", type=int, default=1, help="completions per prompt")
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--temperature", type=float, default=0.6)
parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="hf generation dtypes")
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--vllm-enforce-eager", action="store_true")
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = load_model(args.model)
inputs = [prompt_ids(tokenizer, p.question) for p in load_problems(args.dataset, "test", size=args.prompts)]
print(f"{args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, "
      f"T = {args.temperature}, {torch.get_num_threads()} torch threads")
generators = {}
if "hf" in args.backends:
    for dtype in args.dtypes:
        generators[f"hf   {dtype:9s}"] = HFGenerator(model, tokenizer, batch_size=args.prompts * args.samples,
                                                    dtype=getattr(torch, dtype))
if "vllm" in args.backends:
    generators["vllm bfloat16 "] = make_generator("vllm", model, tokenizer, resolve_model_path(args.model),
                                                  enforce_eager=args.vllm_enforce_eager)
for gen in generators.values():
    gen.generate(inputs[:2], max_new_tokens=8, temperature=args.temperature, seed=0)  # warm-up
rows = args.prompts * args.samples
for r in range(args.repeats):  # the arms take turns, so that they see the same machine
    for name, gen in generators.items():
        start = time.time()
        out = gen.generate(inputs, n=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=r)
        seconds = time.time() - start
        tokens = sum(len(c.token_ids) for row in out for c in row)
        longest = max(len(c.token_ids) for row in out for c in row)
        print(f"{name}: {tokens} response tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s (mean response "
              f"{tokens / rows:.0f} tokens; {rows * longest / seconds:.0f} tokens/s counting the slots of rows that "
              f"had stopped)", flush=True)
