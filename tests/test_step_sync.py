"""trainer.py's GPU step path without host syncs (run.defer_sync, on by default with CUDA and the fused AdamW),
run here on CPU: it trains exactly what the step that reads its numbers back every step trains, skipped
steps (a non-finite loss, a step without targets) included; the numbers are read back on log steps only.

    python -m pytest -q tests/test_step_sync.py
"""
from __future__ import annotations

import pytest
import torch

import dataset
import pretrain
import trainer
from test_trainer import FlakyTransformer, flags, load, make_data, train_losses


def fused_adamw(model, cfg, device):
    """make_optimizer's groups with the fused AdamW CUDA runs use (CPU has one too): it takes found_inf."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def train(data: str, out, monkeypatch, defer: bool) -> tuple[dict, list[int]]:
    """6 steps, log every 3rd; step 2 has a non-finite loss, step 3 no targets. (summary, steps per read back)"""
    monkeypatch.setattr(trainer, "make_optimizer", fused_adamw)
    monkeypatch.setattr(trainer, "Transformer", FlakyTransformer)
    monkeypatch.setattr(FlakyTransformer, "calls", 0)
    monkeypatch.setattr(FlakyTransformer, "bad_calls", {3})            # step 2: a non-finite loss
    next_batch, drawn = dataset.PretrainDataset.next_batch, [0]

    def batch_without_targets_in_step_3(self):
        x, y = next_batch(self)
        drawn[0] += 1
        return (x, torch.full_like(y, -100)) if drawn[0] in (5, 6) else (x, y)
    monkeypatch.setattr(dataset.PretrainDataset, "next_batch", batch_without_targets_in_step_3)
    build_run, reads = trainer.build_run, []

    def build_deferred(*args, **kwargs):
        run, meta = build_run(*args, **kwargs)
        run.defer_sync = defer
        return run, meta
    monkeypatch.setattr(trainer, "build_run", build_deferred)
    real_read_back = trainer.read_back
    monkeypatch.setattr(trainer, "read_back", lambda run, results: reads.append(len(results)) or
                        real_read_back(run, results))
    summary = pretrain.main(flags(data, out, max_iters=6, log_interval=3, eval_interval=100, save_interval=100))
    return summary, reads


def test_deferred_steps_train_exactly_what_synced_steps_train(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")
    out, synced = tmp_path / "deferred", tmp_path / "synced"
    for folder, defer in ((synced, False), (out, True)):
        summary, reads = train(data, folder, monkeypatch, defer)
        assert reads == ([3, 3] if defer else [1] * 6)                    # deferred: one read back per log step
        assert summary["skipped_steps"] == 2 and summary["step"] == 6
    losses = train_losses(out)
    assert sorted(losses) == [3, 6] and losses == pytest.approx(train_losses(synced), rel=1e-6)
    rows = [r for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "loss" in r]
    synced_rows = [r for r in trainer.read_metrics(str(synced / "metrics.jsonl")) if "loss" in r]
    assert [(r["tokens"], r["skipped_steps"]) for r in rows] == [(r["tokens"], r["skipped_steps"]) for r in synced_rows]
    a, b = load(out / "ckpt.pt"), load(synced / "ckpt.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7, msg=key)
    assert a["tokens_seen"] == b["tokens_seen"]
