"""Several processes under torchrun (torch.distributed), the same for every trainer. Without torchrun every
function here is the identity or a no-op, and a trainer runs exactly as one process.

    torchrun --nproc-per-node 2 ppo.py ...      # 2 processes on one machine (GPUs: one per process)

How a step is split (each trainer's docs page says what this means for its own part):
- Generation: every rank holds the same list of prompts; `ShardedGenerator` (made by common/run.py) generates
  this rank's contiguous share of them with this rank's own engine (hf, or vLLM on this rank's GPU) and gathers
  every rank's completions, so that every rank holds the whole batch's rollouts, in order. A prompt's samples
  are generated on one rank. Grading, dynamic sampling, Numca's table, PRIME's fill loop and VinePPO's Monte
  Carlo values then run on the whole batch on every rank, identically (the continuations are generated split
  the same way), and need no reduction.
- The model passes: each rank takes its share of the batch's prompts (`share`, all their samples: group
  statistics stay on one rank) for the no-grad passes and the update. Every rank runs the same number of
  micro-batches and the same number of backward passes (DDP and FSDP2 reduce gradients inside backward, and
  every rank must join each reduction), which is why a micro-batch a rank skips still runs a backward of zero
  (`zero_loss`).
- Gradients: DDP (the trained models replicated) or, with --fsdp, FSDP2's `fully_shard` (weights, gradients and
  optimizer state sharded over the ranks). Both average the ranks' gradients; a loss written as a token mean
  over the whole minibatch therefore divides by the ranks' mean token count (`rank_mean`), so that the average
  of the ranks' gradients is the whole minibatch's.
- Batch-wide numbers computed from a rank's own passes (PPO's advantage whitening over its critic's values)
  add up every rank's sums (`all_sum`); logged numbers are averaged over the ranks (common/run.py).
- One rank (rank 0) writes the run folder: metrics, evaluations, checkpoints, the final model.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when torchrun started this process (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, ...)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


_joined = False  # set by init(): this process joined torchrun's process group


def active() -> bool:
    """True in a process that torchrun started and init() joined to the group. Not merely "a process group
    exists": vLLM's engine makes one of its own in a plain `python script.py` run (world size 1), which must
    change nothing."""
    return _joined and dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the one that writes the run folder (always True without torchrun)."""
    return rank() == 0


def init(device: str) -> str:
    """Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's device
    (cuda:LOCAL_RANK on CUDA: one GPU per process). Without torchrun: `device` unchanged."""
    if not launched():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    global _joined
    if not dist.is_initialized():
        # A long evaluation or a slow rank's generation can keep the others waiting in a collective: allow an hour.
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=1))
    _joined = True
    return device


def close() -> None:
    """Leave the process group, after every rank has reached this point. Free the DDP-wrapped models first: if
    DDP's reducer holds the group's last reference, its destructor joins gloo's worker threads while holding the
    GIL, and a worker still freeing an all-reduce from a backward pass needs the GIL for that: a deadlock (seen
    in 1 of 6 runs on torch 2.13). Dropped here instead, the group is destroyed with the GIL released."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def share(items):
    """This rank's contiguous share of a list (or a tensor's first dimension) that every rank holds whole:
    rank r of W gets items[r * n / W : (r + 1) * n / W]. `len(items)` must divide by W (the trainers' checks
    make the batch's prompts divide)."""
    w, r = world(), rank()
    if len(items) % w:
        raise ValueError(f"{len(items)} items do not split evenly over {w} ranks")
    n = len(items) // w
    return items[r * n : (r + 1) * n]


def share_bounds(count: int) -> tuple[int, int]:
    """[first, end) of this rank's share of `count` items, split as `share` splits them, but allowing a count that
    does not divide: the first count % W ranks take one more. Used for generation, where shares may be uneven."""
    w, r = world(), rank()
    base, extra = divmod(count, w)
    first = r * base + min(r, extra)
    return first, first + base + (r < extra)


def all_sum(x):
    """The sum over the ranks of a tensor (on its device) or a number; `x` itself without torchrun."""
    if not active():
        return x
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None)
    t = t.clone() if torch.is_tensor(x) else t
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        t = t.cuda()
        dist.all_reduce(t)
        t = t.cpu()
    else:
        dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def rank_mean(x):
    """The mean over the ranks (all_sum / number of ranks); `x` itself without torchrun. A minibatch's token
    count per rank: DDP and FSDP2 average the ranks' gradients, so a rank's loss `sum of its token losses /
    rank_mean(its token count)` makes that average the whole minibatch's token mean."""
    return all_sum(x) / world() if active() else x


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any: decisions that every rank must take together (stop the run)."""
    return bool(all_sum(float(flag))) if active() else flag


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (pickled: for rollouts and metrics, not
    tensors of weights)."""
    if not active():
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast(value):
    """Rank 0's value (any picklable object) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# The trained models: wrapped for gradient reduction, and read back whole.
# ---------------------------------------------------------------------------------------------------------
class DDP(torch.nn.parallel.DistributedDataParallel):
    """torch's DDP, with the wrapped model's own attributes (`device`, `config`, `head`, ...) readable through
    it, so that a trainer's code reads the same wrapped or not."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model, fsdp: bool = False):
    """Under torchrun, `model` (trained, on this rank's device) ready for data-parallel training: replicated with
    DDP, or with `fsdp` sharded with FSDP2's fully_shard, each decoder layer its own unit (gathered for its
    forward and backward only), then the rest. Without torchrun: `model` itself. Wrap before building the
    optimizer: fully_shard replaces the parameters with sharded ones (DTensors)."""
    if not active():
        return model
    if fsdp:
        return fsdp_shard(model)
    device = next(model.parameters()).device
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_shard(model):
    """`model` sharded in place with FSDP2's fully_shard: each decoder layer its own unit (gathered whole only for
    its forward and backward), then the rest (embeddings, final norm, heads). Trained or frozen."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


def unwrap(model):
    """The model inside DDP (FSDP2 keeps the model itself, sharded)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def zero_loss(*outputs: torch.Tensor) -> torch.Tensor:
    """A loss of exactly 0 whose backward runs through the forward that gave `outputs` (a skipped micro-batch's
    log-probs, a critic's values): under torchrun a micro-batch one rank skips (the ratio guard) still runs its
    backward, so that this rank joins the gradient reduction the other ranks start in theirs (DDP's all-reduce,
    FSDP2's reduce-scatter, both hooked into backward), and adds nothing to its gradients. Log-probs and values
    are finite, so 0 times them is exactly 0 (a diverged ratio, which may be inf, is not used). One difference
    remains: when every micro-batch of a minibatch is skipped on every rank, the optimizer steps on zero
    gradients (AdamW's momentum still moves the weights), where one process has no gradients and AdamW leaves
    the weights alone."""
    return sum((o.float() * 0.0).sum() for o in outputs)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` whole, on the CPU, under their own names (no `module.` prefix).
    Under FSDP2 a collective: every rank must call it; each gets the whole tensors."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return model.state_dict()


def load_full_state_dict(model, state: dict, strict: bool = True) -> None:
    """The inverse of full_state_dict (every rank passes the whole state; FSDP2 keeps its shard of each)."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        model.load_state_dict(state, strict=strict)


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer's state as one process's optimizer has it (whole tensors under FSDP2: a collective)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


def load_optimizer_state_dict(model, optimizer, state: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
