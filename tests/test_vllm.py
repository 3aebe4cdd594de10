"""The vLLM backend, run for real: vLLM's CPU build here, the same code as on a GPU.

Selected with `-m vllm` (pytest.ini leaves them out of the plain `python -m pytest tests`):

    python -m pytest tests -q -m vllm

Where they are selected and `import vllm` fails, every one of them fails (CI's vLLM stage must not pass with
nothing run). One engine at a time: the in-process tests share one engine on
SmolLM2-135M (the offline default, whose generation config is given Qwen-like sampling extras that both
backends must ignore), then each script runs end to end with `--backend vllm` in its own process.
"""

import copy
import gc
import json
import math
import os
import shutil

import pytest
import torch

from conftest import TINY_TASK, run_script

pytestmark = pytest.mark.vllm

# vLLM's KV cache on the CPU: 1 GiB is plenty for these tests (common.generation's default is 2).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module", autouse=True)
def vllm_importable():
    """A fixture, so that it runs only for selected tests: the plain suite collects this module and leaves
    every test out, and passes without vLLM."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (torchvision built for another torch)
        pytest.fail(f"-m vllm selected the vLLM tests, but vLLM is not importable here ({type(e).__name__}: {e}): "
                    "install it as the README's vLLM section says", pytrace=False)


# Sampling options a model's generation config may carry (Qwen2.5-Instruct: repetition_penalty 1.05,
# top_k 20), much stronger: if either backend applied them, its samples and greedy outputs would show it.
EXTRAS = {"do_sample": True, "temperature": 0.05, "top_p": 0.3, "top_k": 1, "min_p": 0.5,
          "repetition_penalty": 1.5, "no_repeat_ngram_size": 1}


@pytest.fixture(scope="session")
def smollm2_with_extras(tmp_path_factory):
    """SmolLM2-135M-Instruct's folder with EXTRAS in its generation_config.json."""
    from common.models import DEFAULT_MODEL, ModelLoadError, resolve_model_path

    try:
        source = resolve_model_path(DEFAULT_MODEL)
    except ModelLoadError as e:
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("smollm2-extras")
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), folder / name)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **EXTRAS}))
    return str(folder)


def token_ids(out) -> list[list[int]]:
    return [c.token_ids for row in out for c in row]


def greedy_gaps(model, inputs, outputs) -> list[float]:
    """For each input, the largest gap between `model`'s top logit and the logit of the token the other
    backend chose greedily, over its output: ~0 when both run the same weights (bf16 ties aside)."""
    gaps = []
    with torch.no_grad():
        for ids, out in zip(inputs, outputs):
            if not out:
                gaps.append(0.0)
                continue
            logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1].float()
            chosen = logits.gather(1, torch.tensor(out)[:, None])[:, 0]
            gaps.append(float((logits.max(dim=1).values - chosen).max()))
    return gaps


class TestOneEngine:
    """Everything that runs in this process, on one engine (built once, eager: seconds, not minutes)."""

    @pytest.fixture(scope="class")
    def setup(self, smollm2_with_extras):
        from common.data import DEFAULT_DATASET, load_problems, prompt_ids
        from common.generation import make_generator
        from common.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(smollm2_with_extras)
        policy = load_model(smollm2_with_extras)
        assert policy.generation_config.top_k == 1  # the extras are there
        threads = torch.get_num_threads()
        vllm_gen = make_generator("vllm", policy, tokenizer, smollm2_with_extras, seed=0, enforce_eager=True)
        assert torch.get_num_threads() == threads  # the training part keeps the user's threads
        hf_gen = make_generator("hf", policy, tokenizer, smollm2_with_extras)
        inputs = [prompt_ids(tokenizer, p.question) for p in load_problems(DEFAULT_DATASET, "test", size=16)]
        shared = dict(vllm=vllm_gen, hf=hf_gen, policy=policy, tokenizer=tokenizer, inputs=inputs)
        yield shared
        shared.clear()  # the engine goes before the scripts below start theirs
        del vllm_gen
        gc.collect()

    def test_greedy_agrees_with_hf(self, setup):
        inputs, policy = setup["inputs"], setup["policy"]
        a = setup["hf"].generate(inputs, n=1, max_new_tokens=48, temperature=0.0)
        b = setup["vllm"].generate(inputs, n=1, max_new_tokens=48, temperature=0.0)
        same = sum(x == y for x, y in zip(token_ids(a), token_ids(b)))
        gaps = greedy_gaps(policy, inputs, token_ids(b))
        print(f"\nhf and vllm greedy: {same}/{len(inputs)} identical; gap to the fp32 policy's top logit "
              f"over vllm's tokens: median {sorted(gaps)[len(gaps) // 2]:.3f}, max {max(gaps):.3f}")
        # Both sample in bfloat16 with different kernels: a near tie can flip a token, and the rest of
        # that response then differs. Measured: 13 of 16 (23 of 32) identical, and every
        # token vLLM chose within 0.22 of the fp32 policy's top logit.
        assert same >= 0.6 * len(inputs)
        # Every token vLLM chose is (almost) the fp32 policy's own greedy choice.
        assert sum(g < 0.5 for g in gaps) >= 0.9 * len(inputs)

    def test_samples_ignore_the_models_generation_config(self, setup):
        # top_k 1 in the model's config would make all 6 samples of a prompt the greedy one
        inputs = setup["inputs"][:4]
        out = setup["vllm"].generate(inputs, n=6, max_new_tokens=16, temperature=1.0)
        assert all(len({tuple(c.token_ids) for c in row}) > 1 for row in out)
        assert token_ids(setup["vllm"].generate(inputs, n=6, max_new_tokens=16, temperature=1.0)) != token_ids(out)

    def test_completion_structure_matches_hf(self, setup):
        tokenizer, inputs = setup["tokenizer"], setup["inputs"][:4]
        budgets = [0, 1, 6, 48]  # one per input, as for continuations from prefixes of different lengths
        for backend in ("hf", "vllm"):
            gen = setup[backend]
            assert gen.eos_ids == {tokenizer.eos_token_id}
            out = gen.generate(inputs, n=3, max_new_tokens=budgets, temperature=0.6, seed=0)
            assert [len(row) for row in out] == [3] * 4
            for row, budget in zip(out, budgets):
                for c in row:
                    assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
                    assert len(c.token_ids) <= budget
                    assert c.finished == (bool(c.token_ids) and c.token_ids[-1] in gen.eos_ids)
                    assert not any(t in gen.eos_ids for t in c.token_ids[:-1])
                    if not c.finished:
                        assert len(c.token_ids) == budget
            assert out[0] == [out[0][0]] * 3 and out[0][0].token_ids == [] and not out[0][0].finished
            assert any(c.finished for c in out[3])  # SmolLM2 answers these in ~10-40 tokens

    def test_a_batch_larger_than_one_engine_step(self, setup):
        # 48 prompts of ~250 tokens: more than one engine step's token budget, so some prefills are split
        # across steps (vLLM's CPU build used to fail there on seeded requests, VinePPO's first step).
        long_inputs = [ids * 6 for ids in setup["inputs"]] * 3
        assert sum(map(len, long_inputs)) > 8192
        out = setup["vllm"].generate(long_inputs, n=2, max_new_tokens=2, temperature=1.0, seed=0)
        assert all(len(row) == 2 and all(1 <= len(c.token_ids) <= 2 for c in row) for row in out)

    def test_every_eos_token_ends_the_completion(self, setup):
        # Qwen2.5-Instruct stops on <|im_end|> and <|endoftext|>. Here " =" plays the second EOS: it is
        # in almost every answer of the default task ("5 + 10 = 15").
        tokenizer, inputs = setup["tokenizer"], setup["inputs"][:8]
        equals = tokenizer.encode(" =", add_special_tokens=False)[0]
        results = {}
        for backend in ("hf", "vllm"):
            gen = setup[backend]
            saved = gen.eos_ids
            gen.eos_ids = saved | {equals}
            try:
                if backend == "hf":
                    gen.generation_config.eos_token_id = sorted(gen.eos_ids)
                results[backend] = gen.generate(inputs, n=1, max_new_tokens=32, temperature=0.0)
            finally:
                gen.eos_ids = saved
                if backend == "hf":
                    gen.generation_config.eos_token_id = sorted(saved)
        for backend, out in results.items():
            completions = [c for row in out for c in row]
            assert all(c.finished == (c.token_ids[-1] in (equals, tokenizer.eos_token_id)) for c in completions)
            assert all(equals not in c.token_ids[:-1] for c in completions)
            assert sum(c.token_ids[-1] == equals for c in completions) >= 4
        assert sum(x == y for x, y in zip(token_ids(results["hf"]), token_ids(results["vllm"]))) >= 5

    def test_continuation_from_a_prefix(self, setup):
        gen, inputs = setup["vllm"], setup["inputs"][:8]
        full = token_ids(gen.generate(inputs, n=1, max_new_tokens=32, temperature=0.0))
        prefixes = [ids + out[:3] for ids, out in zip(inputs, full)]
        rest = token_ids(gen.generate(prefixes, n=1, max_new_tokens=[32 - len(out[:3]) for out in full],
                                      temperature=0.0))
        assert sum(out[:3] + r == out for out, r in zip(full, rest)) >= 6  # bf16: a tie may flip

    def test_synced_weights_arrive(self, setup):
        policy, inputs, gen = setup["policy"], setup["inputs"], setup["vllm"]
        before = token_ids(gen.generate(inputs, n=1, max_new_tokens=48, temperature=0.0))
        perturbed = copy.deepcopy(policy)
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in perturbed.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * 0.03 * p.std())
        gen.sync_weights(perturbed)
        after = token_ids(gen.generate(inputs, n=1, max_new_tokens=48, temperature=0.0))
        hf = copy.deepcopy(setup["hf"])
        hf.sync_weights(perturbed)
        hf_after = token_ids(hf.generate(inputs, n=1, max_new_tokens=48, temperature=0.0))
        changed = sum(x != y for x, y in zip(before, after))
        same = sum(x == y for x, y in zip(hf_after, after))
        gaps = greedy_gaps(perturbed, inputs, after)
        stale = greedy_gaps(policy, inputs, after)
        print(f"\nafter a sync: {changed}/{len(inputs)} greedy outputs changed, {same}/{len(inputs)} identical to hf "
              f"on the perturbed policy; max gap to it {max(gaps):.3f} (to the old policy {max(stale):.3f})")
        assert changed >= 0.5 * len(inputs)
        assert same >= 0.5 * len(inputs)
        assert sum(g < 0.5 for g in gaps) >= 0.9 * len(inputs)
        # and back: the original weights give the original outputs exactly
        gen.sync_weights(policy)
        assert token_ids(gen.generate(inputs, n=1, max_new_tokens=48, temperature=0.0)) == before

    def test_sampler_logprobs_are_the_processed_ones(self, setup):
        """Both backends return, with each sampled token, its log-prob under the distribution it was drawn from:
        after temperature (near the fp32 learner's log_softmax(logits / T), far from the raw T = 1 one) and, with
        top-p, renormalised over the nucleus (never below the learner's). Greedy completions carry none."""
        import numca

        policy, tokenizer, inputs = setup["policy"], setup["tokenizer"], setup["inputs"][:8]
        for backend in ("hf", "vllm"):
            gen = setup[backend]
            assert all(c.logprobs is None for row in gen.generate(inputs, n=1, max_new_tokens=4, temperature=0.0)
                       for c in row)
            gaps = {}
            for top_p in (1.0, 0.5):
                completions = [c for row in gen.generate(inputs, n=2, max_new_tokens=24, temperature=0.7, top_p=top_p,
                                                         seed=0) for c in row]
                assert all(len(c.logprobs) == len(c.token_ids) and all(lp <= 1e-6 for lp in c.logprobs)
                           for c in completions)
                batch = numca.make_batch([p for p in inputs for _ in range(2)], [c.token_ids for c in completions],
                                         tokenizer.pad_token_id)
                mask = batch.response_mask
                sampled = torch.zeros_like(mask)
                for b, c in enumerate(completions):
                    sampled[b, : len(c.logprobs)] = torch.tensor(c.logprobs)
                with torch.no_grad():
                    at_t, raw = (numca.response_logprobs(policy, batch, t) for t in (0.7, 1.0))
                gaps[top_p] = ((sampled - at_t) * mask).sum() / mask.sum()
                if top_p == 1.0:
                    abs_gap = ((sampled - at_t).abs() * mask).sum() / mask.sum()
                    raw_gap = ((sampled - raw).abs() * mask).sum() / mask.sum()
                    print(f"\n{backend}: mean |sampler - fp32 learner| {abs_gap:.4f} at T = 0.7, {raw_gap:.4f} against T = 1")
                    assert abs_gap < 0.1 and raw_gap > 3 * abs_gap
            # top-p 0.5: each token's sampler log-prob is the learner's minus log(nucleus mass) > 0
            print(f"{backend}: mean (sampler - learner) {gaps[1.0]:+.4f} at top-p 1, {gaps[0.5]:+.4f} at top-p 0.5")
            assert gaps[0.5] > gaps[1.0] + 0.05

    def test_sleep_is_a_no_op_on_the_cpu(self, setup):
        gen = setup["vllm"]
        assert not gen.can_sleep
        before = gen.generate(setup["inputs"][:2], n=1, max_new_tokens=8, temperature=0.0)
        gen.sleep()
        assert gen.generate(setup["inputs"][:2], n=1, max_new_tokens=8, temperature=0.0) == before
        gen.sync_weights(setup["policy"])
        # vLLM's CPU worker disables torch.set_num_threads; make_generator gave it back
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(threads)

    def test_a_request_longer_than_max_model_len_is_an_error(self, setup):
        gen = setup["vllm"]
        assert gen.max_model_len == 4096  # SmolLM2 has 8192 positions; the default caps at 4096
        with pytest.raises(SystemExit, match="--vllm-max-model-len"):
            gen.generate([setup["inputs"][0]], n=1, max_new_tokens=4096)


# Each script end to end, two steps with an evaluation after each, generation by vLLM (eager).
SMALL = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
         "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12", "--eval-every", "1"]
SCRIPTS = {
    "ppo.py": SMALL,
    "vineppo.py": SMALL + ["--num-mc-rollouts", "2"],
    "numca.py": SMALL,
    "hista.py": SMALL + ["--interval", "4"],
    "prime_implicit_prm.py": SMALL,
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_trainer_end_to_end_with_vllm(script, tmp_path):
    proc = run_script(script, *TINY_TASK, "--backend", "vllm", "--vllm-enforce-eager",
                      "--output-dir", str(tmp_path), *SCRIPTS[script], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Initializing a V1 LLM engine" in log and "max_seq_len=2048" in log  # the tiny model's 2048 positions
    assert "were not loaded" not in log  # vLLM's warning for a weight that a sync missed
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["losses/policy_loss"]) for r in train)
    assert any(r["charts/reward_mean"] > 0 for r in train)  # vLLM's samples of the tiny model earn rewards
    # vLLM's own log-probs reach the mismatch statistics (numca.py and hista.py also weight the loss with them)
    assert all(math.isfinite(r["mismatch/kl"]) and r["mismatch/logp_abs_diff_max"] > 0 for r in train)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1, 2]


def test_killed_run_resumes_to_the_same_metrics_with_vllm(tmp_path):
    """--resume with --backend vllm: the engine is rebuilt from the model's folder, then given the restored
    policy's weights; each step's sampling seed is set per request, so the resumed run samples what the
    uninterrupted one did and logs the same numbers."""
    from test_trainers import resumed_equals_uninterrupted

    resumed_equals_uninterrupted("numca.py", tmp_path, "--backend", "vllm", "--vllm-enforce-eager")


def test_gpu_check_vllm_cycle_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py's vLLM rows (sleep -> sync -> generate twice, against the hf backend on the same
    weights) on the CPU smoke model, after one trainer's rows; the plain suite runs it with --skip-vllm."""
    proc = run_script("benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--scripts", "ppo.py", "--out",
                      str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("vllm ")]
    assert rows and all("pass" in row for row in rows), proc.stdout[-3000:]
    assert "skipped: the vLLM cycle" not in proc.stdout


def test_sveb_end_to_end_with_vllm(tmp_path):
    proc = run_script("sveb_eval.py", "--model", "tiny", "--backend", "vllm", "--vllm-enforce-eager",
                      "--dataset", "arithmetic", "--output-dir", str(tmp_path), "--num-problems", "3",
                      "--num-presamples", "2", "--population", "all", "--group-size", "2", "--num-truth", "3",
                      "--mc-k", "3", "--num-train-problems", "2", "--max-new-tokens", "8", "--no-train-filters",
                      "--critic-batch-size", "2", "--critic-eval-every", "1", "--prm-batch-size", "2",
                      "--prm-minibatch-size", "2", "--micro-batch-size", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Initializing a V1 LLM engine" in proc.stdout + proc.stderr


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4", "--learning-rate", "1e-2"]], ids=["full", "lora"])
def test_two_vllm_engines_under_torchrun(lora, tmp_path):
    """2 processes of torchrun, each with its own vLLM CPU engine generating its half of the prompts (and of the
    evaluation), gradients reduced over gloo; with LoRA the engines receive the merged weights. (vLLM samples from
    its engine's own generator, not per call: the 2 engines draw other samples than 1 would, so the first update
    is compared across process counts with the hf backend, in tests/test_distributed.py.)"""
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "ppo.py", *TINY_TASK, "--backend", "vllm", "--vllm-enforce-eager",
                           "--output-dir", str(tmp_path), *SCRIPTS["ppo.py"], *lora],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in log, log[-4000:]
    assert log.count("Initializing a V1 LLM engine") == 2  # one engine per rank
    assert "were not loaded" not in log  # every engine parameter got its (merged) weights
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["losses/policy_loss"]) for r in train)
    from transformers import AutoModelForCausalLM

    assert not any("lora" in k for k in AutoModelForCausalLM.from_pretrained(run_dir / "final_model").state_dict())
