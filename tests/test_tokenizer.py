"""chatglm_tokenizer/: lossless round trips, uint16 ids, special ids, the AutoTokenizer path, the batch
encoder, and the messages for a missing or wrong tokenizer.model (all offline).

    pytest tests/test_tokenizer.py -q
"""
from __future__ import annotations

import os
import shutil

import pytest

import chatglm_tokenizer
from chatglm_tokenizer import (CHATGLM2_SHA256, TokenizerError, check_same_tokenizer, load_tokenizer,
                               tokenizer_identity)

ROUND_TRIP = {
    "chinese": "糖尿病患者应该注意饮食，少吃高糖食物，多运动。",
    "english": "The patient reports a mild headache and a fever of 38.5 degrees.",
    "mixed": "我用PyTorch训练了一个GPT模型，loss降到了2.35左右。",
    "digits": "0123456789 3.14159 2024年12月31日 1,000,000 +86-10-12345678",
    "full_width_punctuation": "“引号”『书名』（括号）【方括号】……——！？；：、。",
    "emoji": "今天很开心😀👍🏽🇨🇳 一家人👨‍👩‍👧",
    "rare_cjk": "罕见字：𬱟𠀀𪚥䶮",
    "spaces": "a  b   c    d     e",
    "newlines": "第一行\n第二行\n\n\n第五行\r\n\t缩进",
    "edges": "  前后都有空格  ",
    "literal_specials": "正文里出现 <s> 和 </s> 以及 <unk>、[gMASK] sop eop 这些字样",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_decode_encode_round_trip(tokenizer, name):
    text = ROUND_TRIP[name]
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < 65536 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_ids(ids) == text


def test_special_ids(tokenizer):
    assert tokenizer.vocab_size == 64794 == len(tokenizer)
    assert tokenizer.special_tokens == {"<bos>": 1, "<eos>": 2, "<pad>": 0}
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert tokenizer.convert_tokens_to_ids(specials) == list(range(64789, 64794))
    assert tokenizer.convert_ids_to_tokens(list(range(64789, 64794))) == specials
    assert tokenizer.encode("你好") == tokenizer.encode("你好", add_special_tokens=True)   # adds nothing
    # GLM specials are skipped when decoding instead of crashing sentencepiece
    assert tokenizer.decode_ids([64790, 64792] + tokenizer.encode("你好")) == "你好"


def test_auto_tokenizer_path(tokenizer_dir, tokenizer):
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    assert type(auto).__name__ == "ChatGLMTokenizer" and auto.vocab_size == 64794
    for text in ROUND_TRIP.values():
        assert auto.encode(text) == tokenizer.encode(text)
    batch = auto(["你好", "今天天气怎么样"], padding=True)
    assert batch["input_ids"][0][0] == 0   # left padding with <pad>=0


def test_encode_batch_equals_per_text_encode(tokenizer):
    texts = list(ROUND_TRIP.values()) * 3
    assert tokenizer.encode_batch(texts, num_threads=2) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch([]) == []


def test_identity_and_mismatch_message(tokenizer_dir):
    identity = tokenizer_identity(tokenizer_dir)
    assert identity["sha256"] == CHATGLM2_SHA256 and identity["vocab_size"] == 64794
    check_same_tokenizer(identity, dict(identity), "data/pretrain_data.bin", "the checkpoint")
    other = {**identity, "path": "tokenizers/mine", "sha256": "f" * 64}
    with pytest.raises(TokenizerError) as info:
        check_same_tokenizer(identity, other, "data/pretrain_data.bin", "the checkpoint")
    message = str(info.value)
    assert "data/pretrain_data.bin" in message and "tokenizers/mine" in message and "\n" not in message


def test_folder_without_tokenizer_model_names_the_path(tmp_path):
    folder = tmp_path / "my_tokenizer"
    folder.mkdir()
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(str(folder))
    assert str(folder / "tokenizer.model") in str(info.value)


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A stand-in repository root whose chatglm_tokenizer/ is empty, with the hub offline and an empty cache,
    so the download path runs without touching the real folder or the network."""
    import huggingface_hub.constants
    monkeypatch.setattr(chatglm_tokenizer, "_REPO_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    folder = tmp_path / "chatglm_tokenizer"
    folder.mkdir()
    return folder


def test_default_folder_offline_says_where_to_put_the_file(fake_repo):
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(str(fake_repo))
    message = str(info.value)
    assert str(fake_repo / "tokenizer.model") in message and CHATGLM2_SHA256 in message
    assert "\n" not in message and not os.listdir(fake_repo)


def test_default_folder_download_is_checked_then_saved(fake_repo, tokenizer_dir, monkeypatch, tmp_path):
    import huggingface_hub
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not the chatglm2 tokenizer")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(bogus))
    with pytest.raises(TokenizerError, match="wrong sha256"):
        load_tokenizer(str(fake_repo))
    assert not os.listdir(fake_repo)   # a bad download is never saved
    real = os.path.join(tokenizer_dir, "tokenizer.model")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: real)
    assert load_tokenizer(str(fake_repo)).vocab_size == 64794
    assert os.listdir(fake_repo) == ["tokenizer.model"]


def test_wrong_file_in_default_folder_is_refused(fake_repo, tokenizer_dir):
    shutil.copyfile(os.path.join(tokenizer_dir, "tokenizer.model"), fake_repo / "tokenizer.model")
    with open(fake_repo / "tokenizer.model", "ab") as f:
        f.write(b"\0")
    with pytest.raises(TokenizerError, match="wrong sha256"):
        load_tokenizer(str(fake_repo))
