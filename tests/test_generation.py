"""common.generation on the tiny model: structure, EOS and length flags, prefixes, seeding, backends."""

import copy

import pytest
import torch

from common.generation import Completion, HFGenerator, make_generator


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_backend_matches_the_structure(tiny_model, tokenizer):
    pytest.importorskip("vllm")
    from common.models import TINY_MODEL, resolve_model_path

    policy = copy.deepcopy(tiny_model).cuda()
    gen = make_generator("vllm", policy, tokenizer, resolve_model_path(TINY_MODEL), gpu_memory_utilization=0.2)
    out = gen.generate(PROMPTS, n=2, max_new_tokens=8, temperature=1.0, seed=0)
    assert len(out) == 3 and all(len(r) == 2 for r in out)
    for row in out:
        for c in row:
            assert c.finished == (c.token_ids[-1] == tokenizer.eos_token_id) or len(c.token_ids) == 8
    # Weights pushed after an "update" change what the engine samples greedily.
    eos_policy = biased(policy.cpu(), tokenizer.eos_token_id).cuda()
    gen.sync_weights(eos_policy)
    (row,) = gen.generate(PROMPTS[:1], n=1, max_new_tokens=4, temperature=0.0)
    assert row[0].finished and row[0].token_ids == [tokenizer.eos_token_id]
