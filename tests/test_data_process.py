"""data_process.py and the corpus readers it shares (corpus_io.py).

    python -m pytest tests/test_data_process.py -q

Each reader runs on its real sample in ../shared/realdata/formats/; token streams are checked against an
independent sentencepiece encoding; resume after a real SIGKILL must be byte-identical.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

import corpus_io
import data_process
from conftest import REPO, need_shared
from corpus_io import CorpusError, SkipLog, iter_corpus_texts, iter_records

FORMATS = ("realdata", "formats")
REAL = {
    "wiki": ("wikipedia_cn", "wikipedia-cn-20230720-filtered.json"),
    "baidubaike": ("baidubaike_563w", "563w_baidubaike.json"),
    "wudao": ("wudao", "part-sample.json"),
    "medical": ("medical_pretrain", "pretrain", "train_encyclopedia.json"),
    "medical_qa": ("medical_finetune", "finetune", "*.json"),
}


# ---------------------------------------------------------------- helpers

def real_spec(name: str) -> str:
    parts = REAL[name]
    folder = need_shared(*FORMATS, *parts[:-1])
    return f"{name}={os.path.join(folder, parts[-1])}"


def load_json_values(path: str) -> list:
    """Records of a file the plain way (whole-file json.load or one json.loads a line): the test's oracle."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def expected_texts(name: str, path: str) -> list[str]:
    """The document texts the issue specifies for each corpus, written independently of corpus_io."""
    out = []
    for r in load_json_values(path):
        if name == "wiki":
            out.append(r["completion"])
        elif name == "baidubaike":
            head = r["title"] + "：" + (r["summary"] if r["summary"] is not None else "")
            out.append(head + "".join(s["title"] + "：" + s["content"] + "。" for s in r["sections"]))
        elif name == "wudao":
            out.append(r["title"] + r["content"])
        elif name == "medical":
            out.append(r["text"])
        elif name == "medical_qa":
            question = "\n".join(x for x in (r["instruction"], r["input"]) if x)
            out.append(question + "\n" + r["output"])
    return out


def sp_model(tokenizer_dir: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))


def encode_docs(sp: spm.SentencePieceProcessor, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        ids += sp.encode(text) + [2]
    return np.array(ids, dtype=np.uint16)


def read_bin(path: str) -> np.ndarray:
    return np.fromfile(path, dtype="<u2")


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def dp(argv: list[str], tokenizer_dir: str, capsys=None) -> tuple[int, str]:
    """Run data_process.main in this process; (exit code, stderr)."""
    rc = data_process.main(argv + [f"--tokenizer={tokenizer_dir}"])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def dp_subprocess(argv: list[str], tokenizer_dir: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "data_process.py"), *argv,
                           f"--tokenizer={tokenizer_dir}"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope="module")
def fever_jsonl(tmp_path_factory, realdata):
    """fever.txt as JSON Lines {"text"}, one paragraph a record (~1000 records, some repeated)."""
    path = tmp_path_factory.mktemp("fever") / "fever.jsonl"
    with open(os.path.join(realdata, "fever.txt"), encoding="utf-8") as f:
        rows = [{"text": line.strip()} for line in f if line.strip()]
    return write_jsonl(path, rows)


# ---------------------------------------------------------------- readers on the real layouts

@pytest.mark.parametrize("name", list(REAL))
def test_reader_on_real_sample(name):
    spec = real_spec(name)
    source = corpus_io.parse_corpus_spec(spec)
    expected = [t for p in source.paths for t in expected_texts(name, p)]
    log = SkipLog()
    assert list(iter_corpus_texts([spec], log)) == expected
    assert len(expected) >= 1 and log.total(name) == 0


def test_baidubaike_null_summary_keeps_title():
    spec = real_spec("baidubaike")
    texts = list(iter_corpus_texts([spec]))
    assert texts[3].startswith("美的FZ4010：重要参数：")   # the sample's record with "summary": null
    assert texts[0].startswith("红色食品：红色食品是指") and texts[0].endswith("。")


def test_generic_readers(tmp_path):
    alpaca = need_shared(*FORMATS, "alpaca_zh", "alpaca_gpt4_data_zh.json")
    assert list(iter_corpus_texts([f"json:output={alpaca}"])) == [r["output"] for r in load_json_values(alpaca)]
    belle = need_shared(*FORMATS, "belle_1M", "Belle_open_source_1M.json")
    assert list(iter_corpus_texts([f"jsonl:instruction={belle}"])) == \
        [r["instruction"] for r in load_json_values(belle)]
    txt = tmp_path / "a.txt"
    txt.write_text("第一段\n\n  \n第二段  \n", encoding="utf-8")
    assert list(iter_corpus_texts([f"txt={txt}"])) == ["第一段", "第二段"]
    assert [r.where for r in iter_records(str(txt), "txt")] == [f"{txt}:1", f"{txt}:4"]


def test_expand_paths_sorted_folder_and_glob(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    assert corpus_io.expand_paths(str(tmp_path)) == [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.txt")]
    assert corpus_io.expand_paths(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(CorpusError, match="no file matches"):
        corpus_io.expand_paths(str(tmp_path / "*.zst"))


@pytest.mark.parametrize("layout,name", [("jsonl", "c.jsonl"), ("jsonl", "c.jsonl.gz"),
                                         ("jsonl", "c.jsonl.zst"), ("txt", "c.txt"), ("json_array", "c.json")])
def test_iter_raw_resumes_from_any_position(tmp_path, layout, name):
    rows = [{"text": f"第{i}段文字" * (i % 7 + 1)} for i in range(60)]
    if layout == "json_array":
        body = json.dumps(rows, ensure_ascii=False, indent=2)
    else:
        lines = [r["text"] if layout == "txt" else json.dumps(r, ensure_ascii=False) for r in rows]
        body = "\n\n".join(lines[:30]) + "\n" + "\n".join(lines[30:]) + "\n"   # blank lines too
    data = body.encode()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / name
    path.write_bytes(data)
    full = list(corpus_io.iter_raw(str(path), layout))
    assert len(full) == 60
    for k in (0, 1, 29, 30, 59):
        resumed = list(corpus_io.iter_raw(str(path), layout, full[k].position))
        assert [(r.number, r.payload) for r in resumed] == [(r.number, r.payload) for r in full[k + 1:]]


# ---------------------------------------------------------------- the token stream

def test_token_stream_equals_sentencepiece(tmp_path, tokenizer_dir, capsys):
    specs = [real_spec(n) for n in REAL]
    texts = [t for spec in specs for p in corpus_io.parse_corpus_spec(spec).paths
             for t in expected_texts(spec.split("=")[0], p)]
    out = tmp_path / "raw.bin"
    argv = [f"--corpus={s}" for s in specs] + [f"--out={out}", "--val-fraction=0", "--no-dedup",
                                                "--min-tokens=0", "--workers=1"]
    assert dp(argv, tokenizer_dir, capsys)[0] == 0
    expected = encode_docs(sp_model(tokenizer_dir), texts)
    assert np.array_equal(read_bin(str(out)), expected)
    manifest = json.loads((tmp_path / "raw.json").read_text())
    with open(os.path.join(tokenizer_dir, "tokenizer.model"), "rb") as f:
        assert manifest["tokenizer"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert (manifest["dtype"], manifest["eos_id"], manifest["tokenizer"]["vocab_size"]) == ("uint16", 2, 64794)
    assert manifest["tokens"] == len(expected) and manifest["documents"] == len(texts)
    assert [s["documents_kept"] for s in manifest["sources"]] == \
        [len(list(iter_corpus_texts([s]))) for s in specs]
    assert not (tmp_path / "raw_val.bin").exists() and not list(tmp_path.glob("*.partial*"))


def test_worker_count_invariance(tmp_path, tokenizer_dir, fever_jsonl, capsys):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "p.bin"
        argv = [f"--corpus=c4_zh={fever_jsonl}", f"--out={out}", f"--workers={workers}", "--batch-docs=64"]
        assert dp(argv, tokenizer_dir, capsys)[0] == 0
        outs.append(out)
    for suffix in ("p.bin", "p_val.bin"):
        assert (outs[0].parent / suffix).read_bytes() == (outs[1].parent / suffix).read_bytes()
    manifests = [json.loads((o.parent / "p.json").read_text()) for o in outs]
    assert manifests[0]["sources"][0]["documents_kept"] == manifests[1]["sources"][0]["documents_kept"] > 500


def test_min_tokens_counts_eos(tmp_path, tokenizer_dir, capsys):
    sp = sp_model(tokenizer_dir)
    texts = ["肝", "高血压", "糖尿病患者应当定期检查眼底和足部。", "感冒多由病毒引起，一般一周左右自愈。"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "p.bin"
    assert dp([f"--corpus=medical={corpus}", f"--out={out}", "--val-fraction=0"], tokenizer_dir, capsys)[0] == 0
    kept = [t for t in texts if len(sp.encode(t)) + 1 > 5]
    assert 0 < len(kept) < len(texts)
    assert np.array_equal(read_bin(str(out)), encode_docs(sp, kept))
    assert json.loads((tmp_path / "p.json").read_text())["sources"][0]["too_short"] == len(texts) - len(kept)


def test_negative_min_tokens_error_names_the_value_given(tmp_path, tokenizer_dir, capsys):
    rc, err = dp([f"--out={tmp_path / 'p.bin'}", "--min-tokens=-3"], tokenizer_dir, capsys)
    assert rc == 1 and "--min-tokens must be at least 0, got -3" in err


# ---------------------------------------------------------------- dedup and the val split

def test_exact_dedup_across_sources(tmp_path, tokenizer_dir, capsys):
    a = "高血压患者应当减少食盐摄入， 每天不超过五克。"
    b = "糖尿病的典型症状是多饮、多食、多尿和体重减轻。"
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": a}, {"text": b}, {"text": a}])
    second = tmp_path / "b.json"
    # the same text up to whitespace runs and ends is a duplicate; one more character is not
    variants = [{"completion": " \n" + a.replace(" ", " \t\n ") + "  "}, {"completion": b + "！"}]
    second.write_text(json.dumps(variants, ensure_ascii=False), encoding="utf-8")
    argv = [f"--corpus=medical={first}", f"--corpus=wiki={second}", "--val-fraction=0"]
    sp = sp_model(tokenizer_dir)
    assert dp(argv + [f"--out={tmp_path / 'd.bin'}"], tokenizer_dir, capsys)[0] == 0
    assert np.array_equal(read_bin(str(tmp_path / "d.bin")), encode_docs(sp, [a, b, b + "！"]))
    sources = json.loads((tmp_path / "d.json").read_text())["sources"]
    assert [(s["documents_kept"], s["duplicate"]) for s in sources] == [(2, 1), (1, 1)]
    medical_tokens = len(encode_docs(sp, [a, b]))   # where each source's tokens sit in the .bin
    assert [(s["token_start"], s["token_end"]) for s in sources] == \
        [(0, medical_tokens), (medical_tokens, len(read_bin(str(tmp_path / "d.bin"))))]
    assert dp(argv + [f"--out={tmp_path / 'n.bin'}", "--no-dedup"], tokenizer_dir, capsys)[0] == 0
    assert json.loads((tmp_path / "n.json").read_text())["documents"] == 5


def test_dedup_set_matches_python_set(monkeypatch):
    monkeypatch.setattr(data_process.DedupSet, "MIN_RECENT", 8)   # merge often, into the sorted array
    rng = np.random.default_rng(0)
    seen, reference = data_process.DedupSet(), set()
    for _ in range(60):
        keys = rng.integers(0, 400, size=rng.integers(1, 40)).astype(np.uint64)
        fresh = seen.add_new(keys)
        expected = []
        for k in keys.tolist():
            expected.append(k not in reference)
            reference.add(k)
        assert fresh.tolist() == expected
    assert len(seen) == len(reference)
    rebuilt = data_process.DedupSet(np.array(sorted(reference), dtype=np.uint64))
    assert not rebuilt.add_new(np.array(sorted(reference), dtype=np.uint64)).any()


def split_oracle(texts: list[str], sp, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) tokens as the issue specifies them, computed independently: too-short documents and
    repeats of a whitespace-normalised text dropped, a document held out when bytes 8-15 of its 16-byte
    blake2b hash, read as a little-endian number, fall below fraction * 2**64."""
    train: list[int] = []
    val: list[int] = []
    seen = set()
    for text in texts:
        ids = sp.encode(text) + [2]
        digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()
        if len(ids) <= 5 or digest[:8] in seen:
            continue
        seen.add(digest[:8])
        (val if int.from_bytes(digest[8:], "little") < fraction * 2.0 ** 64 else train).extend(ids)
    return np.array(train, dtype=np.uint16), np.array(val, dtype=np.uint16)


def test_val_split_is_stable_by_document(tmp_path, tokenizer_dir, fever_jsonl, capsys):
    rows = load_json_values(fever_jsonl)
    reordered = rows[::-1][:700]   # other neighbours, other order: each document's side must not change
    sp = sp_model(tokenizer_dir)
    for name, texts in (("all", [r["text"] for r in rows]), ("reordered", [r["text"] for r in reordered])):
        corpus = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in texts])
        argv = [f"--corpus=c4_zh={corpus}", f"--out={tmp_path / name / 'p.bin'}", "--val-fraction=0.05"]
        assert dp(argv, tokenizer_dir, capsys)[0] == 0
        train, val = split_oracle(texts, sp, 0.05)
        assert len(val) > 0 and np.array_equal(read_bin(str(tmp_path / name / "p_val.bin")), val)
        assert np.array_equal(read_bin(str(tmp_path / name / "p.bin")), train)


def test_bare_run_on_bundled_sample(tmp_path, tokenizer_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert data_process.main([f"--tokenizer={tokenizer_dir}"]) == 0
    train = json.loads((tmp_path / "data" / "pretrain_data.json").read_text())
    val = json.loads((tmp_path / "data" / "pretrain_val.json").read_text())
    assert train["tokens"] == os.path.getsize(tmp_path / "data" / "pretrain_data.bin") // 2 > 5000
    assert val["tokens"] == os.path.getsize(tmp_path / "data" / "pretrain_val.bin") // 2 > 0
    assert {s["corpus"] for s in train["sources"]} == {"medical", "wiki", "baidubaike"}
    assert all(s["malformed"] == 0 and s["documents_kept"] > 0 for s in train["sources"])
    assert "total" in capsys.readouterr().out


def test_empty_val_split_is_not_published(tmp_path, tokenizer_dir, capsys):
    texts = ["高血压患者应当减少食盐摄入。", "糖尿病患者应当定期检查眼底。"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    split_keys = [int.from_bytes(corpus_io.text_keys(t)[8:], "little") for t in texts]
    assert min(split_keys) >= 0.01 * 2 ** 64   # neither falls in a 1% split
    (tmp_path / "p_val.bin").write_bytes(b"\x01\x00")
    rc, err = dp([f"--corpus=medical={corpus}", f"--out={tmp_path / 'p.bin'}", "--val-fraction=0.01"],
                 tokenizer_dir, capsys)
    assert rc == 0 and "no document fell in the val split" in err and "from an earlier run" in err
    assert (tmp_path / "p_val.bin").read_bytes() == b"\x01\x00" and not (tmp_path / "p_val.json").exists()
    assert json.loads((tmp_path / "p.json").read_text())["other_split"] is None


# ---------------------------------------------------------------- bad input

def test_malformed_records_counted_with_file_and_line(tmp_path, tokenizer_dir, capsys):
    good = "肺炎是指终末气道、肺泡和肺间质的炎症。"
    lines = [json.dumps({"text": good}, ensure_ascii=False).encode(), '{"text": "未闭合'.encode(), b"",
             b'{"text": "\xff\xfe"}', json.dumps({"title": "无"}, ensure_ascii=False).encode(),
             b'{"text": 42}', b'{"text": "   "}', b'["not an object"]',
             json.dumps({"text": good + "！"}, ensure_ascii=False).encode(), b'{"text": "\\ud83d\\u611f"}']
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "p.bin"
    rc, err = dp([f"--corpus=medical={path}", f"--out={out}", "--val-fraction=0"], tokenizer_dir, capsys)
    assert rc == 0
    for line, reason in ((2, "malformed JSON (Unterminated string"), (4, "invalid UTF-8"),
                         (5, "missing field 'text'"), (6, "field 'text' is not a string (got number)"),
                         (7, "empty document")):
        assert f"{path}:{line}: {reason}" in err
    assert f"{path}:8:" not in err and "further skipped records are counted" in err   # the first 5 are shown
    source = json.loads((tmp_path / "p.json").read_text())["sources"][0]
    assert source["malformed"] == 7 and source["documents_read"] == 9 and source["documents_kept"] == 2
    assert source["malformed_by_reason"]["not a JSON object"] == source["malformed_by_reason"]["invalid Unicode"] == 1
    rc, err = dp([f"--corpus=medical={path}", f"--out={tmp_path / 's.bin'}", "--strict"], tokenizer_dir, capsys)
    assert rc == 1 and err.strip().splitlines()[-1].startswith(f"error: {path}:2: malformed JSON")
    assert not (tmp_path / "s.bin").exists()


def test_an_empty_or_all_malformed_corpus_exits_non_zero_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    """Before: exit code 0 and a 0-token .bin, without a word."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": 42}\n{"title": "x"}\nnot json\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for corpus, read in ((bad, 3), (empty, 0)):
        out = tmp_path / f"{corpus.stem}.bin"
        rc, err = dp([f"--corpus=medical={corpus}", f"--out={out}"], tokenizer_dir, capsys)
        assert rc == 1, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: no usable document in medical={corpus}: {read} record(s) read"), line
        assert f"{read if corpus == bad else 0} malformed" in line and "nothing written" in line
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "empty.jsonl"]   # no .bin, manifest or partial file


def test_truncated_json_array_and_compressed_file(tmp_path, tokenizer_dir, capsys):
    array = tmp_path / "cut.json"
    array.write_text('[{"completion": "第一篇完整的百科文章内容。"}, {"completion": "第二篇被截', encoding="utf-8")
    records = list(iter_records(str(array), "json_array"))
    assert records[0].value == {"completion": "第一篇完整的百科文章内容。"}
    assert records[1].where == f"{array}:item 2" and records[1].error.startswith("malformed JSON array")
    body = "".join(json.dumps({"text": f"第{i}条记录，内容各不相同。"}, ensure_ascii=False) + "\n" for i in range(400))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(zstandard.ZstdCompressor().compress(body.encode())[:300])
    rc, err = dp([f"--corpus=wiki={array}", f"--corpus=c4_zh={cut}", f"--out={tmp_path / 'p.bin'}"],
                 tokenizer_dir, capsys)
    assert rc == 0 and f"{cut}:1: unreadable file (ZstdError" in err
    sources = json.loads((tmp_path / "p.json").read_text())["sources"]
    assert [s["malformed"] for s in sources] == [1, 1]


def test_invalid_utf8_in_json_array_skips_only_that_record(tmp_path, tokenizer_dir, capsys):
    texts = ["第一篇百科文章讲的是长江。", "第三篇百科文章讲的是黄河。", "第四篇百科文章讲的是泰山。"]
    items = [json.dumps({"completion": t}, ensure_ascii=False).encode() for t in texts]
    items.insert(1, '{"completion": "第二篇坏'.encode() + b"\xff\xfe" + '文章"}'.encode())
    array = tmp_path / "wiki.json"
    array.write_bytes(b"[\n" + b",\n".join(items) + b"\n]\n")
    records = list(iter_records(str(array), "json_array"))
    assert [r.value for r in records] == [{"completion": texts[0]}, None, *({"completion": t} for t in texts[1:])]
    assert records[1].where == f"{array}:item 2"
    assert records[1].error == "invalid UTF-8 (byte 0xff in field 'completion')"
    full = list(corpus_io.iter_raw(str(array), "json_array"))
    assert full[-1].position.offset == array.stat().st_size   # the file's own bytes, not those ijson saw
    for k in (0, 1):   # resuming on either side of the bad record
        resumed = list(corpus_io.iter_raw(str(array), "json_array", full[k].position))
        assert [tuple(r[:3]) for r in resumed] == [tuple(r[:3]) for r in full[k + 1:]]
    out = tmp_path / "p.bin"
    rc, err = dp([f"--corpus=wiki={array}", f"--out={out}", "--val-fraction=0", "--min-tokens=0"],
                 tokenizer_dir, capsys)
    assert rc == 0 and f"{array}:item 2: invalid UTF-8 (byte 0xff" in err
    assert np.array_equal(read_bin(str(out)), encode_docs(sp_model(tokenizer_dir), texts))
    source = json.loads((tmp_path / "p.json").read_text())["sources"][0]
    assert (source["documents_read"], source["documents_kept"], source["malformed"]) == (4, 3, 1)
    assert source["malformed_by_reason"] == {"invalid UTF-8": 1}


@pytest.mark.parametrize("suffix,compress", [
    (".gz", gzip.compress), (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_compressed_inputs_read_transparently(tmp_path, fever_jsonl, suffix, compress):
    with open(fever_jsonl, "rb") as f:
        lines = f.readlines()[:300]
    packed = tmp_path / ("fever.jsonl" + suffix)
    packed.write_bytes(compress(b"".join(lines)))
    got = list(iter_records(str(packed), "jsonl"))
    assert [r.value for r in got] == [json.loads(line) for line in lines]
    assert got[-1].where == f"{packed}:300"


def test_clear_errors_one_line(tmp_path, tokenizer_dir, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "一篇文档。"}])
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        ([f"--corpus=nosuch={corpus}"], "unknown corpus 'nosuch'"),
        ([f"--corpus=medical={tmp_path / '*.zst'}"], "no file matches"),
        ([f"--corpus=medical={tmp_path / 'missing.jsonl'}"], "no such file"),
        ([f"--corpus=medical={corpus}", f"--out={blocker / 'sub' / 'p.bin'}"], "cannot create the output folder"),
        ([f"--corpus=medical={corpus}", "--val-fraction=1.5"], "--val-fraction"),
        ([f"--corpus={corpus}"], "expected NAME=PATH_OR_GLOB"),
    ]
    for argv, message in cases:
        rc, err = dp(argv + [f"--out={tmp_path / 'o.bin'}"] if "--out" not in str(argv) else argv,
                     tokenizer_dir, capsys)
        assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)


def test_list_corpora(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "data_process.py"), "--list-corpora"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    names = set(proc.stdout.splitlines())   # each format's name on a line of its own, its description below
    assert set(corpus_io.PRETRAIN_CORPORA) | set(corpus_io.GENERIC_CORPORA) <= names
    assert not (tmp_path / "data").exists()   # it only describes, it processes nothing


def test_cli_error_has_no_traceback(tmp_path, tokenizer_dir):
    proc = dp_subprocess(["--corpus=hf:someone/missing", f"--out={tmp_path / 'p.bin'}"], tokenizer_dir,
                         env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: hf:someone/missing: cannot stream it")


def test_tokenizer_over_uint16_refused(tmp_path, tokenizer_dir, monkeypatch, capsys):
    import chatglm_tokenizer
    real = chatglm_tokenizer.load_tokenizer

    def big_vocab(path):
        tok = real(path)
        monkeypatch.setattr(type(tok), "vocab_size", property(lambda self: 70000))
        return tok
    monkeypatch.setattr(chatglm_tokenizer, "load_tokenizer", big_vocab)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "一篇文档。"}])
    rc, err = dp([f"--corpus=medical={corpus}", f"--out={tmp_path / 'p.bin'}"], tokenizer_dir, capsys)
    assert rc == 1 and "70000 ids" in err and not (tmp_path / "p.bin").exists()


# ---------------------------------------------------------------- crash safety

def _reference_run(tmp_path, argv, tokenizer_dir) -> dict[str, bytes]:
    ref = tmp_path / "ref" / "p.bin"
    assert data_process.main(argv + [f"--out={ref}", f"--tokenizer={tokenizer_dir}"]) == 0
    return {n: (ref.parent / n).read_bytes() for n in ("p.bin", "p_val.bin")}


def _outputs(folder) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("p.bin", "p_val.bin")}


def _manifest_counts(path) -> list:
    return [{k: v for k, v in s.items() if k != "spec"} for s in json.loads(path.read_text())["sources"]]


def test_resume_after_sigkill_is_byte_identical(tmp_path, tokenizer_dir, fever_jsonl, capsys):
    wiki = real_spec("wiki")
    argv = [f"--corpus=c4_zh={fever_jsonl}", f"--corpus={wiki}", "--batch-docs=32", "--val-fraction=0.05"]
    reference = _reference_run(tmp_path, argv, tokenizer_dir)
    out = tmp_path / "run" / "p.bin"
    hook = {data_process.COMMIT_EVERY_ENV: "4", data_process.KILL_AFTER_ENV: "14"}
    proc = dp_subprocess(argv + [f"--out={out}", "--workers=2"], tokenizer_dir, env=hook, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "run" / "p.bin.partial-state.json").read_text())
    assert 0 < state["cursor"][2][0] < 1000 and not out.exists()
    # bytes past the last commit (written, not committed) must be cut away on resume
    for name in ("p.bin.partial", "p_val.bin.partial", "p.bin.partial-digests"):
        with open(tmp_path / "run" / name, "ab") as f:
            f.write(b"\x07\x00" * (1 << 20))   # more than the rest of the run writes
    rc, err = dp(argv + [f"--out={out}", "--workers=1"], tokenizer_dir, capsys)
    assert rc == 0 and "resuming" in err
    assert _outputs(tmp_path / "run") == reference
    assert _manifest_counts(tmp_path / "run" / "p.json") == _manifest_counts(tmp_path / "ref" / "p.json")
    assert not list((tmp_path / "run").glob("*.partial*"))


def test_external_kill_mid_run_then_resume(tmp_path, tokenizer_dir, fever_jsonl):
    argv = [f"--corpus=c4_zh={fever_jsonl}", "--batch-docs=8", "--workers=1"]
    reference = _reference_run(tmp_path, argv, tokenizer_dir)
    out = tmp_path / "run" / "p.bin"
    state = tmp_path / "run" / "p.bin.partial-state.json"
    cmd = [sys.executable, os.path.join(REPO, "data_process.py"), *argv, f"--out={out}",
           f"--tokenizer={tokenizer_dir}"]
    proc = subprocess.Popen(cmd, env={**os.environ, data_process.COMMIT_EVERY_ENV: "3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and state.exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert _outputs(tmp_path / "run") == reference


def test_crash_while_publishing_then_rerun(tmp_path, tokenizer_dir, fever_jsonl, monkeypatch, capsys):
    argv = [f"--corpus=c4_zh={fever_jsonl}", "--workers=1"]
    reference = _reference_run(tmp_path, argv, tokenizer_dir)
    out = tmp_path / "run" / "p.bin"
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if str(dst).endswith("p_val.bin"):
            raise KeyboardInterrupt  # stands in for a kill between the two renames
        real_replace(src, dst)
    monkeypatch.setattr(data_process.os, "replace", replace_then_die)
    assert dp(argv + [f"--out={out}"], tokenizer_dir, capsys)[0] == 130
    assert out.exists() and not (tmp_path / "run" / "p_val.bin").exists()
    monkeypatch.setattr(data_process.os, "replace", real_replace)
    assert dp(argv + [f"--out={out}"], tokenizer_dir, capsys)[0] == 0
    assert _outputs(tmp_path / "run") == reference


def test_other_command_does_not_resume(tmp_path, tokenizer_dir, fever_jsonl, capsys):
    base = [f"--corpus=c4_zh={fever_jsonl}", "--batch-docs=32"]
    out = tmp_path / "run" / "p.bin"
    hook = {data_process.COMMIT_EVERY_ENV: "2", data_process.KILL_AFTER_ENV: "5"}
    assert dp_subprocess(base + [f"--out={out}", "--workers=1"], tokenizer_dir, env=hook,
                         timeout=120).returncode == -signal.SIGKILL
    reference = _reference_run(tmp_path, base + ["--min-tokens=20"], tokenizer_dir)
    rc, err = dp(base + [f"--out={out}", "--min-tokens=20", "--workers=1"], tokenizer_dir, capsys)
    assert rc == 0 and "starting afresh" in err and "resuming" not in err
    assert _outputs(tmp_path / "run") == reference
