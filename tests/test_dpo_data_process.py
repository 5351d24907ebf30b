"""dpo_data_process.py: every reader on its bundled sample (multi-turn history, system messages, the exact
HH-RLHF prefix split), the CSV round trip, dedup, identical pairs, malformed records, --strict, empty output."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from dpo_data_process import COLUMNS, SAMPLE_DIR, main, split_hh
from corpus_io import BadRecord

SYSTEM = "你是一名耐心、专业的医生助手。"


def run(tmp_path, capsys, *args):
    out = tmp_path / "dpo.csv"
    code = main([*args, f"--out={out}"])
    captured = capsys.readouterr()
    rows = pd.read_csv(out, keep_default_na=False, dtype=str) if out.exists() else None
    return code, rows, captured.out, captured.err


def counts(stdout, source):
    """read kept identical duplicate malformed of `source` from the summary table."""
    line = next(l for l in stdout.splitlines() if l.split()[:1] == [source])
    return [int(n.replace(",", "")) for n in line.split()[1:]]


def records(rows, source):
    part = rows[rows["source"] == source]
    return [(json.loads(h), p, c, r) for p, c, r, h in zip(part["prompt"], part["chosen"], part["rejected"],
                                                           part["history"])]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
    return str(path)


def test_bundled_sample_every_reader(tmp_path, capsys):
    code, rows, out, err = run(tmp_path, capsys)
    assert code == 0 and list(rows.columns) == list(COLUMNS)
    assert counts(out, "medicalgpt_reward") == [7, 5, 1, 0, 1]
    assert counts(out, "dpo_en_zh") == [4, 4, 0, 0, 0]
    assert counts(out, "hh_rlhf") == [5, 4, 0, 0, 1]
    assert counts(out, "ultrafeedback") == [4, 3, 0, 1, 0]
    assert "dpo_medicalgpt_reward_sample.jsonl:7: missing field 'rejected'" in err
    assert "dpo_hh_rlhf_sample.jsonl:5: chosen and rejected do not share" in err
    assert len(rows) == 16 and (rows["chosen"] != rows["rejected"]).all()

    med = records(rows, "medicalgpt_reward")
    assert med[1] == ([[f"{SYSTEM}\n我最近体检查出血压偏高。", "血压偏高需要先复测确认，并从生活方式入手调整。"]],
                      "高血压患者饮食上要注意什么？",
                      "少盐是关键，每天食盐不超过5克；多吃蔬菜水果和全谷物，限制饮酒，控制体重，并按医嘱规律服药、定期测量血压。",
                      "高血压要注意饮食，饮食要注意，注意饮食很重要，高血压的饮食要注意注意再注意。")
    en_zh = records(rows, "dpo_en_zh")
    assert en_zh[0][:2] == ([[f"{SYSTEM}\n我最近胃口不太好。", "胃口差可能和饮食不规律、情绪压力有关，可以先调整作息。"]],
                            "胃痛的时候能吃什么？")
    assert en_zh[1][:2] == ([], "怎样预防颈椎病？")   # empty system: nothing added
    hh = records(rows, "hh_rlhf")
    assert hh[0] == ([["我这周开始跑步了。", "很好，循序渐进最重要。"]], "运动后肌肉酸痛怎么缓解？",
                     "运动后做拉伸，第二天可以热敷、轻柔按摩，做低强度活动帮助恢复，并保证睡眠和蛋白质摄入。一般三到五天会自行缓解。",
                     "酸痛说明练得不够，应该继续加大强度练，练到不痛为止。")
    uf = records(rows, "ultrafeedback")
    assert uf[0][:2] == ([], f"{SYSTEM}\n晚上睡觉打呼噜要紧吗？")


def test_hh_prefix_split_is_exact():
    context = "\n\nHuman: 第一问\n\nAssistant: 第一答\n\n第二段\n\nHuman: 第二问\n\nAssistant:"
    prefix, chosen, rejected = split_hh(context + " 好答案\n\n含空行", context + " 坏答案")
    assert prefix == context and chosen == " 好答案\n\n含空行" and rejected == " 坏答案"
    with pytest.raises(BadRecord, match="do not share"):
        split_hh(context + " 答", context.replace("第一答", "另一答") + " 答")
    with pytest.raises(BadRecord, match="ends with a Human turn"):
        split_hh(context + " 答\n\nHuman: 还有", context + " 答")


def test_hh_reader_multi_turn_and_bad_dialogues(tmp_path, capsys):
    ctx = "\n\nHuman: 第一问\n\nAssistant: 第一答\n\n第二段\n\nHuman: 第二问\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": ctx + " 好答案", "rejected": ctx + " 坏答案"},
        {"chosen": ctx.lstrip() + " 好", "rejected": ctx.lstrip() + " 坏"},    # no leading blank lines
        {"chosen": "\n\nHuman: 问\n\nAssistant: 答", "rejected": "\n\nHuman: 问\n\nAssistant: 答"},   # identical
        {"chosen": "\n\nAssistant: 答", "rejected": "\n\nAssistant: 坏"},                        # no Human first
        {"chosen": "\n\nHuman: 问\n\nHuman: 又问\n\nAssistant: 答",
         "rejected": "\n\nHuman: 问\n\nHuman: 又问\n\nAssistant: 坏"},
    ])
    code, rows, out, err = run(tmp_path, capsys, f"--corpus=hh_rlhf={path}")
    assert code == 0 and counts(out, "hh_rlhf") == [5, 2, 1, 0, 2]
    expected_history = [["第一问", "第一答\n\n第二段"]]
    assert records(rows, "hh_rlhf") == [(expected_history, "第二问", "好答案", "坏答案"),
                                         (expected_history, "第二问", "好", "坏")]
    assert "hh.jsonl:4: the dialogue does not start with" in err and "hh.jsonl:5: the turns do not alternate" in err


def test_ultrafeedback_and_medicalgpt_bad_layouts(tmp_path, capsys):
    user = {"role": "user", "content": "问"}
    uf = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "问", "chosen": [user, {"role": "assistant", "content": "好"}],
         "rejected": [{"role": "user", "content": "别的问题"}, {"role": "assistant", "content": "坏"}]},
        {"prompt": "问", "chosen": [user], "rejected": [user]},
        {"prompt": "问", "chosen": [user, {"role": "assistant", "content": "好"}],
         "rejected": [user, {"role": "assistant", "content": "坏"}]},
    ])
    med = write_jsonl(tmp_path / "med.jsonl", [
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}],
         "chosen": "好", "rejected": "坏"},
        {"conversations": [{"from": "gpt", "value": "答"}], "chosen": "好", "rejected": "坏"},
        {"conversations": [{"from": "human", "value": "问"}], "chosen": "", "rejected": "坏"},
    ])
    en_zh = write_jsonl(tmp_path / "en_zh.jsonl", [[1, 2], "text",
                                                  {"question": "另一个问题", "response_chosen": "好", "response_rejected": "坏"}])
    code, rows, out, err = run(tmp_path, capsys, f"--corpus=ultrafeedback={uf}", f"--corpus=medicalgpt_reward={med}",
                               f"--corpus=dpo_en_zh={en_zh}")
    assert counts(out, "dpo_en_zh") == [3, 1, 0, 0, 2] and "Traceback" not in err
    assert "en_zh.jsonl:1: expected a JSON object (got array)" in err
    assert code == 0 and counts(out, "ultrafeedback") == [3, 1, 0, 0, 2]
    assert counts(out, "medicalgpt_reward") == [3, 0, 0, 0, 3]
    assert "uf.jsonl:1: chosen and rejected do not share the messages" in err
    assert "uf.jsonl:2: the messages do not end with an assistant answer (field 'chosen')" in err
    assert "med.jsonl:1: the dialogue does not end with a question" in err
    assert "med.jsonl:2: bad turn role (field 'conversations[0].from' is 'gpt'" in err
    assert "med.jsonl:3: empty answer (field 'chosen')" in err


def test_generic_reader_csv_round_trip_and_dedup(tmp_path, capsys):
    tricky = ['引号"和,逗号', "换行\n第二行\r\n", "NA", "null", "😀 emoji", " ", "\\n 反斜杠"]
    items = [{"q": f"问题{i}{t}", "good": f"好{t}", "bad": f"坏{t}"} for i, t in enumerate(tricky)]
    path = write_jsonl(tmp_path / "pairs.jsonl", items + items[:2])
    code, rows, out, _ = run(tmp_path, capsys, f"--corpus=jsonl:q,good,bad={path}")
    assert code == 0 and counts(out, "jsonl:q,good,bad") == [9, 7, 0, 2, 0]
    assert records(rows, "jsonl:q,good,bad") == [([], it["q"].strip(), it["good"].strip(), it["bad"].strip())
                                                  for it in items]


def test_strict_unknown_and_nothing_kept(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "问", "good": "一样", "bad": "一样"}, {"q": 3}])
    code, rows, _, err = run(tmp_path, capsys, f"--corpus=jsonl:q,good,bad={bad}", "--strict")
    assert code == 1 and rows is None and "bad.jsonl:2: field 'q' is not a string (got number)" in err
    assert not (tmp_path / "dpo.csv.tmp").exists()
    code, rows, _, err = run(tmp_path, capsys, f"--corpus=jsonl:q,good,bad={bad}")
    assert code == 1 and len(rows) == 0 and "no pairs kept" in err
    code, _, _, err = run(tmp_path, capsys, f"--corpus=nosuch={bad}")
    assert code == 1 and "unknown preference corpus 'nosuch'" in err
    assert main(["--list-corpora"]) == 0 and "hh_rlhf" in capsys.readouterr().out
    assert SAMPLE_DIR.endswith("sample")
