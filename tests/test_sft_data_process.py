"""sft_data_process.py: every reader on its real sample, multi-turn history, the CSV round trip, dedup,
filters, malformed records, --strict, error lines and the bare default run."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, need_shared
from sft_data_process import LengthFilter, main

NO_FILTERS = ["--min_prompt_chars=0", "--min_answer_chars=0", "--max_chars=0"]


def run(tmp_path, capsys, *args):
    """main() on `args` writing tmp_path/out.csv: (exit code, rows read back or None, stdout, stderr)."""
    out = tmp_path / "out.csv"
    code = main([*args, f"--out={out}"])
    captured = capsys.readouterr()
    rows = read_back(out) if out.exists() else None
    return code, rows, captured.out, captured.err


def read_back(path):
    """The CSV as dataset_sft.py reads it."""
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def conversations(rows):
    """Rows → lists of (prompt, answer) turns, oldest first."""
    return [[tuple(t) for t in json.loads(h)] + [(p, a)]
            for p, a, h in zip(rows["prompt"], rows["answer"], rows["history"])]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def summary_line(stdout, source):
    """The summary-table numbers of `source`: read kept too_short too_long duplicate malformed unanswered."""
    line = next(l for l in stdout.splitlines() if l.split()[:1] == [source])
    return [int(n.replace(",", "")) for n in line.split()[1:]]


def unique(convs):
    seen, kept = set(), []
    for conv in convs:
        if json.dumps(conv) not in seen:
            seen.add(json.dumps(conv))
            kept.append(conv)
    return kept


# ---------------------------------------------------------------- readers on real samples

def instruction_prompt(record):
    return "\n".join(p for p in (record["instruction"].strip(), record["input"].strip()) if p)


def test_alpaca_zh_real_sample(realdata, tmp_path, capsys):
    path = need_shared("realdata", "formats", "alpaca_zh", "alpaca_gpt4_data_zh.json")
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=alpaca_zh={path}", *NO_FILTERS)
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    assert code == 0
    assert conversations(rows) == [[(instruction_prompt(r), r["output"].strip())] for r in records]
    assert set(rows["history"]) == {"[]"} and set(rows["source"]) == {"alpaca_zh"}
    assert summary_line(out, "alpaca_zh")[:2] == [len(records), len(records)]


def test_belle_real_sample(realdata, tmp_path, capsys):
    path = need_shared("realdata", "formats", "belle_1M", "Belle_open_source_1M.json")
    code, rows, _, _ = run(tmp_path, capsys, f"--corpus=belle={path}", *NO_FILTERS)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert code == 0 and len(records) == 50
    assert conversations(rows) == unique([[(instruction_prompt(r), r["output"].strip())] for r in records])


def test_medical_sft_zh_and_en(realdata, tmp_path, capsys):
    folder = need_shared("realdata", "formats", "medical_finetune", "finetune")
    code, rows, _, _ = run(tmp_path, capsys, f"--corpus=medical_sft={folder}/train_*.json", *NO_FILTERS)
    assert code == 0 and len(rows) == 2
    by_lang = dict(zip(["en", "zh"], conversations(rows)))    # files sorted: train_en_1 before train_zh_0
    assert by_lang["zh"][0][0] == "曲匹地尔片的用法用量"           # zh: the question is the instruction
    en_prompt = by_lang["en"][0][0]
    assert en_prompt.startswith("If you are a doctor, please answer the medical questions")
    assert en_prompt.endswith("\nDoctor, I have been experiencing sudden and frequent panic attacks. "
                              "I don't know what to do.")   # en: the question is the input, after a newline
    assert by_lang["zh"][0][1].startswith("注意：同种药品")


def test_chatmed_real_sample(realdata, tmp_path, capsys):
    path = need_shared("realdata", "formats", "chatmed_consult", "ChatMed_Consult-v0.3.json")
    code, rows, _, _ = run(tmp_path, capsys, f"--corpus=chatmed={path}", *NO_FILTERS)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert code == 0
    assert conversations(rows) == unique([[(r["query"].strip(), r["response"].strip())] for r in records])


def role_turns(turns, role_key, text_key):
    """Reference pairing: alternate user/assistant texts; a trailing user text dropped."""
    texts = [t[text_key].strip() for t in turns]
    if len(texts) % 2:
        texts = texts[:-1]
    return list(zip(texts[0::2], texts[1::2]))


def test_disc_med_real_sample_multi_turn(realdata, tmp_path, capsys):
    path = need_shared("realdata", "formats", "disc_med_sft", "DISC-Med-SFT_released.jsonl")
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=disc_med={path}", *NO_FILTERS)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert code == 0
    assert conversations(rows) == unique([role_turns(r["conversation"], "role", "content") for r in records])
    ends_on_user = [r for r in records if r["conversation"][-1]["role"] == "user"]
    assert [r["_id"] for r in ends_on_user] == ["01-23885"]    # PROVENANCE.md: 0-based line 46
    assert summary_line(out, "disc_med")[6] == 1               # counted as 'unanswered'
    multi = rows[rows["history"] != "[]"]
    assert len(multi) > 10                                    # one row per conversation, not per turn
    assert len(rows) == len(records)


def test_sharegpt_real_sample(realdata, tmp_path, capsys):
    path = need_shared("realdata", "medical_sft_1K_format.jsonl")
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=sharegpt={path}", *NO_FILTERS)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    expected = unique([role_turns(r["conversations"], "from", "value") for r in records])
    read, kept, _, _, duplicate, malformed, _ = summary_line(out, "sharegpt")
    assert code == 0 and read == 1000 and malformed == 0
    assert conversations(rows) == expected and kept == len(expected) and duplicate == 1000 - len(expected)


# ---------------------------------------------------------------- huatuo (no real sample exists)

def test_huatuo_fixture(tmp_path, capsys):
    path = write_jsonl(tmp_path / "HuatuoGPT_sft_data_v1.jsonl", [
        {"data": ["问：头痛三天了，还有点发烧，怎么办？", "答：建议多休息、多喝水，体温超过38.5℃可服退烧药。"]},
        {"data": ["问：孩子咳嗽一周了", "答：咳嗽超过一周建议到儿科就诊。", "问：需要拍胸片吗？",
                  "答：医生听诊后再决定是否需要。", "问：谢谢医生"]},
        {"data": ["问: 用的是半角冒号的提问，也能读吗？", "答: 可以，前缀同样会去掉。"]},
        {"data": ["问：只有问题没有回答"]},
        {"data": ["答：先回答", "问：再提问"]},
        {"data": "问：不是数组"},
    ])
    code, rows, out, err = run(tmp_path, capsys, f"--corpus=huatuo={path}", *NO_FILTERS)
    assert code == 0
    assert conversations(rows) == [
        [("头痛三天了，还有点发烧，怎么办？", "建议多休息、多喝水，体温超过38.5℃可服退烧药。")],
        [("孩子咳嗽一周了", "咳嗽超过一周建议到儿科就诊。"), ("需要拍胸片吗？", "医生听诊后再决定是否需要。")],
        [("用的是半角冒号的提问，也能读吗？", "可以，前缀同样会去掉。")],
    ]
    assert summary_line(out, "huatuo") == [6, 3, 0, 0, 0, 3, 1]
    assert f"{path}:4: no answered turn (field 'data'" in err
    assert f"{path}:5: bad turn prefix (field 'data[0]' should start with 问：)" in err
    assert f"{path}:6: field 'data' is not an array (got string)" in err


# ---------------------------------------------------------------- CSV round trip, dedup, filters

TRICKY = ["第一行\n第二行", "Windows 换行\r\n也要保留", 'quote "引号" and ""double""', "逗号, comma,,",
          "emoji 😀🩺👩‍⚕️", "NA", "null", "nan", "N/A", "", "#不是注释", "tab\there", "\\N", "a\rb", "行\u2028分隔"]


def test_csv_round_trip_exact(tmp_path, capsys):
    records = [{"q": f"{i}:{text}", "a": text} for i, text in enumerate(TRICKY)]
    path = write_jsonl(tmp_path / "tricky.jsonl", records)
    code, rows, _, _ = run(tmp_path, capsys, f"--corpus=jsonl:q,a={path}", *NO_FILTERS)
    assert code == 0
    assert list(rows.columns) == ["prompt", "answer", "history", "source"]
    assert list(rows["prompt"]) == [r["q"] for r in records]
    assert list(rows["answer"]) == [r["a"] for r in records]
    assert set(rows["source"]) == {"jsonl:q,a"}


def test_history_round_trips_tricky_text(tmp_path, capsys):
    turns = [(f"问题{i}：{text}", f"回答：{text}") for i, text in enumerate(TRICKY)]
    conv = [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(sum(turns, ()))]
    path = write_jsonl(tmp_path / "multi.jsonl", [{"conversations": conv}])
    code, rows, _, _ = run(tmp_path, capsys, f"--corpus=sharegpt={path}", *NO_FILTERS)
    assert code == 0 and len(rows) == 1
    assert conversations(rows) == [turns]
    assert json.loads(rows["history"][0]) == [list(t) for t in turns[:-1]]


def test_text_is_stripped_and_input_joined(tmp_path, capsys):
    path = write_jsonl(tmp_path / "belle.jsonl", [
        {"instruction": "  把下面的句子翻译成英文。\n", "input": " 我喜欢读书。 ", "output": "\nI like reading.  "},
        {"instruction": "请写一句关于春天的诗句。", "output": "春眠不觉晓，处处闻啼鸟。"},       # no input field
    ])
    code, rows, _, _ = run(tmp_path, capsys, f"--corpus=belle={path}")
    assert code == 0
    assert conversations(rows) == [[("把下面的句子翻译成英文。\n我喜欢读书。", "I like reading.")],
                                   [("请写一句关于春天的诗句。", "春眠不觉晓，处处闻啼鸟。")]]


def test_exact_dedup_within_and_across_sources(tmp_path, capsys):
    qa = {"query": "高血压患者每天吃多少盐合适？", "response": "一般建议每天不超过5克。"}
    first = write_jsonl(tmp_path / "a.jsonl", [qa, qa, {**qa, "response": "一般建议每天不超过5克食盐。"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"q": qa["query"], "a": qa["response"]}])
    # the same last turn after different history is a different conversation: both kept
    chat = [{"from": "human", "value": "我最近量血压有点偏高。"}, {"from": "gpt", "value": "请先规律监测血压。"},
            {"from": "human", "value": qa["query"]}, {"from": "gpt", "value": qa["response"]}]
    third = write_jsonl(tmp_path / "c.jsonl", [{"conversations": chat}, {"conversations": chat[2:]}])
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=chatmed={first}", f"--corpus=jsonl:q,a={second}",
                             f"--corpus=sharegpt={third}")
    assert code == 0
    assert summary_line(out, "chatmed")[:5] == [3, 2, 0, 0, 1]
    assert summary_line(out, "jsonl:q,a")[:5] == [1, 0, 0, 0, 1]
    assert summary_line(out, "sharegpt")[:5] == [2, 1, 0, 0, 1]
    assert list(rows["source"]) == ["chatmed", "chatmed", "sharegpt"]
    assert rows["history"][2] == json.dumps([[chat[0]["value"], chat[1]["value"]]], ensure_ascii=False)


def test_length_filter_defaults_and_bounds():
    f = LengthFilter()
    ok_prompt, ok_answer = "问" * 10, "答" * 5
    assert f.verdict([(ok_prompt, ok_answer)]) is None
    assert f.verdict([("问" * 9, ok_answer)]) == "too_short"
    assert f.verdict([(ok_prompt, "答" * 4)]) == "too_short"
    assert f.verdict([("问" * 256, "答" * 256)]) is None
    assert f.verdict([("问" * 257, ok_answer)]) == "too_long"
    assert f.verdict([(ok_prompt, "答" * 257)]) == "too_long"
    # multi-turn: a short follow-up question is fine; every answer and every text's length count
    assert f.verdict([(ok_prompt, ok_answer), ("谢谢", ok_answer)]) is None
    assert f.verdict([(ok_prompt, "好"), (ok_prompt, ok_answer)]) == "too_short"
    assert f.verdict([(ok_prompt, "答" * 300), (ok_prompt, ok_answer)]) == "too_long"
    assert LengthFilter(max_chars=0).verdict([(ok_prompt, "答" * 10_000)]) is None
    assert LengthFilter(min_prompt_chars=0, min_answer_chars=0).verdict([("", "")]) is None


def test_filter_flags_on_the_command_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"q": "问" * 9, "a": "答" * 20}, {"q": "问" * 20, "a": "答" * 4},
        {"q": "问" * 20, "a": "答" * 300}, {"q": "问" * 20, "a": "答" * 20},
    ])
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=jsonl:q,a={path}")
    assert code == 0 and summary_line(out, "jsonl:q,a")[:4] == [4, 1, 2, 1]
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=jsonl:q,a={path}", "--max-chars=300",
                             "--min_prompt_chars=9", "--min_answer_chars", "4")
    assert code == 0 and summary_line(out, "jsonl:q,a")[:4] == [4, 4, 0, 0]
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=jsonl:q,a={path}", "--max_chars=0")
    assert summary_line(out, "jsonl:q,a")[:4] == [4, 2, 2, 0]
    assert "答" * 300 in set(rows["answer"])


def test_help_says_what_max_chars_bounds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max_chars" in text and "any prompt or answer longer" in text and "0 = no limit" in text


# ---------------------------------------------------------------- bad records, strict, errors

def bad_file(tmp_path):
    lines = [
        json.dumps({"query": "第一条正常的问题是什么呢？", "response": "这是正常的回答。"}, ensure_ascii=False),
        "",
        '{"query": "坏的 JSON", "response": ',
        json.dumps({"query": "第二条正常的问题是什么呢？"}, ensure_ascii=False),
        json.dumps({"query": "回答不是字符串的问题是什么？", "response": 42}, ensure_ascii=False),
        json.dumps(["不是对象"], ensure_ascii=False),
        '{"query": "孤立的代理项 \\ud83d 会怎样？", "response": "应当被跳过。"}',
        json.dumps({"query": "第三条正常的问题是什么呢？", "response": "这也是正常的回答。"}, ensure_ascii=False),
    ]
    path = tmp_path / "chatmed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_records_skipped_and_reported(tmp_path, capsys):
    path = bad_file(tmp_path)
    code, rows, out, err = run(tmp_path, capsys, f"--corpus=chatmed={path}")
    assert code == 0
    assert list(rows["prompt"]) == ["第一条正常的问题是什么呢？", "第三条正常的问题是什么呢？"]
    assert summary_line(out, "chatmed") == [7, 2, 0, 0, 0, 5, 0]   # line 2 is blank: not a record
    for line, reason in [(3, "malformed JSON ("), (4, "missing field 'response'"),
                         (5, "field 'response' is not a string (got number)"),
                         (6, "not a JSON object (got array)"), (7, "invalid Unicode (field 'query'")]:
        assert f"{path}:{line}: {reason}" in err
    assert "chatmed: malformed, missing field 'response': 1" in out


def test_bad_json_array_is_one_counted_error(tmp_path, capsys):
    path = tmp_path / "alpaca.json"
    path.write_text('[{"instruction": "第一条指令是什么内容呢？", "input": "", "output": "完好的回答。"},\n'
                    '{"instruction": "断了', encoding="utf-8")
    code, rows, out, err = run(tmp_path, capsys, f"--corpus=alpaca_zh={path}")
    assert code == 0 and len(rows) == 1
    assert summary_line(out, "alpaca_zh")[5] == 1 and f"{path}:item 2: malformed JSON array" in err


def test_strict_fails_on_first_bad_record_and_keeps_old_output(tmp_path, capsys):
    path = bad_file(tmp_path)
    out = tmp_path / "out.csv"
    out.write_text("old\n", encoding="utf-8")
    code = main([f"--corpus=chatmed={path}", "--strict", f"--out={out}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code != 0 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}:3: malformed JSON (")
    assert out.read_text(encoding="utf-8") == "old\n" and not os.path.exists(f"{out}.tmp")


@pytest.mark.parametrize("spec, message", [
    ("nosuch={sample}", "error: unknown SFT corpus 'nosuch'; known: alpaca_zh, belle"),
    ("jsonl:onlyone={sample}", "error: unknown SFT corpus 'jsonl:onlyone'"),
    ("belle={tmp}/missing/*.jsonl", "error: {tmp}/missing/*.jsonl: no file matches this pattern"),
    ("belle={tmp}/missing.jsonl", "error: {tmp}/missing.jsonl: no such file or folder"),
    ("belle", "error: --corpus 'belle': expected NAME=PATH_OR_GLOB"),
])
def test_bad_corpus_specs_are_one_line(tmp_path, capsys, spec, message):
    sample = os.path.join(REPO, "sft_data", "sample", "chatmed_sample.jsonl")
    code, _, _, err = run(tmp_path, capsys, "--corpus=" + spec.format(sample=sample, tmp=tmp_path))
    assert code != 0
    assert err.strip().splitlines() == [err.strip()] and err.startswith(message.format(tmp=tmp_path))


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    sample = os.path.join(REPO, "sft_data", "sample", "chatmed_sample.jsonl")
    for out in (blocker / "out.csv", tmp_path):
        code = main([f"--corpus=chatmed={sample}", f"--out={out}"])
        err = capsys.readouterr().err
        assert code != 0 and len(err.strip().splitlines()) == 1
        assert err.startswith(f"error: cannot write {out}: ")
    assert err.strip() == f"error: cannot write {tmp_path}: it is a folder"


def test_compressed_input_and_corrupt_file(tmp_path, capsys):
    record = {"query": "压缩文件里的问题能读出来吗？", "response": "可以，按扩展名自动解压。"}
    packed = tmp_path / "chatmed.jsonl.gz"
    packed.write_bytes(gzip.compress((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")))
    code, rows, _, _ = run(tmp_path, capsys, f"--corpus=chatmed={packed}")
    assert code == 0 and conversations(rows) == [[(record["query"], record["response"])]]
    for suffix, kind in ((".gz", "BadGzipFile"), (".zst", "ZstdError")):
        corrupt = tmp_path / f"broken.jsonl{suffix}"
        corrupt.write_bytes(b"this is not compressed data")
        code, _, _, err = run(tmp_path, capsys, f"--corpus=chatmed={corrupt}")
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert code != 0 and "Traceback" not in err and len(errors) == 1
        assert errors[0].startswith(f"error: {corrupt}: cannot read it ({kind}")


# ---------------------------------------------------------------- the bundled sample, end to end

def test_bare_default_run_writes_the_sample_csv(tmp_path):
    script = os.path.join(REPO, "sft_data_process.py")
    proc = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = read_back(tmp_path / "sft_data" / "sft_data.csv")
    assert set(rows["source"]) == {"alpaca_zh", "sharegpt", "chatmed"}
    assert len(rows) == summary_line(proc.stdout, "total")[1] and len(rows) >= 90
    assert (rows["history"] != "[]").sum() >= 10                   # the multi-turn sample survives
    assert all(LengthFilter().verdict(conv) is None for conv in conversations(rows))
    assert not os.path.exists(tmp_path / "sft_data" / "sft_data.csv.tmp")


def test_bundled_sample_is_small():
    folder = os.path.join(REPO, "sft_data", "sample")
    assert sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)) < 100_000


def test_nothing_kept_exits_non_zero_and_says_so(tmp_path, capsys):
    """Every record too short: the CSV holds only its header and the run exits 1 (a run that kept nothing must
    not look like a success to the next stage)."""
    path = tmp_path / "short.jsonl"
    path.write_text('{"query": "问", "response": "答"}\n{"query": "也短", "response": "嗯"}\n', encoding="utf-8")
    out = tmp_path / "out.csv"
    code = main([f"--corpus=chatmed={path}", f"--out={out}"])
    err = capsys.readouterr().err
    assert code == 1 and "error: no rows kept" in err and "holds only its header" in err
    assert out.read_text(encoding="utf-8").splitlines() == ['"prompt","answer","history","source"']
