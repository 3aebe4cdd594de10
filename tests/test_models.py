import pytest
import torch

from common.models import ModelLoadError, load_model, resolve_model_path


def test_missing_local_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./no/such/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny", dtype="int3")


def test_tiny_model_is_padded_and_right_about_half_the_time(tiny_model, tokenizer):
    """The tests' rewards come from here: the tiny model must answer the digits task right part of the time,
    neither never nor always, so that a group of samples holds both rewards. Its head size is one vLLM's CPU
    attention runs (32)."""
    from common.data import load_problems, prompt_ids
    from common.grading import grade

    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    config = tiny_model.config
    assert config.num_hidden_layers == 2 and config.vocab_size == len(tokenizer)
    assert config.hidden_size // config.num_attention_heads == 32
    problems = load_problems("digits", "train")[:16]
    torch.manual_seed(0)
    right = []
    with torch.no_grad():
        for p in problems:
            ids = torch.tensor([prompt_ids(tokenizer, p.question)])
            out = tiny_model.generate(ids, do_sample=True, temperature=0.6, top_p=1.0, max_new_tokens=12,
                                      num_return_sequences=4, pad_token_id=tokenizer.pad_token_id)
            right += [grade(tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True), p.answer, question=p.question)
                      for o in out]
    assert 0.25 < sum(right) / len(right) < 0.85, sum(right) / len(right)  # measured: 0.58


def test_model_shape_reads_the_config_only(tmp_path):
    """A folder with nothing but a 7B config.json: the parameter count comes from the meta device."""
    from transformers import Qwen2Config

    from common.models import model_shape

    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False).save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    assert 7.5e9 < shape["params"] < 7.7e9  # Qwen2.5-7B: 7.62B
    assert (shape["hidden"], shape["layers"], shape["vocab"]) == (3584, 28, 152064)


def test_training_memory_hand_worked():
    from common.models import LOGSOFTMAX_CHUNK, training_memory_gib

    shape = {"params": 2**30, "hidden": 100, "intermediate": 300, "layers": 10, "vocab": 1000}
    parts = training_memory_gib(shape, trainable=2, frozen=1, frozen_bytes=2, sampler_bytes=2, micro_batch=4,
                                seq_len=2**10, response_len=2**8, checkpointing=False)
    # 2 trained models x 12 bytes (weights, AdamW's moments) + 4 (gradients); autocast's bf16 copies and
    # AdamW's step temporaries: one model at a time
    assert parts["trainable"] == 24 and parts["gradients"] == 8 and parts["frozen"] == 2 and parts["sampler"] == 2
    assert parts["autocast"] == 2 and parts["optimizer_step"] == 4
    # 4 x 1,024 tokens x 10 layers x (30 x 100 + 10 x 300) bytes + 4 x 256 x 2 x 1,000 bytes of logits
    assert parts["activations"] == pytest.approx((4 * 1024 * 10 * 6000 + 4 * 256 * 2000) / 2**30)
    # the logits' bf16 gradient, and one float32 log-softmax chunk with its exponentials and gradient
    assert parts["logits_grad"] == pytest.approx((4 * 256 * 2000 + 3 * 4 * LOGSOFTMAX_CHUNK * 1000) / 2**30)
    ckpt = training_memory_gib(shape, 2, 1, 2, 2, 4, 2**10, 2**8, checkpointing=True)["activations"]
    assert ckpt == pytest.approx((4 * 1024 * (4 * 100 * 10 + 6000) + 4 * 256 * 2000) / 2**30)


def test_training_memory_of_smollm2_hand_worked():
    """SmolLM2-135M's shape, PPO's default micro-batch (8 sequences of 256 + 128 tokens, 128 of them response),
    worked out by hand in bytes."""
    from common.models import training_memory_gib

    shape = {"params": 134_515_008, "hidden": 576, "intermediate": 1536, "layers": 30, "vocab": 49152}
    parts = training_memory_gib(shape, trainable=2, frozen=1, frozen_bytes=4, sampler_bytes=2, micro_batch=8,
                                seq_len=384, response_len=128, checkpointing=False)
    gib = 2**30
    assert parts["trainable"] * gib == pytest.approx(3_228_360_192)  # 2 x 12 x 134,515,008
    assert parts["gradients"] * gib == pytest.approx(1_076_120_064)  # 2 x 4 x ...
    assert parts["frozen"] * gib == pytest.approx(538_060_032)  # float32 reference
    assert parts["sampler"] * gib == pytest.approx(269_030_016)  # the bf16 sampling copy
    # 3,072 tokens x 30 layers x (30 x 576 + 10 x 1,536 = 32,640) = 3,008,102,400; logits 1,024 x 98,304
    assert parts["activations"] * gib == pytest.approx(3_008_102_400 + 100_663_296)
    # logits' gradient 100,663,296 + one chunk: 3 x 4 x 256 x 49,152 = 150,994,944
    assert parts["logits_grad"] * gib == pytest.approx(251_658_240)
    ckpt = training_memory_gib(shape, 2, 1, 4, 2, 8, 384, 128, checkpointing=True)["activations"]
    # 3,072 tokens x (4 x 576 x 30 + 32,640 = 101,760) + logits
    assert ckpt * gib == pytest.approx(312_606_720 + 100_663_296)


def test_memory_phases_hand_worked():
    from common.models import ALLOCATOR_OVERHEAD, CUDA_CONTEXT_GIB, VLLM_ASLEEP_GIB, memory_phases

    parts = {"trainable": 24.0, "gradients": 8.0, "frozen": 2.0, "sampler": 0.0, "autocast": 2.0,
             "activations": 3.0, "logits_grad": 1.0, "optimizer_step": 4.0}
    # the CPU: the update holds the gradients and the larger of a micro-batch (2 + 3 + 1) and AdamW's step (4)
    assert memory_phases(parts, cuda=False) == {"update": 40.0, "generation": 26.0, "need": 40.0}
    # CUDA with vLLM: the allocator's overhead on the short-lived part, vLLM asleep during the update, awake
    # (its whole share) during generation, the CUDA context in both
    got = memory_phases(parts, cuda=True, vllm_gib=20.0)
    assert got["update"] == pytest.approx(40 + ALLOCATOR_OVERHEAD * 6 + VLLM_ASLEEP_GIB + CUDA_CONTEXT_GIB)
    assert got["generation"] == pytest.approx(26 + 20 + CUDA_CONTEXT_GIB) and got["need"] == got["generation"]
    # AdamW's step outgrows a micro-batch: it sets the update's peak
    assert memory_phases({**parts, "optimizer_step": 10.0}, cuda=False)["update"] == 44.0


def test_check_memory_refuses_what_cannot_fit(tmp_path):
    from transformers import Qwen2Config

    from common.models import check_memory

    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064).save_pretrained(tmp_path)
    settings = dict(frozen=1, frozen_dtype="bfloat16", backend="hf", vllm_share=0.3, micro_batch=8,
                    max_new_tokens=1024, checkpointing=True)
    with pytest.raises(ModelLoadError, match=r"needs about \d+ GiB .* lower --micro-batch-size"):
        check_memory(str(tmp_path), "cpu", trainable=2, **settings)  # 7.6B x 2 x 16 bytes: ~230 GiB
    check_memory("tiny", "cpu", trainable=2, **settings)  # fits: no error


def test_check_memory_returns_its_estimate_and_warns_within_its_margin(monkeypatch, capsys):
    import common.models as models

    settings = dict(trainable=1, frozen=0, frozen_dtype="bfloat16", backend="hf", vllm_share=0.3, micro_batch=1,
                    max_new_tokens=64, checkpointing=True)
    estimate = models.check_memory("tiny", "cpu", **settings)
    assert estimate["need"] == estimate["update"] > estimate["generation"] and estimate["total"] > 0
    need = estimate["need"]
    monkeypatch.setattr(models, "device_memory_gib", lambda device: need * 1.05)  # fits, inside the 15% margin
    assert models.check_memory("tiny", "cpu", **settings)["need"] == need
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "margin" in err[0]
    monkeypatch.setattr(models, "device_memory_gib", lambda device: need * 1.5)  # clear of the margin: quiet
    models.check_memory("tiny", "cpu", **settings)
    assert capsys.readouterr().err == ""
