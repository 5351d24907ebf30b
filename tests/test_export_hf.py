"""export_hf.py: a random tiny model exported to LlamaForCausalLM gives our logits and greedy tokens in
transformers, loads back through load_model, and ships a working tokenizer.

    pytest tests/test_export_hf.py -q
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import pytest
import torch
from safetensors import safe_open

from chatglm_tokenizer import TokenizerError, tokenizer_identity
from export_hf import export_hf, main
from model import Transformer, load_model, model_args_from_preset

transformers = pytest.importorskip("transformers")
VOCAB = 64794


def random_model(seed: int = 0, **overrides) -> Transformer:
    """tiny with spread-out random weights, so rotary/GQA mistakes change logits and greedy tokens."""
    torch.manual_seed(seed)
    model = Transformer(model_args_from_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.25 * torch.randn_like(p))
    return model


def save_checkpoint(model: Transformer, path, tokenizer_dir: str, **extra) -> str:
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.args), "config": {},
            "tokenizer": tokenizer_identity(tokenizer_dir), **extra}
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "n_kv_heads": 1, "rope_theta": 500000.0}])
def test_transformers_gives_our_logits_and_greedy_tokens(tmp_path, tokenizer_dir, overrides):
    model = random_model(**overrides)
    out = tmp_path / "hf"
    export_hf(save_checkpoint(model, tmp_path / "ckpt.pt", tokenizer_dir), str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert hf.config.tie_word_embeddings == model.args.tie_embeddings
    torch.manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ours, theirs = model(tokens)[0], hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = tokens[:1, :8]
    greedy = model.generate(prompt, 20, temperature=0, eos_id=None)
    hf_greedy = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[:, 8:]
    assert greedy.shape == (1, 20) and torch.equal(greedy, hf_greedy)
    assert len(set(greedy[0].tolist())) > 3   # the comparison means something only if the tokens vary
    loaded, meta = load_model(str(out))
    assert meta["kind"] == "hf" and meta["tokenizer"]["sha256"] == tokenizer_identity(tokenizer_dir)["sha256"]
    assert meta["model_args"] == asdict(replace(model.args, hidden_dim=model.args.ffn_hidden_dim))
    with torch.no_grad():
        assert (loaded(tokens)[0] - ours).abs().max().item() < 1e-5


def test_folder_contents_and_tokenizer(tmp_path, tokenizer_dir, tokenizer):
    out = tmp_path / "hf"
    ckpt = save_checkpoint(random_model(), tmp_path / "ckpt.pt", tokenizer_dir)
    assert main([f"--ckpt={ckpt}", f"--out={out}", "--dtype=bfloat16"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenization_chatglm.py", "tokenizer.model", "tokenizer_config.json"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()   # tied: transformers ties it back on load
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    text = "你好，医生。I have a headache 头疼 3 天了"
    assert hf_tok.encode(text) == tokenizer.encode(text) and hf_tok.vocab_size == VOCAB
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "hf"]   # no temporary folders left behind


def test_export_replaces_an_old_folder_and_failures_leave_it(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    ckpt = save_checkpoint(random_model(), tmp_path / "ckpt.pt", tokenizer_dir)
    assert main(["--ckpt", ckpt, "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    before = sorted(os.listdir(out))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert main(["--ckpt", str(tmp_path / "broken.pt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.pt" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["broken.pt", "ckpt.pt", "hf"]


def test_export_refuses_a_tokenizer_other_than_the_trained_one(tmp_path, tokenizer_dir):
    ckpt = save_checkpoint(random_model(), tmp_path / "ckpt.pt", tokenizer_dir)
    blob = torch.load(ckpt, weights_only=True)
    blob["tokenizer"]["sha256"] = "0" * 64
    torch.save(blob, ckpt)
    with pytest.raises(TokenizerError, match="tokenizer mismatch"):
        export_hf(ckpt, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_seed_state_dict_exports(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    seed = Transformer(model_args_from_preset("tiny", vocab_size=64793, n_heads=8, n_kv_heads=None)).eval()
    pth = tmp_path / "seed.pth"
    torch.save({"_orig_mod." + k: v for k, v in seed.state_dict().items()}, pth)
    out = tmp_path / "hf"
    export_hf(str(pth), str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.randint(0, 64793, (1, 16))
    with torch.no_grad():
        assert (hf(tokens).logits - seed(tokens)[0]).abs().max().item() < 1e-4
