"""Several processes under torchrun (common/distributed.py) and LoRA (common/models.py), on the CPU with gloo.

- The reductions on 2 ranks: shares, sums, gathers, and a DDP loss written as a token mean over the ranks'
  unequal token counts, whose averaged gradient must be the single-process one (a factor-of-2 slip or a per-rank
  mean instead of the whole batch's would fail it); a rank that skips its micro-batch still joins the reduction.
- The same first update at the same total batch: ppo.py (policy, critic, whitening over the ranks, reference) run
  by torchrun as 2 processes with half the prompts each, with DDP and with FSDP2, against 1 process with all of
  them, under an optimizer set to plain gradient descent (AdamW with eps = lr, no clipping), so that any error of
  scale in the reductions moves the weights.
- LoRA under torchrun with FSDP2: the checkpoint holds the adapters (and the critic's head), --resume continues
  to the metrics of a run that never stopped, the final model is merged (it loads as a plain transformers model).
- LoRA's pieces: the merged weights are PEFT's own merge, the reference (adapters off) is the base model.
- Bad input: one "error:" line before any model is loaded.
"""

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from common.models import TINY_MODEL
from conftest import ROOT, TINY_TASK, without_timing

pytest.importorskip("peft")

# One step of 4 prompts x 2 samples, the whole batch one minibatch (so that the 1-process and the 2-process run
# take the same optimizer steps); float32 (no bf16 autocast); each generate call one prompt's samples
# (--gen-batch-size 2), so that both runs sample the same tokens (HFGenerator's first_row seeding).
SAME_UPDATE = [*TINY_TASK, "--num-steps", "1", "--num-prompts", "4", "--samples-per-prompt", "2",
               "--minibatch-size", "8", "--micro-batch-size", "2", "--gen-batch-size", "2", "--max-new-tokens", "8",
               "--num-eval-problems", "2", "--bf16", "off", "--learning-rate", "10", "--critic-learning-rate", "10",
               "--adam-eps", "10", "--max-grad-norm", "1e9"]


def torchrun(nproc: int, script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    (run_dir,) = out.iterdir()
    return load_file(run_dir / "final_model" / "model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    return without_timing([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])


# ---- the reductions, on 2 ranks of gloo ----
def _reductions_worker(rank: int, port: int) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from common import distributed as dist

    assert dist.init("cpu") == "cpu" and dist.world() == 2 and dist.is_main() == (rank == 0)
    assert dist.share(list(range(8))) == list(range(4 * rank, 4 * rank + 4))
    assert dist.share_bounds(5) == [(0, 3), (3, 5)][rank]  # generation's uneven shares
    assert dist.gather([rank, rank]) == [0, 0, 1, 1]
    assert dist.all_sum(torch.tensor(rank + 1.0)).item() == 3.0 and dist.rank_mean(rank + 1.0) == 1.5
    assert dist.any_rank(rank == 1) and not dist.any_rank(False)
    assert dist.broadcast(f"rank {rank}") == "rank 0"

    # A token-mean loss over the whole batch: rank 0 holds 3 tokens, rank 1 holds 5.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8)
    expected = torch.autograd.grad(((model(x).squeeze(-1) - y) ** 2).mean(), model.weight)[0]
    ddp = dist.wrap(model)
    mine = slice(0, 3) if rank == 0 else slice(3, 8)
    token_losses = (ddp(x[mine]).squeeze(-1) - y[mine]) ** 2
    (token_losses.sum() / dist.rank_mean(torch.tensor(float(len(token_losses))))).backward()
    torch.testing.assert_close(model.weight.grad, expected)

    # Rank 1 skips its micro-batch: its backward of zero joins the reduction, the gradient is rank 0's half.
    model.zero_grad()
    out = ddp(x[mine]).squeeze(-1)
    own = torch.autograd.grad(((model(x[:3]).squeeze(-1) - y[:3]) ** 2).sum(), model.weight)[0] if rank == 0 else None
    (((out - y[mine]) ** 2).sum() if rank == 0 else dist.zero_loss(out)).backward()
    if rank == 0:
        torch.testing.assert_close(model.weight.grad, own / 2)
    still_wrapped = weakref.ref(ddp)
    del ddp, out  # DDP goes before the process group does (see common.distributed.close: else it can deadlock)
    assert still_wrapped() is None
    dist.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reductions_over_two_ranks():
    # Waits at most 3 minutes (the ranks take ~15 s): a deadlocked rank fails the test instead of holding the suite
    # for the process group's one-hour timeout. A rank's exception is raised here by join().
    ranks = torch.multiprocessing.start_processes(_reductions_worker, args=(free_port(),), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the 2 gloo ranks were still running after 180 s: a deadlock (py-spy dump shows where)")


# ---- the same first update, 2 processes against 1 ----
@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    torchrun(1, "ppo.py", *SAME_UPDATE, "--output-dir", str(out))
    return out


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_make_the_first_update_of_one(one_process, sharding, tmp_path):
    from common.models import load_model

    torchrun(2, "ppo.py", *SAME_UPDATE, *sharding, "--output-dir", str(tmp_path))
    start = load_model(TINY_MODEL).state_dict()
    one, two = final_weights(one_process), final_weights(tmp_path)
    update = max((one[k] - start[k]).abs().max().item() for k in one)
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    assert update > 0.01, update  # the step moved the weights (lr 10 on gradients of ~0.1)
    assert gap <= 1e-5 * update, (gap, update)  # measured: 3e-7 against 1.35, the order of float sums
    (one_dir,), (two_dir,) = one_process.iterdir(), tmp_path.iterdir()
    # The logged step: the same names, and the same batch (charts/: rewards, lengths, truncation, averaged over the
    # ranks). The losses/ are means of micro-batch means, whose partition differs with the number of processes.
    for a, b in zip(metrics(one_dir), metrics(two_dir)):
        assert a.keys() == b.keys()
        for key in (k for k in a if k.startswith("charts/")):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert any(r.get("charts/reward_mean", 0) > 0 for r in metrics(one_dir))  # rewards of both kinds in the batch


# ---- LoRA under torchrun: checkpoints of adapters, resume, a merged final model ----
def test_lora_with_fsdp_checkpoints_adapters_resumes_and_saves_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    from common.checkpoint import load_checkpoint
    from common.models import load_model

    lora = [*TINY_TASK, "--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
            "--minibatch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "8", "--num-eval-problems", "2",
            "--eval-every", "2", "--lora-rank", "4", "--learning-rate", "1e-2", "--save-every", "1",
            "--keep-checkpoints", "2", "--fsdp"]  # FSDP2 too: its checkpoints gather the sharded adapters
    torchrun(2, "ppo.py", *lora, "--output-dir", str(tmp_path))
    (run_dir,) = tmp_path.iterdir()
    state = load_checkpoint(run_dir / "checkpoints" / "step_000001")
    assert all(".lora_" in k for k in state["models"]["policy"])  # the adapters only: the base is --model
    assert {k for k in state["models"]["critic"] if ".lora_" not in k} == {"head.weight", "head.bias"}
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final_model")  # a plain transformers model
    base = load_model(TINY_MODEL).state_dict()
    assert not any("lora" in k for k in merged.state_dict())
    assert max((merged.state_dict()[k] - base[k]).abs().max().item() for k in base) > 0  # the adapters merged in
    first = final_weights(tmp_path)

    # Back to after step 1, then --resume under torchrun: the same metrics and the same final model.
    expected = metrics(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    shutil.rmtree(run_dir / "final_model")
    torchrun(2, "ppo.py", "--resume", str(run_dir))
    assert metrics(run_dir) == expected
    resumed = final_weights(tmp_path)
    assert all(torch.equal(first[k], resumed[k]) for k in first)


# ---- LoRA's pieces ----
def test_merged_weights_are_peft_merge_and_the_reference_is_the_base():
    from common.models import AdapterOff, load_model, plain_model, sampler_weights

    policy = load_model(TINY_MODEL, lora_rank=4, lora_target_modules="q_proj,v_proj,down_proj")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # PEFT starts B at 0 (the adapter a no-op): give it something to merge
    ours = dict(sampler_weights(policy))
    peft_merge = copy.deepcopy(policy).merge_and_unload()  # PEFT's own merge (it mutates: on a copy)
    assert ours.keys() == dict(peft_merge.named_parameters()).keys()
    for name, w in peft_merge.named_parameters():
        torch.testing.assert_close(ours[name], w.detach())
    base = load_model(TINY_MODEL)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(AdapterOff(policy)(input_ids=ids).logits, base(input_ids=ids).logits)
        assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits)  # the adapter counts
        torch.testing.assert_close(plain_model(policy)(input_ids=ids).logits, policy(input_ids=ids).logits)


def test_memory_counts_lora_and_sharding():
    from common.models import lora_params, training_memory_gib

    shape = {"params": 8 * 2**30, "hidden": 1024, "intermediate": 4096, "layers": 8, "vocab": 1000}
    full = training_memory_gib(shape, 1, 1, 2, 0, 1, 16, 8, False)
    assert full["trainable"] == 96 and full["gradients"] == 32 and full["frozen"] == 16
    sharded = training_memory_gib(shape, 1, 1, 2, 0, 1, 16, 8, False, shards=8)
    assert sharded["trainable"] == 12 and sharded["gradients"] == 4 and sharded["frozen"] == 2
    assert sharded["fsdp_gather"] == 8 * 8 / 8  # one layer's float32 weights and gradients, whole
    A = lora_params(shape, 16)
    assert A == 16 * 8 * (11 * 1024 + 3 * 4096)
    lora = training_memory_gib(shape, 1, 0, 2, 0, 1, 16, 8, False, lora_rank=16, base_bytes=2)
    assert lora["trainable"] == pytest.approx(16 + 12 * A / 2**30) and lora["gradients"] == pytest.approx(4 * A / 2**30)
    assert lora["frozen"] == 0 and lora["autocast"] == pytest.approx(2 * A / 2**30)


# ---- bad input: one line, from the checks that run before any model is loaded ----
@pytest.mark.parametrize("script, argv, env, message", [
    ("ppo", ["--lora-rank", "-1"], {}, "--lora-rank must be >= 0"),
    ("numca", ["--fsdp"], {}, "--fsdp shards the models over the processes of torchrun"),
    ("vineppo", ["--num-prompts", "3"], {"WORLD_SIZE": "2", "RANK": "0"}, "must divide by the 2 processes"),
    ("hista", ["--num-prompts", "2", "--samples-per-prompt", "2", "--micro-batch-size", "4", "--minibatch-size", "4"],
     {"WORLD_SIZE": "2", "RANK": "0"}, "--micro-batch-size 4 must divide"),
    ("prime_implicit_prm", ["--lora-rank", "4", "--ref-on-cpu"], {}, "--ref-on-cpu has nothing to move"),
])
def test_bad_parallel_input_is_one_line(script, argv, env, message, monkeypatch):
    import importlib

    import tyro

    module = importlib.import_module(script)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as raised:
        module.check_args(tyro.cli(module.Args, args=[*TINY_TASK, *argv]))
    assert str(raised.value).startswith("error:") and message in str(raised.value) and "\n" not in str(raised.value)
