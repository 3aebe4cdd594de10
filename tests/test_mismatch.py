"""The sampler-learner mismatch (issue 28): the sampler's log-probs from the hf backend, rollout_correction in
every trainer against a plain loop, the mismatch statistics, CISPO's loss on hand-worked numbers, the flags, and
each correction mode end to end. The vLLM backend's log-probs are tested in test_vllm.py."""

import importlib
import json
import math

import pytest
import torch
import tyro

from common.generation import HFGenerator, SampledLogprobs
from common.mismatch import mismatch_stats, sampler_logprobs
from conftest import run_script, run_tiny

TRAINERS = ["ppo", "vineppo", "numca", "hista", "prime_implicit_prm"]
MODES = ["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
PROMPTS = [[1, 9690, 198, 2683], [1, 9690, 198], [1, 2683, 359, 314, 260]]


# ---- rollout_correction: every trainer's copy against a per-element loop ----
def naive_rollout_correction(logprobs, sampler_logprobs, mask, mode, cap):
    """TRL's vllm_importance_sampling_mode written out one element at a time."""
    B, T = logprobs.shape
    out = torch.zeros(B, T)
    for b in range(B):
        tokens = [t for t in range(T) if mask[b, t] > 0]
        seq_ratio = math.exp(sum(float(logprobs[b, t] - sampler_logprobs[b, t]) for t in tokens))
        for t in tokens:
            if mode == "none":
                out[b, t] = 1.0
                continue
            ratio = seq_ratio if mode.startswith("sequence") else math.exp(float(logprobs[b, t] - sampler_logprobs[b, t]))
            if mode.endswith("truncate"):
                out[b, t] = min(ratio, cap)
            else:
                out[b, t] = 0.0 if ratio > cap else ratio
    return out


@pytest.mark.parametrize("module_name", TRAINERS)
@pytest.mark.parametrize("mode", MODES)
def test_rollout_correction_matches_a_loop(module_name, mode):
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    B, T = 7, 6
    mask = (torch.arange(T)[None] < torch.tensor([6, 1, 3, 6, 2, 5, 4])[:, None]).float()
    sampler = -torch.rand(B, T) * 4
    # per-token gaps from tiny to large, so that both the token and the sequence ratios cross the cap
    logprobs = sampler + torch.randn(B, T) * torch.tensor([0.01, 0.3, 1.0, 0.05, 2.0, 0.5, 0.2])[:, None]
    logprobs = torch.where(mask > 0, logprobs, torch.full_like(logprobs, -200.0))  # padding: garbage
    weights = module.rollout_correction(logprobs, sampler, mask, mode, 1.5)
    expected = naive_rollout_correction(logprobs, sampler, mask, mode, 1.5)
    assert weights.shape == (B, T)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    if mode != "none":  # the inputs reach past the cap: the mode has something to do
        assert (expected * mask).max() <= 1.5 and (expected[mask > 0] < 1).any()


@pytest.mark.parametrize("module_name", TRAINERS)
def test_rollout_correction_hand_worked(module_name):
    module = importlib.import_module(module_name)
    # one response of two tokens with log-ratios ln 2 and ln 0.5 (sequence ratio 1), one of one token at ln 4
    logprobs = torch.tensor([[math.log(2), math.log(0.5)], [math.log(4), 0.0]])
    sampler = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    run = lambda mode: module.rollout_correction(logprobs, sampler, mask, mode, 3.0)  # noqa: E731
    torch.testing.assert_close(run("token_truncate"), torch.tensor([[2.0, 0.5], [3.0, 0.0]]))
    torch.testing.assert_close(run("token_mask"), torch.tensor([[2.0, 0.5], [0.0, 0.0]]))
    torch.testing.assert_close(run("sequence_truncate"), torch.tensor([[1.0, 1.0], [3.0, 0.0]]))
    torch.testing.assert_close(run("sequence_mask"), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(run("none"), mask)
    with pytest.raises(ValueError, match="unknown rollout correction"):
        run("sequence")


# ---- the weights reach the policy loss ----
@pytest.mark.parametrize("module_name", TRAINERS)
def test_policy_loss_weights_each_token(module_name):
    module = importlib.import_module(module_name)
    clip = (0.2, 0.28) if module_name in ("numca", "hista") else (0.2,)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = logprobs.detach().clone()  # ratio 1: each token's loss is -A
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.ones(1, 3)
    weights = torch.tensor([[0.5, 0.0, 2.0]])
    loss, *_ = module.ppo_policy_loss(logprobs, old, adv, mask, *clip, weights)
    assert loss.item() == pytest.approx((-0.5 + 0 - 6) / 3)
    loss.backward()  # at ratio 1 d(-A r)/d log p = -A, times the weight
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.0, -6.0]]) / 3)
    unweighted, *_ = module.ppo_policy_loss(logprobs, old, adv, mask, *clip)
    assert unweighted.item() == pytest.approx((-1 + 2 - 3) / 3)


# ---- CISPO (numca.py, hista.py) on hand-worked numbers ----
@pytest.mark.parametrize("module_name", ["numca", "hista"])
def test_cispo_loss_hand_worked(module_name):
    module = importlib.import_module(module_name)
    # ratios 2, 8 (above the cap 5), 1 and a padded 4th token; A = 1, 1, -1; weights 1, 0.5, 1
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -50.0]], requires_grad=True)
    old = logprobs.detach() - torch.tensor([[math.log(2), math.log(8), 0.0, 30.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights = torch.tensor([[1.0, 0.5, 1.0, 0.0]])
    loss, clipfrac, approx_kl, ratio = module.cispo_policy_loss(logprobs, old, adv, mask, 5.0, weights)
    # per token -min(r, 5) * A * log p * w: -2*1*(-1)*1 = 2, -5*1*(-2)*0.5 = 5, -1*(-1)*(-0.5)*1 = -0.5
    assert loss.item() == pytest.approx((2 + 5 - 0.5) / 3)
    loss.backward()
    # the clipped ratio is detached: d/d log p = -min(r, 5) * A * w / 3; nothing from the padded token
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.0, -2.5, 1.0, 0.0]]) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)  # ratio 8 > 5 with A > 0 (TRL's cispo_clip_ratio)
    assert ratio.item() == pytest.approx((2 + 8 + 1) / 3)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(2) ** 2 + math.log(8) ** 2) / 3)
    # no lower clip: a ratio of 0.01 with A < 0 still gets its gradient (PPO's clip would drop it)
    lp = torch.tensor([[-1.0]], requires_grad=True)
    module.cispo_policy_loss(lp, lp.detach() - math.log(0.01), torch.tensor([[-1.0]]), torch.ones(1, 1), 5.0)[0].backward()
    assert lp.grad.item() == pytest.approx(0.01)


# ---- the mismatch statistics ----
def test_mismatch_stats_hand_worked():
    # log p_learner - log p_sampler: ln 2 and -ln 2 on response 1, 0 on response 2 (one token), padding after
    logprobs = torch.tensor([[math.log(2) - 1, -math.log(2) - 1], [-3.0, 99.0]])
    sampled = torch.tensor([[-1.0, -1.0], [-3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    k3 = [2 - 1 - math.log(2), 0.5 - 1 + math.log(2), 0.0]  # r - 1 - ln r
    stats = mismatch_stats(logprobs, sampled, mask, mask, "none", 3.0)
    assert stats["mismatch/kl"] == pytest.approx(sum(k3) / 3)
    assert stats["mismatch/kl_seq"] == pytest.approx((k3[0] + k3[1] + k3[2]) / 2)
    assert stats["mismatch/logp_abs_diff_mean"] == pytest.approx(2 * math.log(2) / 3)
    assert stats["mismatch/logp_abs_diff_max"] == pytest.approx(math.log(2))  # the padded 99 does not count
    assert "mismatch/weight_mean" not in stats
    # token_mask at cap 1.5: the ratio-2 token is masked; weights 0, 0.5, 1 over the 3 tokens
    weights = torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    stats = mismatch_stats(logprobs, sampled, mask, weights, "token_mask", 1.5)
    assert stats["mismatch/weight_mean"] == pytest.approx(0.5) and stats["mismatch/weight_max"] == 1.0
    assert stats["mismatch/capped_frac"] == pytest.approx(1 / 3)
    # the sequence modes count responses: both sequence ratios are 1, both above a cap of 0.9
    stats = mismatch_stats(logprobs, sampled, mask, torch.tensor([[0.9, 0.9], [0.9, 0.0]]), "sequence_truncate", 0.9)
    assert stats["mismatch/capped_frac"] == 1.0 and stats["mismatch/weight_mean"] == pytest.approx(0.9)


def test_sampler_logprobs_layout():
    from common.generation import Completion

    out = sampler_logprobs([Completion([5, 6], "", True, [-0.5, -1.5]), Completion([7], "", False, [-2.0])], "cpu")
    torch.testing.assert_close(out, torch.tensor([[-0.5, -1.5], [-2.0, 0.0]]))
    with pytest.raises(ValueError, match="without sampler log-probs"):
        sampler_logprobs([Completion([5], "", True, None)], "cpu")


# ---- the hf backend's sampler log-probs ----
def learner_logprobs(model, completions, temperature, module):
    batch = module.make_batch([p for p in PROMPTS for _ in range(2)], [c.token_ids for c in completions], 0)
    with torch.no_grad():
        return module.response_logprobs(model, batch, temperature) * batch.response_mask, batch.response_mask


def test_same_float32_numerics_give_no_mismatch(tiny_model, tokenizer):
    """Sampler = learner in float32 (the hf backend sampling from the policy itself, no autocast): the mismatch
    is 0 up to rounding (a KV-cached decode against one full forward pass: float32 sums in another order, over
    logits of size ~20 for the taught tiny model, ~3e-5 at most). The default bfloat16 copy is not (> 1e-2)."""
    import numca

    for dtype, tolerance in ((None, 1e-4), (torch.bfloat16, None)):
        gen = HFGenerator(tiny_model, tokenizer, dtype=dtype)
        completions = [c for row in gen.generate(PROMPTS, n=2, max_new_tokens=12, temperature=0.7, seed=0) for c in row]
        assert all(len(c.logprobs) == len(c.token_ids) for c in completions)
        learner, mask = learner_logprobs(tiny_model, completions, 0.7, numca)
        stats = mismatch_stats(learner, sampler_logprobs(completions, "cpu"), mask, mask, "none", 3.0)
        if tolerance is not None:
            assert stats["mismatch/logp_abs_diff_max"] < tolerance and abs(stats["mismatch/kl"]) < 1e-8, stats
        else:  # the bfloat16 copy: a real gap, so the check above can fail
            assert stats["mismatch/logp_abs_diff_max"] > 100 * 1e-4, stats


def test_top_p_logprobs_are_within_the_nucleus(tiny_model, tokenizer):
    """With top-p < 1 the sampler's log-prob is renormalised over the nucleus: it exceeds the learner's full-vocabulary
    log-prob by exactly -log(the nucleus's mass) at each step."""
    import numca

    gen = HFGenerator(tiny_model, tokenizer, dtype=None)
    completions = [c for row in gen.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.7, top_p=0.5, seed=1)
                   for c in row]
    learner, mask = learner_logprobs(tiny_model, completions, 0.7, numca)
    sampled = sampler_logprobs(completions, "cpu")
    batch = numca.make_batch([p for p in PROMPTS for _ in range(2)], [c.token_ids for c in completions], 0)
    with torch.no_grad():
        T = mask.shape[1]
        logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).logits[:, -T - 1 : -1].float() / 0.7
    probs = logits.softmax(-1).sort(-1, descending=True).values
    # transformers' top-p keeps the smallest set of most likely tokens whose mass reaches 0.5
    kept = (probs.cumsum(-1) - probs) < 0.5
    nucleus_mass = (probs * kept).sum(-1)  # (B, T)
    gap = (sampled - learner) * mask
    torch.testing.assert_close(gap, -nucleus_mass.log() * mask, rtol=1e-4, atol=1e-4)
    assert gap[mask > 0].max() > 0.1  # some steps' nucleus at 0.5 leaves out a real share of the mass


def test_hf_sampling_draws_what_transformers_own_warpers_draw(tiny_model, tokenizer):
    """The backend applies temperature and top-p itself (so that its recorder reads the final scores): the tokens it
    draws are those transformers' own warpers draw from the same seed."""
    gen = HFGenerator(tiny_model, tokenizer, dtype=None)
    ids = torch.tensor([PROMPTS[0]] * 3)
    for top_p in (1.0, 0.8):
        # T = 1.5: the taught tiny model is sure of most tokens; hotter, its three samples differ
        ours = [c.token_ids for c in gen.generate(PROMPTS[:1], n=3, max_new_tokens=10, temperature=1.5, top_p=top_p,
                                                   seed=5)[0]]
        torch.manual_seed(5)
        theirs = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen.generation_config,
                                     do_sample=True, temperature=1.5, top_p=top_p, top_k=0, max_new_tokens=10)
        assert ours == [row[: len(o)] for row, o in zip(theirs[:, ids.shape[1]:].tolist(), ours)]
        assert len(set(map(tuple, ours))) > 1  # real samples, not one greedy path


def test_recorder_reads_each_drawn_token_once():
    rec = SampledLogprobs()
    scores = [torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 0.0]])]
    rec(torch.tensor([[9]]), scores[0])
    rec(torch.tensor([[9, 2]]), scores[1])  # token 2 was drawn from scores[0]
    out = rec.read(torch.tensor([[2, 0]]))  # token 0 drawn from scores[1], read after generate
    torch.testing.assert_close(out, torch.stack([scores[0].log_softmax(-1)[0, 2], scores[1].log_softmax(-1)[0, 0]])[None])
    # a step that generate ran past the stop and undid: its token is dropped, the last read is not repeated
    rec(torch.tensor([[9, 2, 0]]), torch.zeros(1, 3))
    assert rec.read(torch.tensor([[2, 0]])).shape == (1, 2)
    torch.testing.assert_close(rec.read(torch.tensor([[2, 0]])), out)


def test_greedy_completions_carry_no_logprobs(tiny_model, tokenizer):
    gen = HFGenerator(tiny_model, tokenizer, dtype=None)
    assert all(c.logprobs is None for row in gen.generate(PROMPTS, n=1, max_new_tokens=4, temperature=0.0) for c in row)


# ---- the flags ----
TINY = ["--model", "tiny-random", "--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "12"]
DEFAULTS = {"ppo": "none", "vineppo": "none", "prime_implicit_prm": "none", "numca": "sequence_mask",
            "hista": "sequence_mask"}


@pytest.mark.parametrize("module_name", TRAINERS)
def test_flags_defaults_and_ranges(module_name):
    module = importlib.import_module(module_name)
    args = tyro.cli(module.Args, args=TINY)
    assert (args.rollout_correction, args.rollout_correction_cap) == (DEFAULTS[module_name], 3.0)
    for cap in ("0.5", "nan"):
        args = tyro.cli(module.Args, args=TINY + ["--rollout-correction", "token_mask", "--rollout-correction-cap", cap])
        with pytest.raises(SystemExit) as exc:
            module.check_args(args)
        assert str(exc.value).startswith("error: --rollout-correction-cap ") and "\n" not in str(exc.value)


@pytest.mark.parametrize("module_name", ["numca", "hista"])
def test_loss_flag_and_its_cap(module_name):
    module = importlib.import_module(module_name)
    for argv, loss, cap in (([], "dapo", 0.28), (["--loss", "cispo"], "cispo", 5.0),
                            (["--loss", "cispo", "--clip-eps-high", "2"], "cispo", 2.0)):
        args = tyro.cli(module.Args, args=TINY + argv)
        module.check_args(args)
        assert (args.loss, args.clip_eps_high) == (loss, cap)
    args = tyro.cli(module.Args, args=TINY + ["--loss", "cispo", "--clip-eps-high", "0"])
    with pytest.raises(SystemExit, match="^error: --clip-eps-high must be > 0"):
        module.check_args(args)


@pytest.mark.parametrize("argv", [["--rollout-correction", "sequence"], ["--loss", "ppo"]])
def test_an_unknown_choice_is_refused_before_loading(argv, tmp_path):
    proc = run_script("numca.py", *TINY, "--output-dir", str(tmp_path / "runs"), *argv)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"invalid choice '{argv[1]}' for argument '{argv[0]}'" in " ".join(proc.stderr.split()), proc.stderr
    assert not (tmp_path / "runs").exists()


# ---- end to end: each mode at least once, each trainer once, CISPO on both of its bases ----
RUNS = [("numca.py", "none", []),
    ("numca.py", "token_mask", ["--loss", "cispo", "--no-numca"]),
    ("hista.py", "token_mask", ["--loss", "cispo", "--interval", "4"]),
    ("ppo.py", "token_truncate", []),
    ("vineppo.py", "sequence_truncate", ["--num-mc-rollouts", "2"]),
    ("prime_implicit_prm.py", "sequence_mask", ["--no-filter"]),
]


@pytest.mark.parametrize("script,mode,extra", RUNS, ids=[f"{s} {m} {' '.join(e)}" for s, m, e in RUNS])
def test_end_to_end(script, mode, extra, tmp_path):
    # cap 1: sampling with the bfloat16 copy puts about half the tokens above a ratio of 1, so the mask and
    # truncate modes have work to do even on the tiny model
    run_dir, records = run_tiny(script, tmp_path, *TINY[2:], "--rollout-correction", mode,
                                "--rollout-correction-cap", "1", "--no-save-model", *extra, save_model=False)
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["rollout_correction"] == mode
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2
    for r in train:
        assert r["mismatch/logp_abs_diff_max"] > 0 and r["mismatch/kl"] >= 0
        assert all(math.isfinite(r[k]) for k in r if k.startswith("mismatch/"))
        if mode == "none":
            assert "mismatch/weight_mean" not in r
        else:
            assert r["mismatch/weight_max"] <= 1.0 and 0 <= r["mismatch/capped_frac"] <= 1
    if mode.startswith("token"):
        assert any(0 < r["mismatch/capped_frac"] < 1 for r in train)


# ---- benchmarks/compare.py: the arms of issue 28 ----
def test_compare_arms(tmp_path):
    arms = {"grpo-nocorr": "numca.py --no-numca --rollout-correction none", "grpo-cispo": "numca.py --no-numca --loss cispo",
            "numca-cispo": "numca.py --loss cispo", "hista-cispo": "hista.py --loss cispo",
            "grpo-bf16": "numca.py --no-numca --bf16 on", "grpo-lr1e-5": "numca.py --no-numca --learning-rate 1e-5"}
    proc = run_script("benchmarks/compare.py", "--arms", *arms, "--seeds", "1", "--max-minutes", "1", "--out",
                      str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[to run]")]
    assert len(lines) == len(arms)
    for line, (arm, command) in zip(lines, arms.items()):
        assert f" {command} --seed 1 --exp-name {arm} " in line, line
    # the default comparison is unchanged: the new arms run only when named
    proc = run_script("benchmarks/compare.py", "--seeds", "1", "--max-minutes", "1", "--out", str(tmp_path), "--dry-run")
    assert proc.returncode == 0 and all(a not in proc.stdout for a in arms)
