"""common.generation on the tiny model: structure, EOS and length flags, prefixes, budgets, seeding, the
sampling configuration. The vLLM backend is tested in test_vllm.py."""

import copy

import pytest
import torch

from common.generation import Completion, HFGenerator, eos_token_ids, make_generator


def biased(model, token_id: int):
    """A copy of `model` whose output layer always prefers `token_id` (a bias on an untied head)."""
    m = copy.deepcopy(model)
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[token_id] = 1e4
    m.lm_head = head
    return m


PROMPTS = [[1, 9690, 198, 2683], [1, 9690, 198], [1, 2683, 359, 314, 260]]


def test_structure_and_shapes(tiny_model, tokenizer):
    gen = HFGenerator(tiny_model, tokenizer, batch_size=4)
    out = gen.generate(PROMPTS, n=3, max_new_tokens=7, temperature=1.0, seed=0)
    assert len(out) == 3 and all(len(row) == 3 for row in out)
    for row in out:
        for c in row:
            assert isinstance(c, Completion) and 1 <= len(c.token_ids) <= 7
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.finished == (c.token_ids[-1] == tokenizer.eos_token_id)
            if not c.finished:
                assert len(c.token_ids) == 7


def test_eos_ends_the_completion(tiny_model, tokenizer):
    gen = HFGenerator(biased(tiny_model, tokenizer.eos_token_id), tokenizer, dtype=None)
    out = gen.generate(PROMPTS, n=2, max_new_tokens=5, temperature=1.0, seed=0)
    for row in out:
        for c in row:
            assert c.finished and c.token_ids == [tokenizer.eos_token_id] and c.text == ""


def test_length_limit_is_flagged(tiny_model, tokenizer):
    token = tokenizer.convert_tokens_to_ids("7")
    gen = HFGenerator(biased(tiny_model, token), tokenizer, dtype=None)
    (row,) = gen.generate(PROMPTS[:1], n=1, max_new_tokens=6, temperature=0.0)
    assert not row[0].finished and row[0].token_ids == [token] * 6 and row[0].text == "777777"


def test_continue_from_prefix(tiny_model, tokenizer):
    gen = HFGenerator(tiny_model, tokenizer, dtype=None)  # float32: greedy paths compare exactly
    (full,) = gen.generate(PROMPTS[:1], n=1, max_new_tokens=10, temperature=0.0)
    ids = full[0].token_ids
    (rest,) = gen.generate([PROMPTS[0] + ids[:4]], n=1, max_new_tokens=6, temperature=0.0)
    assert ids[:4] + rest[0].token_ids == ids


def test_same_seed_same_output(tiny_model, tokenizer):
    gen = HFGenerator(tiny_model, tokenizer)
    a = gen.generate(PROMPTS, n=2, max_new_tokens=8, seed=123)
    b = gen.generate(PROMPTS, n=2, max_new_tokens=8, seed=123)
    c = gen.generate(PROMPTS, n=2, max_new_tokens=8, seed=124)
    ids = lambda out: [x.token_ids for row in out for x in row]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_sync_weights_refreshes_the_bf16_copy(tiny_model, tokenizer):
    policy = copy.deepcopy(tiny_model)
    gen = HFGenerator(policy, tokenizer, dtype=torch.bfloat16)
    assert gen.model is not policy and gen.model.dtype == torch.bfloat16
    with torch.no_grad():
        policy.model.norm.weight.mul_(3.0)
    gen.sync_weights(policy)
    assert torch.allclose(gen.model.model.norm.weight.float(), policy.model.norm.weight.bfloat16().float())


def test_unknown_backend(tiny_model, tokenizer):
    with pytest.raises(SystemExit, match="unknown backend"):
        make_generator("tgi", tiny_model, tokenizer, "")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hf_backend_on_gpu(tiny_model, tokenizer):
    gen = HFGenerator(copy.deepcopy(tiny_model).cuda(), tokenizer)
    out = gen.generate(PROMPTS, n=2, max_new_tokens=8, temperature=1.0, seed=0)
    assert len(out) == 3 and all(len(r) == 2 for r in out)


def with_generation_extras(model):
    """A copy of `model` whose generation config asks for more than temperature and top-p, as
    Qwen2.5-Instruct's does (repetition_penalty 1.05, top_k 20), only much stronger."""
    m = copy.deepcopy(model)
    cfg = m.generation_config
    cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p = True, 0.05, 0.3, 1, 0.5
    cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.min_new_tokens = 5.0, 1, 3
    cfg.suppress_tokens = [198]
    return m


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_models_generation_config_is_ignored(tiny_model, tokenizer, temperature):
    # Samples must come from softmax(logits / T) with top-p, the distribution the update's log-probs
    # describe: a model's own sampling defaults would change it without anyone seeing it.
    plain = HFGenerator(tiny_model, tokenizer, dtype=None)
    extras = HFGenerator(with_generation_extras(tiny_model), tokenizer, dtype=None)
    ids = lambda out: [x.token_ids for row in out for x in row]  # noqa: E731
    a = plain.generate(PROMPTS, n=3, max_new_tokens=12, temperature=temperature, seed=5)
    b = extras.generate(PROMPTS, n=3, max_new_tokens=12, temperature=temperature, seed=5)
    assert ids(a) == ids(b)
    if temperature == 0.0:  # the tiny model repeats a token: a repetition penalty would show
        assert any(len(set(x)) < len(x) for x in ids(a))
    else:  # top_k 1 would make the three samples of a prompt identical
        assert any(len({tuple(c.token_ids) for c in row}) > 1 for row in a)
    assert extras.model.generation_config.top_k == 1  # the model's own config is left as it was


def test_every_eos_token_ends_the_completion(tiny_model, tokenizer):
    # Qwen2.5-Instruct stops on two tokens (<|im_end|> and <|endoftext|>); both end a response, kept.
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # "\n"
    m = biased(tiny_model, newline)
    m.generation_config.eos_token_id = [tokenizer.eos_token_id, newline]
    assert eos_token_ids(m, tokenizer) == {tokenizer.eos_token_id, newline}
    gen = HFGenerator(m, tokenizer, dtype=None)
    out = gen.generate(PROMPTS, n=2, max_new_tokens=10, temperature=1.0, seed=0)
    assert all(c.finished and c.token_ids == [newline] for row in out for c in row)


def test_one_budget_per_input(tiny_model, tokenizer):
    token = tokenizer.convert_tokens_to_ids("7")
    gen = HFGenerator(biased(tiny_model, token), tokenizer, dtype=None, batch_size=3)
    out = gen.generate(PROMPTS, n=2, max_new_tokens=[0, 3, 6], temperature=1.0, seed=0)
    assert [[c.token_ids for c in row] for row in out] == [[[], []], [[token] * 3] * 2, [[token] * 6] * 2]
    assert not any(c.finished for row in out for c in row)
    with pytest.raises(ValueError, match="2 budgets for 3 inputs"):
        gen.generate(PROMPTS, max_new_tokens=[1, 2])


def test_sleep_is_a_no_op_for_hf(tiny_model, tokenizer):
    gen = HFGenerator(tiny_model, tokenizer)
    before = gen.generate(PROMPTS, n=1, max_new_tokens=5, temperature=0.0)
    gen.sleep()
    gen.sync_weights(tiny_model)
    assert gen.generate(PROMPTS, n=1, max_new_tokens=5, temperature=0.0) == before


# ---- The vLLM weight sync's check that every engine parameter was loaded, with a stand-in engine ----
class FakeEngine:
    """Stands in for vllm.LLM: records the calls sync_weights makes; its reload_weights logs vLLM's warning
    for the parameters in `unloaded`, from the logger vLLM 0.32 uses."""

    def __init__(self, unloaded=()):
        self.unloaded, self.calls, self.received = set(unloaded), [], {}

    def collective_rpc(self, method, kwargs):
        import logging

        self.calls.append(method)
        self.received = {name: t for name, t in kwargs["weights_iterator"]}
        logger = logging.getLogger("vllm.model_executor.model_loader.reload.inplace")
        logger.warning("some other warning: %s", {"not.a.weight"})
        if self.unloaded:
            logger.warning("Following weights were not loaded from checkpoint: %s", self.unloaded)

    def wake_up(self, tags):
        self.calls.append(f"wake_up {tags[0]}")

    def apply_model(self, fn):
        self.calls.append("apply_model")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def fake_vllm_generator(engine, on_cpu: bool):
    from common.generation import VLLMGenerator

    gen = VLLMGenerator.__new__(VLLMGenerator)  # no engine start: the attributes sync_weights reads
    gen.llm, gen.dtype, gen.on_cpu, gen.can_sleep = engine, torch.bfloat16, on_cpu, not on_cpu
    gen.asleep = gen.warned = False
    return gen


def test_vllm_sync_with_an_unloaded_parameter_stops_on_a_gpu(tiny_model):
    import logging

    handlers = list(logging.getLogger("vllm").handlers)
    engine = FakeEngine(unloaded={"model.layers.0.mlp.gate_up_proj.weight"})
    gen = fake_vllm_generator(engine, on_cpu=False)
    gen.asleep = True  # as after the update: woken first
    with pytest.raises(SystemExit) as exc:
        gen.sync_weights(tiny_model)
    message = str(exc.value)
    assert message.startswith("error: ") and "\n" not in message and "gate_up_proj" in message
    assert "not.a.weight" not in message  # only vLLM's unloaded-weights warning counts
    assert engine.calls == ["wake_up weights", "reload_weights"]
    assert logging.getLogger("vllm").handlers == handlers  # the listener is gone after the sync


def test_vllm_sync_that_loads_everything_goes_on(tiny_model):
    engine = FakeEngine()
    gen = fake_vllm_generator(engine, on_cpu=False)
    gen.asleep = True
    gen.sync_weights(tiny_model)
    assert engine.calls == ["wake_up weights", "reload_weights", "wake_up kv_cache", "reset_prefix_cache"]
    assert not gen.asleep
    assert set(engine.received) == {n for n, _ in tiny_model.named_parameters()}
    assert all(t.dtype == torch.bfloat16 for t in engine.received.values())


def test_vllm_sync_with_an_unloaded_parameter_warns_once_on_the_cpu(tiny_model, capsys):
    engine = FakeEngine(unloaded={"lm_head.weight"})
    gen = fake_vllm_generator(engine, on_cpu=True)
    gen.sync_weights(tiny_model)
    gen.sync_weights(tiny_model)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "lm_head.weight" in err[0]
    assert engine.calls.count("apply_model") == 2 and engine.calls[-1] == "reset_prefix_cache"


def test_top_p_keeps_only_the_nucleus(tiny_model, tokenizer):
    """At T = 1 the tiny model's samples vary; with a nucleus so small that it holds only the most likely token
    each sample is the greedy answer, and with top-p 0.9 no sample ever takes a token outside the smallest
    set of tokens whose probability reaches 0.9."""
    from common.data import load_problems, prompt_ids

    gen = HFGenerator(tiny_model, tokenizer)
    prompts = [prompt_ids(tokenizer, p.question) for p in load_problems("digits", "train")[:3]]
    greedy = gen.generate(prompts, n=1, max_new_tokens=8, temperature=0.0)
    free = gen.generate(prompts, n=6, max_new_tokens=8, temperature=1.0, seed=0)
    assert any(c.token_ids != g[0].token_ids for row, g in zip(free, greedy) for c in row)  # sampling varies
    narrow = gen.generate(prompts, n=6, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0)
    assert all(c.token_ids == g[0].token_ids for row, g in zip(narrow, greedy) for c in row)
    for prompt, row in zip(prompts, gen.generate(prompts, n=6, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=0)):
        for c in row:
            with torch.no_grad():
                logits = tiny_model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
            probs = torch.softmax(logits.float(), -1)
            for t, token in enumerate(c.token_ids):
                sorted_p, order = probs[t].sort(descending=True)
                inside = order[: int((sorted_p.cumsum(0) < 0.9).sum()) + 1]  # the nucleus, its last token included
                assert token in inside.tolist()
