"""train_tokenizer.py: a SentencePiece tokenizer trained on the bundled sample, loading and round-tripping like
ChatGLM2's, and the whole pipeline (data_process → pretrain → sft → eval) running with it.

    python -m pytest -q tests/test_train_tokenizer.py
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

import train_tokenizer
from chatglm_tokenizer import load_tokenizer, tokenizer_identity
from conftest import REPO
from corpus_io import iter_corpus_texts, sample_corpus_specs

SMALL_VOCAB = 4000  # the bundled sample's characters need about 1,900 ids at coverage 0.9995


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """train_tokenizer.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_tokenizer.main(argv)
    return code, out.getvalue(), err.getvalue()


def write_jsonl(path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sample_tok(tmp_path_factory) -> tuple[str, str]:
    """A SMALL_VOCAB tokenizer trained on the bundled sample (the default corpus): (folder, stdout)."""
    out = str(tmp_path_factory.mktemp("tok") / "my_tok")
    code, stdout, stderr = run_main([f"--vocab_size={SMALL_VOCAB}", f"--out={out}", "--compare_with="])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def sample_sp(sample_tok) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=os.path.join(sample_tok[0], "tokenizer.model"))


# ---------------------------------------------------------------- the folder

def test_folder_loads_like_chatglm_tokenizer(sample_tok, sample_sp):
    folder, _ = sample_tok
    assert sorted(os.listdir(folder)) == ["tokenization_chatglm.py", "tokenizer.model", "tokenizer_config.json",
                                          "train_tokenizer.json"]
    assert not [n for n in os.listdir(os.path.dirname(folder)) if ".tmp-" in n]
    tok = load_tokenizer(folder)
    assert tok.vocab_size == SMALL_VOCAB == sample_sp.vocab_size() + 5
    assert tok.special_tokens == {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    assert [sample_sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    info = json.load(open(os.path.join(folder, "train_tokenizer.json"), encoding="utf-8"))
    assert info["tokenizer"]["sha256"] == tokenizer_identity(folder)["sha256"]
    assert info["tokenizer"]["vocab_size"] == SMALL_VOCAB


def test_autotokenizer_loads_the_folder_offline(sample_tok):
    from transformers import AutoTokenizer
    folder, _ = sample_tok
    auto = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    text = "高血压患者应低盐饮食。Take 2 tablets daily."
    assert auto.encode(text) == load_tokenizer(folder).encode(text)
    assert auto.decode(auto.encode(text)) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)


ROUND_TRIPS = {
    "chinese": "糖尿病是一组以高血糖为特征的代谢性疾病，长期高血糖会损伤眼、肾和神经。",
    "english": "Hypertension is a chronic medical condition; take 5 mg once daily.",
    "mixed": "患者 BMI 为 28.5，建议每周运动 150 分钟（WHO 建议）。",
    "rare_cjk": "𬱟𠀀龘",
    "emoji": "😀👍🏽🇨🇳 好的！",
    "whitespace": "  two leading\n\n\tindented line   \r\ntrailing  ",
    "newline_only": "\n",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip(sample_tok, name):
    tok = load_tokenizer(sample_tok[0])
    text = ROUND_TRIPS[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_ids(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_unseen_characters_fall_back_to_bytes(sample_sp):
    for char in "𬱟😀":
        pieces = [p for p in sample_sp.encode(char) if sample_sp.id_to_piece(p) != "▁"]
        assert [sample_sp.id_to_piece(p) for p in pieces] == [f"<0x{b:02X}>" for b in char.encode("utf-8")]
        assert sample_sp.unk_id() not in pieces


def test_digits_are_split(tmp_path):
    # the bundled sample has no ASCII digits (they would all be bytes), so train on numbers
    docs = [f"{2000 + i}年{i % 12 + 1}月，血压{120 + i}/{80 + i % 20}mmHg，体温{36 + i % 3}.{i % 10}度。" * 3
            for i in range(100)]
    out = str(tmp_path / "tok")
    code, _, stderr = run_main([f"--corpus=jsonl:text={write_jsonl(tmp_path / 'n.jsonl', docs)}",
                                "--vocab_size=600", f"--out={out}", "--compare_with="])
    assert code == 0, stderr
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    pieces = sp.encode("2024年血压140/90mmHg，体温37.5度", out_type=str)
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]
    assert [p.lstrip("▁") for p in pieces if any(c.isdigit() for c in p)] == list("202414090375")


# ---------------------------------------------------------------- sampling and held-out text

def test_held_out_documents_are_never_trained_on(tmp_path):
    # a character only held-out documents contain can only enter the vocabulary if they are trained on
    base = [f"第{i}篇：慢性肾病患者需要定期复查肾功能和电解质，注意控制血压。" for i in range(200)]
    docs = [d + "龘" * 30 if train_tokenizer.is_held_out(d + "龘" * 30, 0.2) else d for d in base]
    held = [train_tokenizer.is_held_out(d, 0.2) for d in docs]
    assert 10 < sum("龘" in d for d in docs) <= sum(held) < 80  # the hash split really splits
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    out = str(tmp_path / "tok")
    code, stdout, stderr = run_main([f"--corpus=jsonl:text={corpus}", "--vocab_size=400", f"--out={out}",
                                     "--holdout_fraction=0.2", "--compare_with="])
    assert code == 0, stderr
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert sp.encode("龘", out_type=str)[-3:] == ["<0xE9>", "<0xBE>", "<0x98>"]
    assert sp.piece_to_id("肾") != sp.unk_id()
    info = json.load(open(os.path.join(out, "train_tokenizer.json"), encoding="utf-8"))
    assert info["held_out_documents"] == {"jsonl:text": sum(held)}
    assert info["trained_documents"] == {"jsonl:text": len(docs) - sum(held)}
    assert f"on {sum(held)} held-out documents" in stdout


def test_sample_budget_is_shared_over_sources_and_files(tmp_path):
    from corpus_io import parse_corpus_spec
    folder = tmp_path / "many"
    folder.mkdir()
    for f in range(3):
        write_jsonl(folder / f"part{f}.jsonl", [f"文件{f}的第{i}篇文档。" for i in range(3)])
    big = write_jsonl(tmp_path / "big.jsonl", [f"大文件的第{i}篇文档。\n第二行" for i in range(100)])
    sources = [parse_corpus_spec(f"jsonl:text={folder}"), parse_corpus_spec(f"medical={big}")]
    sample = train_tokenizer.Sample(sources, sample_docs=20, holdout_fraction=0.0, holdout_docs=10)
    sentences = list(sample.sentences())
    # the folder's 3 files hold only 9 documents; the big file takes the share they could not fill
    assert sample.trained == {"jsonl:text": 9, "medical": 11}
    assert sample.held_out == []
    assert len(sentences) == 9 + 11 * 2
    assert sentences[-2:] == ["大文件的第10篇文档。", "第二行"]


def test_bad_records_are_skipped_counted_and_reported(tmp_path):
    good = [json.dumps({"text": f"第{i}条：高血压的一级预防包括限盐和运动。"}, ensure_ascii=False) for i in range(30)]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join(good[:10] + ["{not json", json.dumps({"title": "x"})] + good[10:]) + "\n",
                      encoding="utf-8")
    out = str(tmp_path / "tok")
    code, stdout, stderr = run_main([f"--corpus=medical={corpus}", "--vocab_size=400", f"--out={out}",
                                     "--compare_with="])
    assert code == 0, stderr
    assert f"{corpus}:11: malformed JSON" in stderr and f"{corpus}:12: missing field 'text'" in stderr
    assert "skipped: 1 malformed JSON, 1 missing field 'text'" in stdout
    info = json.load(open(os.path.join(out, "train_tokenizer.json"), encoding="utf-8"))
    assert info["skipped"] == {"medical": {"malformed JSON": 1, "missing field 'text'": 1}}
    assert sum(info["trained_documents"].values()) + sum(info["held_out_documents"].values()) == 30


def test_comparison_with_chatglm2_on_held_out_text(tmp_path, tokenizer_dir):
    out = str(tmp_path / "tok")
    code, stdout, stderr = run_main([f"--vocab_size={SMALL_VOCAB}", f"--out={out}", "--holdout_fraction=0.3",
                                     f"--compare_with={tokenizer_dir}"])
    assert code == 0, stderr
    texts = [t for t in iter_corpus_texts(sample_corpus_specs())
             if train_tokenizer.is_held_out(t, 0.3)]
    info = json.load(open(os.path.join(out, "train_tokenizer.json"), encoding="utf-8"))["held_out_comparison"]
    for folder in (out, tokenizer_dir):
        sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
        ids = [i for doc in sp.encode(texts) for i in doc]
        expected_bytes = sum(sp.is_byte(i) for i in ids) / len(ids)
        assert info[folder]["tokens"] == len(ids)
        assert info[folder]["tokens_per_char"] == pytest.approx(len(ids) / sum(map(len, texts)))
        assert info[folder]["byte_fallback_rate"] == pytest.approx(expected_bytes)
        assert info[folder]["round_trip_exact"] == len(texts)
        assert f"{info[folder]['tokens_per_char']:.3f}" in stdout
    assert info[tokenizer_dir]["vocab_size"] == 64794


# ---------------------------------------------------------------- refusals

def test_vocabulary_cap(tmp_path):
    out = str(tmp_path / "tok")
    code, _, stderr = run_main(["--vocab_size=65536", f"--out={out}"])
    assert code == 1 and not os.path.exists(out)
    assert stderr.startswith("error: --vocab_size=65,536 is too large") and "65,535" in stderr and "uint16" in stderr
    # 65,535 itself is allowed: the small sample then gives what it can, and says so
    code, stdout, stderr = run_main(["--vocab_size=65535", f"--out={out}", "--compare_with="])
    assert code == 0, stderr
    size = load_tokenizer(out).vocab_size
    assert size < 65535 and f"only supports {size:,} ids, fewer than the 65,535 asked for" in stdout


def test_vocabulary_too_small_for_the_sample(tmp_path):
    code, _, stderr = run_main(["--vocab_size=1000", f"--out={tmp_path / 'tok'}"])
    assert code == 1
    assert "error: --vocab_size=1000 is too small for this sample" in stderr and "--character_coverage" in stderr
    assert len(stderr.strip().splitlines()[-1]) < 300 and "Traceback" not in stderr


def test_existing_output_needs_overwrite(tmp_path):
    out = str(tmp_path / "tok")
    assert run_main([f"--vocab_size={SMALL_VOCAB}", f"--out={out}", "--compare_with="])[0] == 0
    before = tokenizer_identity(out)
    code, _, stderr = run_main([f"--vocab_size={SMALL_VOCAB + 500}", f"--out={out}"])
    assert code == 1 and "already exists; pass --overwrite" in stderr
    assert tokenizer_identity(out) == before
    code, _, stderr = run_main([f"--vocab_size={SMALL_VOCAB + 500}", f"--out={out}", "--overwrite", "--compare_with="])
    assert code == 0, stderr
    assert tokenizer_identity(out)["vocab_size"] == SMALL_VOCAB + 500 != before["vocab_size"]
    assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_missing_corpus_is_one_line(tmp_path):
    code, _, stderr = run_main([f"--corpus=wiki={tmp_path / 'nope.json'}", f"--out={tmp_path / 'tok'}"])
    assert code == 1 and stderr == f"error: {tmp_path / 'nope.json'}: no such file or folder\n"


# ---------------------------------------------------------------- the whole pipeline with the new tokenizer

TINY_TRAIN = ["--preset=tiny", "--max_iters=2", "--micro_batch_size=4", "--grad_accum_steps=1",
              "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--compile=false"]


def run_stage(script: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """One stage script as a user runs it; output captured for the assertion message."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def stage_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def pipeline(sample_tok, tmp_path_factory) -> dict:
    """data_process → pretrain → sft_data_process → sft on the bundled samples, all with the new tokenizer
    (tiny preset, a few steps); every path is absolute so nothing depends on the working folder."""
    tok = os.path.abspath(sample_tok[0])
    work = str(tmp_path_factory.mktemp("pipeline"))
    paths = {"tok": tok, "work": work, "bin": os.path.join(work, "data", "pretrain_data.bin"),
             "csv": os.path.join(work, "sft_data", "sft_data.csv"),
             "pretrain": os.path.join(work, "out", "pretrain"), "sft": os.path.join(work, "out", "sft")}
    stage_ok(run_stage("data_process.py", f"--tokenizer={tok}", f"--out={paths['bin']}", "--workers=1", cwd=work))
    stage_ok(run_stage("pretrain.py", f"--tokenizer={tok}", f"--data={paths['bin']}",
                       f"--out_dir={paths['pretrain']}", *TINY_TRAIN, cwd=work))
    stage_ok(run_stage("sft_data_process.py", f"--out={paths['csv']}", cwd=work))
    stage_ok(run_stage("sft.py", f"--tokenizer={tok}", f"--data={paths['csv']}", f"--out_dir={paths['sft']}",
                       f"--init_from={os.path.join(paths['pretrain'], 'ckpt.pt')}", *TINY_TRAIN, cwd=work))
    return paths


def test_pipeline_records_the_tokenizer_everywhere(pipeline):
    import torch
    identity = tokenizer_identity(pipeline["tok"])
    manifest = json.load(open(pipeline["bin"][:-len(".bin")] + ".json", encoding="utf-8"))
    assert (manifest["tokenizer"]["sha256"], manifest["tokenizer"]["vocab_size"]) == \
        (identity["sha256"], SMALL_VOCAB)
    tokens = np.memmap(pipeline["bin"], dtype=np.uint16, mode="r")
    assert int(tokens.max()) < SMALL_VOCAB and int(tokens[-1]) == 2
    # data_process.py's val documents are among those the tokenizer never trained on (same hash split)
    val = np.fromfile(pipeline["bin"].replace("_data.bin", "_val.bin"), dtype=np.uint16)
    docs = [load_tokenizer(pipeline["tok"]).decode_ids(d) for d in np.split(val, np.flatnonzero(val == 2) + 1)
            if len(d)]
    assert manifest["val_fraction"] <= train_tokenizer.parse_args([]).holdout_fraction
    assert docs and all(train_tokenizer.is_held_out(d, manifest["val_fraction"]) for d in docs)
    for stage in ("pretrain", "sft"):
        ckpt = torch.load(os.path.join(pipeline[stage], "ckpt.pt"), map_location="cpu", weights_only=True)
        assert ckpt["tokenizer"]["sha256"] == identity["sha256"]
        assert ckpt["tokenizer"]["path"] == pipeline["tok"]
        # pretrain.py sized the model from the tokenizer, and SFT kept it
        assert ckpt["model_args"]["vocab_size"] == SMALL_VOCAB
        assert ckpt["model"]["tok_embeddings.weight"].shape[0] >= SMALL_VOCAB


def test_eval_and_export_use_the_checkpoints_tokenizer(pipeline, tmp_path):
    ckpt = os.path.join(pipeline["sft"], "ckpt.pt")
    # no --tokenizer: eval.py must take the one the checkpoint records (ChatGLM2's would be refused)
    result = stage_ok(run_stage("eval.py", f"--ckpt={ckpt}", "--prompt=高血压患者饮食要注意什么？",
                                "--max_new_tokens=8", "--temperature=0", f"--out={tmp_path / 'answers.jsonl'}",
                                cwd=str(tmp_path)))
    assert f"vocab {SMALL_VOCAB}" in result.stdout
    answers = [json.loads(line) for line in open(tmp_path / "answers.jsonl", encoding="utf-8")]
    assert [a["prompt"] for a in answers] == ["高血压患者饮食要注意什么？"]
    stage_ok(run_stage("export_hf.py", f"--ckpt={ckpt}", f"--out={tmp_path / 'hf'}", cwd=str(tmp_path)))
    assert tokenizer_identity(str(tmp_path / "hf"))["sha256"] == tokenizer_identity(pipeline["tok"])["sha256"]


def run_script(script: str, *args: str) -> tuple[int, str]:
    """A stage script's own `__main__` (its exact error handling) run in this process, where torch is already
    imported: (exit code, stderr). Used for refusals, which stop before any training."""
    err = io.StringIO()
    argv, sys.argv = sys.argv, [os.path.join(REPO, script), *args]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
    return code, err.getvalue()


def test_mismatched_tokenizer_is_refused_by_every_stage(pipeline, tokenizer_dir):
    """Data and checkpoints made with the new tokenizer, given ChatGLM2's: one line naming both sides."""
    work = pipeline["work"]
    pretrain_ckpt, sft_ckpt = (os.path.join(pipeline[s], "ckpt.pt") for s in ("pretrain", "sft"))
    stages = [
        ("pretrain.py", pipeline["bin"], [f"--data={pipeline['bin']}", f"--out_dir={work}/refused", *TINY_TRAIN]),
        ("sft.py", pretrain_ckpt, [f"--data={pipeline['csv']}", f"--init_from={pretrain_ckpt}",
                                   f"--out_dir={work}/refused", *TINY_TRAIN]),
        ("eval.py", sft_ckpt, [f"--ckpt={sft_ckpt}", "--prompt=你好", "--max_new_tokens=2"]),
        ("eval_pretrain.py", pretrain_ckpt, [f"--ckpt={pretrain_ckpt}", f"--data={pipeline['bin']}"]),
        ("chat.py", sft_ckpt, [f"--ckpt={sft_ckpt}"]),
        ("export_hf.py", sft_ckpt, [f"--ckpt={sft_ckpt}", f"--out={work}/refused"]),
    ]
    for script, made_with_new, args in stages:
        code, stderr = run_script(script, f"--tokenizer={tokenizer_dir}", *args)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in stderr, f"{script}:\n{stderr[-3000:]}"
        assert made_with_new in errors[0] and tokenizer_dir in errors[0], f"{script} names not both: {errors[0]}"
    assert not os.path.exists(os.path.join(work, "refused"))


def test_sft_defaults_to_the_checkpoints_tokenizer(pipeline, tmp_path):
    """No --tokenizer: sft.py must fine-tune with the tokenizer its --init_from checkpoint was trained with."""
    out_dir = str(tmp_path / "sft")
    stage_ok(run_stage("sft.py", f"--data={pipeline['csv']}", f"--out_dir={out_dir}",
                       f"--init_from={os.path.join(pipeline['pretrain'], 'ckpt.pt')}", "--preset=tiny", "--max_iters=1",
                       "--micro_batch_size=4", "--grad_accum_steps=1", "--val_data=none", "--compile=false",
                       cwd=str(tmp_path)))
    import torch
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["tokenizer"]["sha256"] == tokenizer_identity(pipeline["tok"])["sha256"]
