"""Validation per source: the windows an evaluation scores are spread over the whole val file, chosen the same
for any world size, and scored per source (val/<source>) as well as overall; the numbers equal a computation
by hand. SFT validation is scored per `source` column the same way.

    python -m pytest -q tests/test_validation.py
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import pretrain
import trainer
from dataset import PretrainDataset
from dataset_sft import build_sft_datasets
from model import ModelArgs, Transformer
from test_dataset import write_bin
from test_dataset_sft import LetterTokenizer, write_csv
from test_trainer import flags
from tokenfile import manifest_path, with_token_offsets

SEQ = 16
WIKI_TOKENS, MEDICAL_TOKENS = 10 * SEQ + 5, 6 * SEQ + 1 - 5   # 257 tokens = 16 windows: 11 start in wiki, 5 in medical


def two_source_val(folder) -> str:
    """folder/pretrain_val.bin: a wiki part then a medical part, as data_process.py lays out its sources."""
    rng = np.random.default_rng(3)
    path = write_bin(os.path.join(folder, "pretrain_val.bin"), rng.integers(3, 512, WIKI_TOKENS + MEDICAL_TOKENS))
    with open(manifest_path(path), encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["sources"] = with_token_offsets([{"name": "wiki", "tokens": WIKI_TOKENS},
                                              {"name": "medical", "tokens": MEDICAL_TOKENS}])
    with open(manifest_path(path), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return path


def test_windows_are_spread_per_source_and_the_same_at_world_size_1_and_2(tmp_path):
    path = two_source_val(tmp_path)
    single = PretrainDataset(path, SEQ, micro_batch_size=2)
    assert {k: v.tolist() for k, v in single.source_windows().items()} == {"wiki": list(range(11)),
                                                                          "medical": [11, 12, 13, 14, 15]}
    chosen = {k: v.tolist() for k, v in single.eval_windows(6).items()}
    assert chosen == {"wiki": [1, 4, 6, 9], "medical": [12, 14]}   # spread over each source, both scored
    for world in (1, 2):
        seen: dict[str, list[int]] = {}
        ranks = [PretrainDataset(path, SEQ, micro_batch_size=2, rank=r, world_size=world, log=False)
                 for r in range(world)]
        for ds in ranks:
            for name, x, y in ds.eval_batches(6):
                seen.setdefault(name, []).extend(int(row[0]) for row, t in zip(x, y) if (t != -100).any())
        starts = {name: sorted(int(single.window(i)[0]) for i in windows) for name, windows in chosen.items()}
        assert {name: sorted(ids) for name, ids in seen.items()} == starts


def test_per_source_val_loss_equals_a_hand_computation(tmp_path, capsys):
    folder = tmp_path / "data"
    os.makedirs(folder)
    data = write_bin(str(folder / "pretrain_data.bin"), np.random.default_rng(0).integers(3, 512, 1000))
    val = two_source_val(folder)
    out = tmp_path / "out"
    pretrain.main(flags(data, out, max_iters=1, eval_iters=8, eval_interval=10))   # 8 x 2 = all 16 windows
    row = next(r for r in trainer.read_metrics(str(out / "metrics.jsonl")) if r["step"] == 0 and "val_loss" in r)
    torch.manual_seed(1337)   # the trainer's initial weights
    model = Transformer(ModelArgs(**torch.load(out / "ckpt.pt", weights_only=True)["model_args"])).eval()
    tokens = torch.from_numpy(np.fromfile(val, dtype=np.uint16).astype(np.int64))
    losses = {"wiki": [], "medical": []}
    with torch.no_grad():
        for i in range(16):
            window = tokens[i * SEQ:i * SEQ + SEQ + 1]
            logits, _ = model(window[None, :-1])
            token_losses = F.cross_entropy(logits[0], window[1:], reduction="none")
            losses["wiki" if i * SEQ < WIKI_TOKENS else "medical"] += token_losses.tolist()
    assert len(losses["wiki"]) == 11 * SEQ and len(losses["medical"]) == 5 * SEQ
    for name, values in losses.items():
        assert row[f"val/{name}"] == pytest.approx(sum(values) / len(values), rel=1e-5)
    everything = losses["wiki"] + losses["medical"]
    assert row["val_loss"] == pytest.approx(sum(everything) / len(everything), rel=1e-5)   # token-weighted
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
    assert f"step 0: val loss {row['val_loss']:.4f}" in capsys.readouterr().out.replace(
        f" (wiki {row['val/wiki']:.4f}, medical {row['val/medical']:.4f})", "")
    assert os.path.isfile(out / "loss.png")


def test_sft_validation_is_scored_per_source_column(tmp_path):
    rows = [("".join(chr(ord("a") + int(d)) for d in str(i)), "x" * (1 + i % 5), []) for i in range(30)]
    path = write_csv(tmp_path / "sft.csv", rows)
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    frame["source"] = ["alpaca" if i % 3 else "medical" for i in range(30)]
    frame.to_csv(path, index=False)
    per_world = []
    for world in (1, 2):
        seen: dict[str, list[int]] = {}
        for rank in range(world):
            _, val, _ = build_sft_datasets(path, LetterTokenizer(), 32, 2, rank=rank, world_size=world,
                                           val_fraction=0.5, progress=False)
            for name, x, y in val.eval_batches(1000):
                seen.setdefault(name, []).extend(int((t != -100).sum()) for t in y if (t != -100).any())
        per_world.append({k: sorted(v) for k, v in seen.items()})
    assert set(per_world[0]) == {"alpaca", "medical"} and per_world[0] == per_world[1]
    medical_rows = [r for r in val.samples.rows.tolist() if r % 3 == 0]
    assert len(per_world[0]["medical"]) == len(medical_rows) > 0
    assert per_world[0]["medical"] == sorted(1 + r % 5 + 1 for r in medical_rows)   # answer + <eos> per sample
