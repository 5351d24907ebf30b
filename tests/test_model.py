"""model.py: shapes, loss, KV-cache decoding, GQA, sampling, counting, and loading every weights kind.

    pytest tests/test_model.py -q
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, replace

import pytest
import torch

from model import (PRESETS, CheckpointError, ModelArgs, Transformer, load_model, load_state_dict_file, main,
                   model_args_from_preset, sample_next)

VOCAB = 64794
SMALL = dict(vocab_size=512, max_seq_len=64)   # where the vocabulary size does not matter


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_args_from_preset("tiny", **overrides)).eval()


def spread_weights(model: Transformer, seed: int = 1) -> Transformer:
    """Larger random weights than the init, so attention and rotary errors show in the logits and greedy
    decoding does not just repeat the last token."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


def greedy_by_recompute(model: Transformer, ids: torch.Tensor, n: int) -> list[int]:
    """Reference decoding without a cache: the full forward pass for every new token."""
    ids = ids.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            next_id = int(model(ids)[0][0, -1].argmax())
            out.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return out


def test_forward_shapes_and_loss():
    model = make_model()
    tokens = torch.randint(0, VOCAB, (2, 16))
    logits, loss = model(tokens)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32 and loss is None
    logits, loss = model(tokens, tokens)
    assert loss.shape == () and torch.isfinite(loss)


def test_initial_loss_is_about_ln_vocab():
    model = make_model()
    torch.manual_seed(2)
    tokens, targets = torch.randint(0, VOCAB, (4, 64)), torch.randint(0, VOCAB, (4, 64))
    _, loss = model(tokens, targets)
    assert abs(loss.item() - math.log(VOCAB)) < 0.1, loss.item()


def test_sum_and_none_reductions_agree_with_the_mean():
    model = make_model(**SMALL)
    tokens = torch.randint(0, 512, (3, 20))
    targets = torch.randint(0, 512, (3, 20))
    targets[0, :7] = -100
    targets[2, 5:] = -100
    _, mean = model(tokens, targets)
    _, total = model(tokens, targets, reduction="sum")
    counted = int((targets != -100).sum())
    torch.testing.assert_close(total, mean * counted)
    _, per_position = model(tokens, targets, reduction="none")          # [B, T], 0 where ignored
    assert per_position.shape == (3, 20) and (per_position[targets == -100] == 0).all()
    torch.testing.assert_close(per_position.sum(), total)
    with pytest.raises(ValueError, match="reduction"):
        model(tokens, targets, reduction="batchmean")


def test_ignored_targets_do_not_change_the_loss():
    model = make_model(**SMALL)
    tokens, targets = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 12))
    _, loss_a = model(tokens[:, :6], targets[:, :6])
    masked = targets.clone()
    masked[:, 6:] = -100
    _, loss_b = model(tokens, masked)   # causal: positions 6.. cannot change the first 6 logits
    torch.testing.assert_close(loss_a, loss_b)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_decoding_equals_full_recompute(n_kv_heads):
    model = spread_weights(make_model(n_kv_heads=n_kv_heads, **SMALL))
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full, _ = model(tokens)
        caches = model.new_caches()
        # a prefill, then a chunk of several tokens after cached ones (needs the explicit mask), then singles
        pieces = [model.forward_cached(tokens[:, :9], caches, 0), model.forward_cached(tokens[:, 9:14], caches, 9)]
        pieces += [model.forward_cached(tokens[:, i:i + 1], caches, i) for i in range(14, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_generate_greedy_equals_recompute_and_stream():
    model = spread_weights(make_model(**SMALL))
    prompt = torch.randint(0, 512, (1, 10))
    expected = greedy_by_recompute(model, prompt, 20)
    assert model.generate(prompt, 20, temperature=0, eos_id=None).tolist() == [expected]
    assert list(model.generate_stream(prompt[0], 20, temperature=0, eos_id=None)) == expected
    assert len(set(expected)) > 3   # a real sequence, not one token repeated


def test_generate_stops_before_eos_and_respects_max_new_tokens():
    model = spread_weights(make_model(**SMALL))
    prompt = torch.randint(0, 512, (1, 5))
    greedy = model.generate(prompt, 8, temperature=0, eos_id=None)[0].tolist()
    assert model.generate(prompt, 8, temperature=0, eos_id=greedy[3]).tolist() == [greedy[:greedy.index(greedy[3])]]
    assert model.generate(prompt, 0, temperature=0).shape == (1, 0)


def test_generate_slides_past_max_seq_len():
    model = spread_weights(make_model(vocab_size=512, max_seq_len=16))
    prompt = torch.randint(0, 512, (1, 30))    # longer than the context: its tail is kept
    out = model.generate(prompt, 40, temperature=0, eos_id=None)
    assert out.shape == (1, 40)
    # the first token sees only the last 16 prompt tokens
    assert out[0, 0].item() == greedy_by_recompute(model, prompt[:, -16:], 1)[0]


def test_generate_restores_training_mode_and_checks_options():
    model = make_model(**SMALL).train()
    model.generate(torch.tensor([[1, 5, 7]]), 3, temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.3)
    assert model.training
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            model.generate(torch.tensor([[1]]), 3, **bad)
    with pytest.raises(ValueError, match="prompt token ids"):
        model.generate(torch.tensor([[1, 512]]), 3)
    with pytest.raises(ValueError, match="one prompt"):
        model.generate(torch.ones(2, 3, dtype=torch.long), 3)


def test_sample_next_filters():
    logits = torch.tensor([3.0, 2.5, 2.0, -1.0, -2.0])
    none_seen = torch.zeros(5, dtype=torch.bool)
    assert sample_next(logits, none_seen, 0.0, None, None, 1.0) == 0
    seen = torch.tensor([True, False, False, True, False])
    # repetition penalty 2: 3.0 -> 1.5 (below 2.5), negative -1.0 -> -2.0
    assert sample_next(logits, seen, 0.0, None, None, 2.0) == 1
    torch.manual_seed(0)
    top_k = {sample_next(logits, none_seen, 1.0, 2, None, 1.0) for _ in range(200)}
    probs = logits.softmax(-1)
    nucleus = int((probs.cumsum(-1) - probs <= 0.6).sum())   # tokens needed to reach 0.6 of the mass
    top_p = {sample_next(logits, none_seen, 1.0, None, 0.6, 1.0) for _ in range(200)}
    high_temperature = {sample_next(logits, none_seen, 5.0, None, None, 1.0) for _ in range(300)}
    assert top_k == {0, 1} and top_p == set(range(nucleus)) and nucleus == 2
    assert high_temperature == {0, 1, 2, 3, 4}


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    gqa = spread_weights(make_model(n_kv_heads=2, **SMALL))
    mha = Transformer(replace(gqa.args, n_kv_heads=None)).eval()
    state = gqa.state_dict()
    head_dim, n_rep = gqa.args.head_dim, gqa.args.n_heads // 2
    for key in list(state):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = state[key].view(2, head_dim, -1)                           # [KV, hd, dim]
            state[key] = heads.repeat_interleave(n_rep, dim=0).reshape(-1, heads.shape[-1])  # [H * hd, dim]
    mha.load_state_dict(state)
    assert gqa.layers[0].attention.wk.weight.shape == (2 * head_dim, gqa.args.dim)
    assert gqa.num_params() < mha.num_params()
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens)[0], mha(tokens)[0])


def test_dropout_only_in_training():
    model = make_model(dropout=0.2, **SMALL)
    tokens = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], model(tokens)[0])
        model.train()
        assert not torch.equal(model(tokens)[0], model(tokens)[0])


def test_presets_and_param_counts():
    assert set(PRESETS) >= {"tiny", "92m", "218m"}
    with torch.device("meta"):
        seed_92m = Transformer(PRESETS["92m"])
    # the seed's "92M": dim 512, 8 layers, ffn 1376, tied 64,794-row embedding counted once
    per_layer = 4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512
    assert seed_92m.num_params() == VOCAB * 512 + 8 * per_layer + 512
    assert seed_92m.num_params(non_embedding=True) == 8 * per_layer + 512
    assert seed_92m.flops_per_token(512) == 6 * seed_92m.num_params() + 12 * 8 * 512 * 512
    # samples of lengths 100 and 300: attention is paid at each sample's own length
    assert seed_92m.training_flops(400, 100**2 + 300**2) == 6 * seed_92m.num_params() * 400 + 12 * 8 * 512 * (
        100**2 + 300**2)
    assert seed_92m.training_flops(4 * 512, 4 * 512**2) == 4 * 512 * seed_92m.flops_per_token(512)   # full rows
    tiny = make_model()
    assert 100_000 < tiny.num_params() < 5_000_000 and tiny.args.kv_heads < tiny.args.n_heads
    with pytest.raises(ValueError, match="unknown model preset"):
        model_args_from_preset("huge")
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)


def test_cli_prints_the_preset_table(capsys):
    assert main([]) == 0
    table = capsys.readouterr().out
    assert "58.48M" in table and "218.16M" in table


# ---- loading ----

def test_checkpoint_round_trip(tmp_path):
    model = spread_weights(make_model())
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.args), "config": {"lr": 1e-3},
            "tokenizer": {"path": "chatglm_tokenizer", "sha256": "ab", "vocab_size": VOCAB}, "step": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    loaded, meta = load_model(str(path))
    assert meta["kind"] == "checkpoint" and meta["config"] == {"lr": 1e-3} and meta["tokenizer"]["sha256"] == "ab"
    assert meta["model_args"] == asdict(model.args) and not loaded.training
    assert load_model(str(tmp_path))[1]["kind"] == "checkpoint"   # a run folder stands for its ckpt.pt
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], atol=0, rtol=0)


@pytest.mark.parametrize("prefix,n_kv_heads,tied", [("_orig_mod.", None, True), ("module.", 4, True),
                                                     ("module._orig_mod.", None, False)])
def test_seed_state_dict_loads_and_runs(tmp_path, prefix, n_kv_heads, tied):
    # the seed's layout: 8 heads, vocab 64,793, torch.save(model.state_dict()) with both embedding keys
    seed = spread_weights(make_model(vocab_size=64793, n_heads=8, n_kv_heads=n_kv_heads, tie_embeddings=tied))
    path = tmp_path / "seed.pth"
    torch.save({prefix + k: v for k, v in seed.state_dict().items()}, path)
    loaded, meta = load_model(str(path))
    args = loaded.args
    assert meta["kind"] == "state_dict" and meta["tokenizer"] is None
    assert (args.vocab_size, args.dim, args.n_layers, args.n_heads) == (64793, 64, 2, 8)
    assert (args.kv_heads, args.ffn_hidden_dim, args.tie_embeddings) == (seed.args.kv_heads, 192, tied)
    tokens = torch.randint(0, 64793, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], seed(tokens)[0], atol=0, rtol=0)
    assert loaded.generate(tokens, 5, temperature=0, eos_id=None).shape == (1, 5)
    weights = load_state_dict_file(str(path))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights)
    assert weights["tok_embeddings.weight"].shape == (64793, 64)


def test_seed_state_dict_with_wrong_n_heads_is_one_clear_error(tmp_path):
    seed = make_model(vocab_size=64793, n_heads=8)
    path = tmp_path / "seed.pth"
    torch.save(seed.state_dict(), path)
    with pytest.raises(CheckpointError, match="n_heads=6"):
        load_model(str(path), n_heads=6)


def test_truncated_random_and_foreign_files_raise_checkpoint_error(tmp_path):
    model = make_model(**SMALL)
    good = tmp_path / "good.pt"
    torch.save({"model": model.state_dict(), "model_args": asdict(model.args)}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "foreign.pt")
    torch.save({"model": model.state_dict(), "model_args": {**asdict(model.args), "dim": 128}}, tmp_path / "shape.pt")
    for name in ("truncated.pt", "random.pt", "foreign.pt", "shape.pt", "missing.pt"):
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        message = str(info.value)
        assert path in message and "\n" not in message, message


def test_hf_folder_without_weights_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_cli_summarises_a_checkpoint_or_fails_in_one_line(tmp_path, capsys):
    model = make_model(**SMALL)
    torch.save(model.state_dict(), tmp_path / "seed.pth")
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    assert main([f"--ckpt={tmp_path / 'seed.pth'}", "--n_heads=4"]) == 0
    assert "state_dict" in capsys.readouterr().out
    assert main([f"--ckpt={tmp_path / 'bad.pt'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pt" in err and len(err.strip().splitlines()) == 1
