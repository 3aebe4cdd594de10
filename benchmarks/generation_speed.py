"""Generated tokens per second of common.generation's `hf` backend, as the training scripts use it.

    python benchmarks/generation_speed.py                      # default model, CPU, batch 32
    python benchmarks/generation_speed.py --dtypes bfloat16 float32 --max-new-tokens 128

Samples `batch` prompts of the default task once each at the training temperature and counts the tokens
that belong to responses (up to and including EOS). Rows that finish early still occupy their slot
until the longest row of the batch is done, which is why this is lower than a fixed-length measurement.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data import DEFAULT_DATASET, load_problems, prompt_ids  # noqa: E402
from common.generation import HFGenerator  # noqa: E402
from common.models import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--dataset", default=DEFAULT_DATASET)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--temperature", type=float, default=0.6)
parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = load_model(args.model)
inputs = [prompt_ids(tokenizer, p.question) for p in load_problems(args.dataset, "test", size=args.batch)]
for dtype in args.dtypes:
    gen = HFGenerator(model, tokenizer, batch_size=args.batch, dtype=getattr(torch, dtype))
    gen.generate(inputs[:2], max_new_tokens=8, temperature=args.temperature, seed=0)  # warm-up
    for r in range(args.repeats):
        start = time.time()
        out = gen.generate(inputs, n=1, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=r)
        seconds = time.time() - start
        tokens = sum(len(c.token_ids) for row in out for c in row)
        longest = max(len(c.token_ids) for row in out for c in row)
        print(f"{dtype:9s} batch {args.batch}: {tokens} response tokens in {seconds:.1f} s = {tokens / seconds:.0f} "
              f"tokens/s ({args.batch * longest / seconds:.0f} tokens/s counting the slots of rows that had stopped)")
