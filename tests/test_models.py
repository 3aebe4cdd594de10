import pytest

from common.models import ModelLoadError, load_model, resolve_model_path


def test_missing_local_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./no/such/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny-random", dtype="int3")


def test_tiny_model_is_deterministic_and_padded(tiny_model, tokenizer):
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tiny_model.config.num_hidden_layers == 2
    assert tiny_model.config.vocab_size == len(tokenizer)
