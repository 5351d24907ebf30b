"""The quickstart (run_demo.sh) end to end on the bundled samples, with short training so CI stays fast.

    python -m pytest -q tests/test_demo.py
"""
from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO


def run_demo(root, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(REPO, "run_demo.sh")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DEMO_ROOT": str(root), **env})


def metrics(path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("demo")
    result = run_demo(root, PRETRAIN_ITERS="40", SFT_ITERS="20", DPO_ITERS="10")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result.stdout


def test_demo_token_file_matches_its_manifest(demo):
    root, _ = demo
    for split in ("pretrain_data", "pretrain_val"):
        tokens = np.memmap(root / "data" / f"{split}.bin", dtype=np.uint16, mode="r")
        manifest = json.load(open(root / "data" / f"{split}.json", encoding="utf-8"))
        assert len(tokens) == manifest["tokens"] > 0
        assert int((tokens == 2).sum()) == manifest["documents"]   # every document ends with <eos>
        assert tokens[-1] == 2


def test_demo_losses_are_finite_and_fall(demo):
    root, _ = demo
    for stage, min_drop in (("pretrain", 1.0), ("sft", 0.2)):   # nats; the short CI runs fall ~2.5 and ~0.45
        train, val = metrics(root / "out" / stage / "metrics.jsonl")
        assert train and val and all(math.isfinite(x) for x in train + val)
        assert val[-1] < val[0] - min_drop, (stage, val)
        assert os.path.isfile(root / "out" / stage / "ckpt.pt") and os.path.isfile(root / "out" / stage / "loss.png")


def test_demo_dpo_stage_trains_lora_adapters_from_ln2(demo):
    root, out = demo
    rows = [json.loads(line) for line in open(root / "out" / "dpo" / "metrics.jsonl", encoding="utf-8")]
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)   # policy = reference at step 0
    assert all(math.isfinite(r["rewards/accuracies"]) for r in rows if "loss" in r)
    assert "LoRA: rank 8" in out and "wrote 16 pairs" in out
    ckpt = torch.load(root / "out" / "dpo" / "ckpt.pt", weights_only=True)
    assert ckpt["lora"]["base"]["path"].endswith("sft/ckpt.pt") and all("lora_" in k for k in ckpt["model"])


def test_demo_sft_model_answers_and_export_matches(demo):
    _, out = demo
    answers = [line.split("助手：", 1)[1].strip() for line in out.splitlines() if line.startswith("助手：")]
    assert len(answers) == 2 and all(answers), out[-2000:]   # the piped chat: two questions, two answers
    assert "identical greedy tokens" in out
    assert "chance" in out and "0.250" in out                 # the multiple-choice score sits beside chance
    assert "demo finished" in out


def test_demo_stops_at_the_first_failing_stage(tmp_path, tokenizer_dir):
    result = run_demo(tmp_path, PRETRAIN_ITERS="many")
    assert result.returncode == 1
    assert 'stage "2/10 pretrain (tiny preset, CPU)" failed' in result.stderr
    assert "--max_iters" in result.stderr              # the stage's own one-line error is shown
    assert "3/10" not in result.stdout
