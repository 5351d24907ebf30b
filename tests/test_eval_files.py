"""eval.py reads only what it needs (the benchmark file it was given, and dev files only where the benchmark's
layout puts them or --dev names them), and eval_pretrain.py scores a .bin per source.

    python -m pytest -q tests/test_eval_files.py
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import eval as ev
import eval_pretrain as ep
from chatglm_tokenizer import tokenizer_identity
from test_eval import BENCH, SAMPLE, tiny_ckpt  # noqa: F401 (a fixture)
from tokenfile import with_token_offsets


@pytest.fixture
def crowded(tmp_path) -> str:
    """A C-Eval val file in a folder that also holds an unrelated CSV, a malformed one and another benchmark's
    dev folder (CMMLU's, whose rows lack C-Eval's fields): what a data disk looks like."""
    shutil.copyfile(os.path.join(SAMPLE, "clinical_medicine_val.csv"), tmp_path / "my_val.csv")
    (tmp_path / "notes.csv").write_text("name,value\na,1\n", encoding="utf-8")
    (tmp_path / "broken.csv").write_text('id,question\n0,"unterminated\n', encoding="utf-8")
    shutil.copytree(os.path.join(BENCH, "cmmlu"), tmp_path / "cmmlu")
    return str(tmp_path / "my_val.csv")


def reading(monkeypatch) -> list[str]:
    """The benchmark files eval.py parses, in order."""
    read: list[str] = []
    real = ev.read_benchmark_file

    def record(path, *args):
        read.append(os.path.basename(path))
        return real(path, *args)
    monkeypatch.setattr(ev, "read_benchmark_file", record)
    return read


def test_a_benchmark_file_is_read_alone_whatever_lies_around_it(crowded, monkeypatch, capsys):
    """Before: every CSV below the file's folder with "dev" in its path was parsed, even with --shots=0, and the
    CMMLU dev file stopped the run ("missing field question")."""
    read = reading(monkeypatch)
    for shots in (0, 5):
        bench = ev.load_benchmark(f"ceval:{crowded}", shots=shots)
        assert len(bench.questions) == 20 and bench.dev == {}
    assert read == ["my_val.csv", "my_val.csv"]
    with pytest.raises(ev.BenchError, match="pass --dev=PATH"):
        ev.shots_for(bench, "clinical_medicine", 5)
    dev = os.path.join(SAMPLE, "clinical_medicine_dev.csv")
    assert len(ev.load_benchmark(f"ceval:{crowded}", dev_path=dev, shots=5).dev["clinical_medicine"]) == 5
    assert ev.load_benchmark(f"ceval:{crowded}", dev_path=dev, shots=0).dev == {}   # --shots=0 reads no dev data
    assert read[2:] == ["my_val.csv", "clinical_medicine_dev.csv", "my_val.csv"]


def test_dev_files_beside_the_file_are_used_and_a_malformed_one_is_skipped(crowded, monkeypatch, capsys):
    folder = os.path.dirname(crowded)
    shutil.copyfile(os.path.join(SAMPLE, "clinical_medicine_dev.csv"), os.path.join(folder, "my_dev.csv"))
    with open(os.path.join(folder, "other_dev.csv"), "w", encoding="utf-8") as f:
        f.write("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A,extra\n")   # a row with more fields than the header
    read = reading(monkeypatch)
    bench = ev.load_benchmark(f"ceval:{crowded}", shots=5)
    assert read == ["my_val.csv", "my_dev.csv", "other_dev.csv"] and len(bench.dev["my"]) == 5
    assert "warning: dev file" in capsys.readouterr().err
    with pytest.raises(ev.BenchError, match="more fields than the header"):   # named with --dev: an error
        ev.load_benchmark(f"ceval:{crowded}", dev_path=os.path.join(folder, "other_dev.csv"), shots=5)


def test_eval_cli_with_zero_shots_scores_only_the_given_file(crowded, tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    read = reading(monkeypatch)
    out = tmp_path / "scores.json"
    assert ev.main([f"--ckpt={tiny_ckpt}", f"--bench=ceval:{crowded}", "--shots=0", "--limit=3",
                    f"--out={out}"]) == 0
    assert read == ["my_val.csv"] and len(json.loads(out.read_text(encoding="utf-8"))["items"]) == 3


def test_eval_pretrain_reports_each_source(tiny_ckpt, tokenizer, tokenizer_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    texts = {"wiki": ["北京是中国的首都。", "长江是中国最长的河流。"], "medical": ["高血压患者应当低盐饮食。"]}
    parts = {name: [i for t in docs for i in tokenizer.encode(t) + [2]] for name, docs in texts.items()}
    data = tmp_path / "val.bin"
    np.array(parts["wiki"] + parts["medical"], dtype=np.uint16).tofile(data)
    manifest = {"dtype": "uint16", "tokenizer": tokenizer_identity(tokenizer_dir), "tokens": data.stat().st_size // 2,
                "sources": with_token_offsets([{"name": n, "tokens": len(p)} for n, p in parts.items()])}
    (tmp_path / "val.json").write_text(json.dumps(manifest), encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert ep.main([f"--ckpt={tiny_ckpt}", "--ppl_only", f"--data={data}", f"--out={out}"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    model, _, _ = ep.load_for_inference(tiny_ckpt)
    for name, tokens in parts.items():
        alone = ep.perplexity_report(model, tokenizer, np.array(tokens, dtype=np.uint16), name, None, 8, "cpu", None)
        got = report["sources"][name]
        assert got["tokens"] == len(tokens) and got["loss"] == pytest.approx(alone.loss, rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(alone.bits_per_byte, rel=1e-5)
    assert report["tokens"] == len(parts["wiki"]) + len(parts["medical"])
    assert report["total_nats"] == pytest.approx(sum(s["total_nats"] for s in report["sources"].values()))
    printed = capsys.readouterr().out
    assert "source" in printed and "wiki" in printed and "medical" in printed
    calls = []   # --max_tokens leaving one source: the stream is scored once, not per source and then again
    real = ep.perplexity_report
    monkeypatch.setattr(ep, "perplexity_report", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    assert ep.main([f"--ckpt={tiny_ckpt}", "--ppl_only", f"--data={data}", f"--max_tokens={len(parts['wiki'])}"]) == 0
    assert calls == [str(data)]
