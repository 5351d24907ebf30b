"""lora.py: a fresh adapter changes nothing, merged == unmerged logits, only adapters train; LoRA checkpoints
load through model.load_model (merged), refuse a changed base, and export to HF merged or as a PEFT adapter
that gives our logits in transformers + peft."""
from __future__ import annotations

import copy
import os
from dataclasses import asdict

import peft
import pytest
import torch

from chatglm_tokenizer import tokenizer_identity
from export_hf import export_hf
from lora import (ADAPTER_SUFFIXES, LoRALinear, adapter_state, adapters_disabled, apply_lora, count_parameters,
                  merge_lora, merge_state_dict, weights_sha256)
from model import CheckpointError, Transformer, load_model, model_args_from_preset

ALL = "wq,wk,wv,wo,w1,w2,w3"


def random_model(seed: int = 0, vocab_size: int = 64794) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(model_args_from_preset("tiny", vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.25 * torch.randn_like(p))
    return model


def randomise_adapters(model: Transformer, seed: int = 1) -> None:
    """Give every lora_B a value (a fresh one is zero), so the adapters change the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(0.05 * torch.randn_like(p))


def test_fresh_adapter_is_the_base_model():
    model = random_model(vocab_size=97)
    tokens = torch.randint(0, 97, (2, 24))
    before = model(tokens)[0]
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=ALL)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * model.args.n_layers
    assert torch.equal(model(tokens)[0], before)   # B = 0: exactly the base
    randomise_adapters(model)
    assert (model(tokens)[0] - before).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(model(tokens)[0], before)


def test_merged_weights_give_the_unmerged_logits():
    model = random_model(vocab_size=97)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=16, dropout=0.0, targets="wq,wk,wo,w2")
    randomise_adapters(model)
    tokens = torch.randint(0, 97, (2, 24))
    unmerged = model(tokens)[0]
    merged_model = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    torch.testing.assert_close(merged_model(tokens)[0], unmerged, atol=1e-4, rtol=1e-4)
    from_state = Transformer(model.args).eval()
    from_state.load_state_dict(merge_state_dict(base_state, adapter_state(model.state_dict()), 16 / 4))
    torch.testing.assert_close(from_state(tokens)[0], unmerged, atol=1e-4, rtol=1e-4)
    base_model = Transformer(model.args).eval()
    base_model.load_state_dict(base_state)
    assert (base_model(tokens)[0] - unmerged).abs().max() > 1e-2   # the comparison is about a real change


def test_only_adapters_change_during_training():
    model = random_model(vocab_size=97).train()
    apply_lora(model, rank=2, alpha=4, dropout=0.1, targets=ALL)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n.endswith(ADAPTER_SUFFIXES))
    assert 0 < trainable < total / 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        tokens = torch.randint(0, 97, (4, 16))
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith(".lora_A") or k.endswith(".lora_B")}


def lora_checkpoint(tmp_path, tokenizer_dir, rank=4, alpha=16.0, targets=ALL):
    """A base checkpoint and a LoRA checkpoint (random adapters) on it, as the trainer writes them; returns
    (lora ckpt path, base path, the LoRA model with adapters unmerged)."""
    model = random_model()
    base = tmp_path / "base.pt"
    torch.save({"model": model.state_dict(), "model_args": asdict(model.args), "config": {},
                "tokenizer": tokenizer_identity(tokenizer_dir)}, base)
    apply_lora(model, rank, alpha, 0.0, targets)
    randomise_adapters(model)
    record = {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": targets,
              "base": {"path": str(base), "abspath": str(base), "sha256": weights_sha256(str(base))}}
    path = tmp_path / "lora.pt"
    torch.save({"model": adapter_state(model.state_dict()), "model_args": asdict(model.args), "config": {},
                "tokenizer": tokenizer_identity(tokenizer_dir), "lora": record}, path)
    return str(path), base, model.eval()


def test_lora_checkpoint_loads_merged_and_checks_its_base(tmp_path, tokenizer_dir):
    path, base, model = lora_checkpoint(tmp_path, tokenizer_dir)
    loaded, meta = load_model(path)
    tokens = torch.randint(0, 64794, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], atol=1e-4, rtol=1e-4)
    assert meta["lora"]["rank"] == 4 and os.path.getsize(path) < os.path.getsize(base) / 10
    state = torch.load(base, weights_only=True)
    state["model"]["norm.weight"] += 1
    torch.save(state, base)
    with pytest.raises(CheckpointError, match="has changed since"):
        load_model(path)
    os.remove(base)
    with pytest.raises(CheckpointError, match="which are not there"):
        load_model(path)


transformers = pytest.importorskip("transformers")


def test_hf_export_merged_and_peft_adapter_match_our_logits(tmp_path, tokenizer_dir):
    path, _, model = lora_checkpoint(tmp_path, tokenizer_dir, rank=4, alpha=8.0, targets="wq,wk,wv,w2")
    tokens = torch.randint(0, 64794, (2, 30))
    with torch.no_grad():
        ours = model(tokens)[0]
        export_hf(path, str(tmp_path / "hf"))
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
        assert (merged(tokens).logits - ours).abs().max().item() < 1e-4
        export_hf(path, str(tmp_path / "hf_base"), lora="separate")
        base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_base")).eval()
        with adapters_disabled(model):
            assert (base(tokens).logits - model(tokens)[0]).abs().max().item() < 1e-4
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "hf_base_lora")).eval()
        assert (adapted(tokens).logits - ours).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        export_hf(str(tmp_path / "base.pt"), str(tmp_path / "x"), lora="separate")
