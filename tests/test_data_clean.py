"""data_clean.py: MinHash against exact Jaccard, planted near-duplicates on real text, each quality rule,
identical decisions for any --workers / after kill -9 / sharded, and data_process.py --clean."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_clean  # noqa: E402  (real documents and planted near-duplicates, shared with the benchmark)
import cleaning  # noqa: E402
import data_clean  # noqa: E402
import minhash  # noqa: E402
import quality  # noqa: E402


@pytest.fixture(scope="module")
def planted(realdata, tmp_path_factory):
    """Two JSON Lines files: ~250 distinct real documents, and planted near-duplicates of 40 of them."""
    docs = bench_clean.distinct(bench_clean.real_documents(realdata)[:300])
    rng = random.Random(1)
    chosen = rng.sample(range(len(docs)), 40)
    copies = []
    for i in chosen:
        docs[i], copy = bench_clean.plant(docs[i], rng)
        copies.append(copy)
    folder = tmp_path_factory.mktemp("planted")
    bench_clean.write_jsonl(str(folder / "docs.jsonl"), docs)
    bench_clean.write_jsonl(str(folder / "copies.jsonl"), copies)
    return {"folder": folder, "docs": docs, "copies": copies, "chosen": chosen,
            "specs": [f"--corpus=jsonl:text={folder / 'docs.jsonl'}", f"--corpus=jsonl:text={folder / 'copies.jsonl'}"]}


def clean(specs: list[str], out, *extra: str) -> None:
    assert data_clean.main([*specs, f"--out={out}", *extra]) == 0


def decisions_of(out) -> list[np.ndarray]:
    with open(os.path.join(out, "decisions.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return [np.load(os.path.join(out, s["removed_file"])) for s in meta["sources"]]


def assert_same_decisions(a, b) -> None:
    for x, y in zip(decisions_of(a), decisions_of(b), strict=True):
        assert len(x) == len(y) and x.tobytes() == y.tobytes()


def test_minhash_estimate_close_to_exact_jaccard(realdata):
    rng = random.Random(0)
    docs = [d for d in bench_clean.real_documents(realdata) if len(d) > 300][:60]
    pairs = [(d, bench_clean.edit_chars(d, rng.uniform(0.0, 0.4), rng)) for d in docs]
    texts = [t for pair in pairs for t in pair]
    doc, h = minhash.shingle_hashes(texts, 3)
    sig = minhash.signatures(doc, h, len(texts), 512)
    errors, exact = [], []
    for i, (a, b) in enumerate(pairs):
        sa, sb = bench_clean.shingle_set(a), bench_clean.shingle_set(b)
        exact.append(len(sa & sb) / len(sa | sb))
        errors.append(minhash.estimate_jaccard(sig[2 * i], sig[2 * i + 1]) - exact[-1])
    assert max(exact) - min(exact) > 0.4           # the pairs span a wide range of similarity
    assert abs(np.mean(errors)) < 0.02 and np.max(np.abs(errors)) < 0.1


def test_exact_check_and_clusters():
    assert minhash.jaccard(np.array([1, 2, 3, 3], np.uint32), np.array([2, 3, 4], np.uint32)) == 0.5
    pairs = np.array([[5, 9], [9, 12], [20, 30], [3, 12]], dtype=np.uint64)
    nodes, roots = minhash.components(pairs)
    assert dict(zip(nodes.tolist(), roots.tolist())) == {3: 3, 5: 3, 9: 3, 12: 3, 20: 20, 30: 20}
    bands, rows = minhash.lsh_params(0.4)
    assert minhash.candidate_probability(0.4, bands, rows) >= 0.98 and bands <= 64


def test_planted_near_duplicates_found_distinct_kept(planted, tmp_path):
    clean(planted["specs"], tmp_path, "--quality=none", "--workers=1")
    docs_removed, copies_removed = decisions_of(tmp_path)
    assert len(copies_removed) == len(planted["copies"])                  # every planted copy is found ...
    kept_of = cleaning.split_keys(copies_removed["kept"])
    assert set(kept_of[0].tolist()) == {0}                                # ... as a copy of the first source
    assert sorted(kept_of[2].tolist()) == sorted(i + 1 for i in planted["chosen"])   # ... of its own original
    assert len(docs_removed) == 0                                         # and no distinct document goes
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["cluster_sizes"] == {"2": 40}
    assert any(e["reason"] == "near_duplicate" and e["kept_text"] for e in report["examples"])


QUALITY_CASES = {
    "boilerplate": ("版权所有 © 2023 某网站\n点击查看更多\n首页 > 新闻\n扫一扫关注我们\n" + "正文内容。" * 3,
                    "医生建议患者多喝水、注意休息，如有发热应及时就医；出现皮疹、呼吸困难或意识改变时需要立即去急诊，不要自行服用退烧药。"
                    "\n点击查看更多"),
    "too_short": ("太短了。", "这是一段足够长的中文文本，用来检验最短长度规则不会误删正常的段落内容；它的长度明显超过了五十个字符的下限，应当被保留下来。"),
    "not_chinese": ("This paragraph is written in English only and contains no Chinese characters at all, "
                    "so the share of Chinese characters is zero.",
                    "传染病是指由病原微生物感染人体后产生的有传染性的疾病（infectious disease），需要及时隔离。"),
    "repeated_lines": ("\n".join(["欢迎光临本店，全场商品八折优惠"] * 5 + ["今天天气很好，适合出门散步和锻炼身体。"]),
                       "第一行讲述了疾病的病因和发病机制。\n第二行介绍临床表现、实验室检查和诊断方法。\n第三行说明治疗原则和预防措施。"),
    "repeated_5grams": ("买一送一买一送二买一送三买一送四买一送五买一送六买一送七买一送八买一送九买一送十" * 2,
                        "发热是传染病最常见的症状，热型对诊断有一定帮助，常见的有稽留热、弛张热、间歇热和回归热等类型，应结合病史判断。"),
    "repeated_10grams": ("快来购买我们的优质产品吧朋友" * 8 + "以下是店铺地址、营业时间、联系方式与售后政策说明，请顾客在下单之前仔细阅读并确认。",
                         "麻疹是由麻疹病毒引起的急性呼吸道传染病，主要表现为发热、咳嗽、流涕、眼结膜炎、口腔麻疹黏膜斑和皮肤斑丘疹。"),
    "symbols": ("★★★☆☆ 好评 ★★★★★ 推荐 ♥♥♥ 热卖 ◆◆◆ 特价 ■■■ 新品 ▲▲▲ 包邮 ●●● 正品 ★★★ 限时 ☆☆☆ 抢购 ♦♦♦",
                "病毒性肝炎是由多种肝炎病毒引起的，以肝脏损害为主的一组全身性传染病，临床上以乏力、食欲减退和肝功能异常为主。"),
    "digits": ("病例编号是1234567890，患者电话为13800138000，床位号码2345678901，住院日期20230101，费用合计987654元整",
               "2023年共报告病例120例，其中男性65例，女性55例，平均年龄为42岁，治愈率达到百分之九十以上。"),
    "urls": ("请访问我们的官方网站了解更多的详情和最新的消息 https://www.example.com/page/1 或者国内镜像站点 http://abc.example.org/x/y/z 下载",
             "详情请见官方网站发布的通知（www.nhc.gov.cn），其中说明了本次流行病学调查的方法、主要结果、存在的问题以及下一步的防控建议，"
             "各地卫生部门应当结合本地实际情况认真组织落实。"),
}


@pytest.mark.parametrize("rule", quality.RULE_NAMES)
def test_each_quality_rule(rule):
    bad, good = QUALITY_CASES[rule]
    cfg = quality.QualityConfig()
    assert quality.judge([bad, good], cfg)[1] == [rule, None]


@pytest.mark.parametrize("rule", quality.RULE_NAMES)
def test_one_rule_alone_decides_as_among_all_and_measures_only_what_it_reads(rule, monkeypatch):
    """With only some rules on, judge measures only what they read: the n-gram pass (the costly one) runs
    for the repeated-n-gram rules alone, and the decisions are those of the same rule among all."""
    cases = [text for pair in QUALITY_CASES.values() for text in pair]
    cfg = quality.QualityConfig()
    rules = [r for r in quality.RULES if r.name == rule]
    among_all = [name if name == rule else None for name in quality.judge(cases, cfg)[1]]
    if "grams" not in rule:
        monkeypatch.setattr(quality, "_dup_ngram_share", lambda *a: pytest.fail("n-grams measured for " + rule))
    alone = quality.judge(cases, cfg, rules)[1]
    # among all rules an earlier failing rule hides this one; alone it may show there as well
    assert all(a == b or (a is None and b == rule) for a, b in zip(among_all, alone)) and rule in alone


def test_edits_collapse_punctuation_and_drop_boilerplate_lines():
    cfg = quality.QualityConfig()
    assert quality.edit_text("太好了！！！真的吗？？？好吧。。。。等等……………", cfg) == "太好了！真的吗？好吧。等等……"
    assert quality.edit_text("正文第一段。\n点击查看更多\n正文第二段。", cfg) == "正文第一段。\n正文第二段。"
    off = quality.QualityConfig(strip_boilerplate=False, collapse_punctuation=False)
    assert quality.edit_text("好！！\n点击查看更多", off) == "好！！\n点击查看更多"


def test_same_decisions_for_any_workers_after_kill_and_sharded(planted, tmp_path):
    one = tmp_path / "one"
    clean(planted["specs"], one, "--workers=1")
    clean(planted["specs"], tmp_path / "two", "--workers=2")
    assert_same_decisions(one, tmp_path / "two")
    assert any(len(d) for d in decisions_of(one))
    killed = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(REPO, "data_clean.py"), *planted["specs"], f"--out={killed}", "--workers=2",
           "--batch_docs=64"]
    # committed after 2 batches (mid-file), a third written but not committed, then killed
    env = {**os.environ, cleaning.COMMIT_EVERY_ENV: "2", cleaning.KILL_AFTER_ENV: "3"}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == -signal.SIGKILL
    assert not (killed / "decisions.json").exists()
    state = json.loads((killed / "shards" / "shard-0-of-1" / "state.json").read_text())
    assert state["cursor"][:2] == [0, 0] and state["cursor"][2][0] == 128 and not state["done"]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    assert_same_decisions(one, killed)
    sharded = tmp_path / "sharded"
    for i in range(2):
        clean(planted["specs"], sharded, f"--shard={i}/2", "--workers=1")
    assert not (sharded / "decisions.json").exists()
    clean(planted["specs"], sharded, "--merge", "--shards=2", "--workers=1")
    assert_same_decisions(one, sharded)


def test_data_process_clean_skips_exactly_the_removed(planted, tmp_path, tokenizer_dir, capsys):
    import data_process
    import sentencepiece as spm
    low_quality = [QUALITY_CASES[rule][0] for rule in ("too_short", "not_chinese", "boilerplate")]
    bench_clean.write_jsonl(str(tmp_path / "docs.jsonl"), low_quality + planted["docs"])
    bench_clean.write_jsonl(str(tmp_path / "copies.jsonl"), planted["copies"])
    specs = [f"--corpus=jsonl:text={tmp_path / 'docs.jsonl'}", f"--corpus=jsonl:text={tmp_path / 'copies.jsonl'}"]
    out = tmp_path / "clean"
    clean(specs, out, "--workers=1", "--write_jsonl")
    kept = [json.loads(line)["text"] for line in (out / "kept.jsonl").read_text(encoding="utf-8").splitlines()]
    removed = sum(len(d) for d in decisions_of(out))
    assert removed == len(low_quality) + len(planted["copies"])
    assert len(kept) == len(low_quality) + len(planted["docs"]) + len(planted["copies"]) - removed
    bin_path = tmp_path / "x.bin"
    args = [*specs, f"--out={bin_path}",
            "--val-fraction=0", "--no-dedup", "--min-tokens=0", "--workers=1", f"--tokenizer={tokenizer_dir}",
            f"--clean={out}"]
    assert data_process.main(args) == 0
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    expected = [t for ids in sp.encode(kept) for t in ids + [2]]
    assert np.fromfile(bin_path, dtype="<u2").tolist() == expected      # exactly the kept documents, edited
    manifest = json.loads((tmp_path / "x.json").read_text(encoding="utf-8"))
    assert sum(manifest["clean"]["removed"].values()) == removed and manifest["documents"] == len(kept)
    capsys.readouterr()
    with open(tmp_path / "copies.jsonl", "a", encoding="utf-8") as f:   # the input changes ...
        f.write(json.dumps({"text": "新加的一条记录，决定文件里没有它。"}, ensure_ascii=False) + "\n")
    assert data_process.main(args) == 1                                         # ... so the decisions are refused
    err = capsys.readouterr().err
    assert "copies.jsonl: not the file the decisions" in err and "Traceback" not in err


def test_nothing_readable_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"other": 1}\n', encoding="utf-8")
    assert data_clean.main([f"--corpus=jsonl:text={bad}", f"--out={tmp_path / 'out'}", "--workers=1"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1: malformed JSON" in err and f"{bad}:2: missing field 'text'" in err
    assert "no readable document" in err


def test_damaged_decisions_and_out_of_range_thresholds_are_one_line(tmp_path, capsys):
    from corpus_io import CorpusError
    (tmp_path / "decisions.json").write_text(json.dumps({"version": cleaning.VERSION}), encoding="utf-8")
    with pytest.raises(CorpusError, match="incomplete or damaged .*KeyError.*run data_clean.py"):
        cleaning.CleanPlan.load(str(tmp_path), [])
    doc = tmp_path / "d.jsonl"
    doc.write_text('{"text": "一篇文章"}\n', encoding="utf-8")
    for flag, message in (("--min_chinese=2", "--min_chinese=2.0: must be a fraction in [0, 1]"),
                          ("--min_chars=-5", "--min_chars=-5: must be at least 0")):
        assert data_clean.main([f"--corpus=jsonl:text={doc}", f"--out={tmp_path / 'out'}", flag]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
