"""eval.py (benchmarks, scoring, intervals, decontamination, answering), eval_pretrain.py (perplexity, bits
per byte) and inference.py (loading the three checkpoint kinds, tokenizer checks).

    python -m pytest -q tests/test_eval.py
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from conftest import REPO

import data_process
import eval as ev
import eval_pretrain as ep
from chatglm_tokenizer import TokenizerError, tokenizer_identity
from inference import load_for_inference, run_main, sft_prompt_ids, sft_turn
from model import ModelArgs, Transformer, model_args_from_preset

BENCH = os.path.join(REPO, "tests", "fixtures", "bench")
SAMPLE = os.path.join(REPO, "data", "bench_sample")


def save_tiny_checkpoint(path: str, tokenizer_dir: str, seed: int = 0, **overrides) -> Transformer:
    """A random tiny-preset model saved as this repo's checkpoint dict (what trainer.py writes)."""
    torch.manual_seed(seed)
    model = Transformer(model_args_from_preset("tiny", **overrides))
    torch.save({"model": model.state_dict(), "model_args": asdict(model.args), "config": {}, "step": 0,
                "tokenizer": tokenizer_identity(tokenizer_dir)}, path)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_tiny_checkpoint(path, tokenizer_dir)
    return path


def small_vocab_model(seed: int = 0, max_seq_len: int = 8) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=max_seq_len)).eval()


# ---------------------------------------------------------------- benchmark readers, exact layouts

def test_ceval_folder_reads_val_split_and_dev_shots():
    bench = ev.load_benchmark(f"ceval:{BENCH}/ceval")
    assert [q.subject for q in bench.questions] == ["clinical_medicine"] * 3 + ["physician"]
    first = bench.questions[0]
    assert first.options == {"A": "心律失常", "B": "心力衰竭", "C": "心源性休克", "D": "心脏破裂"}
    assert first.answer == "A" and first.where.endswith("clinical_medicine_val.csv:2")
    assert "\n" in bench.questions[1].question                     # a quoted multi-line field
    assert bench.questions[2].where.endswith(":5") and bench.questions[2].answer == "B"   # its line, not row
    assert [q.answer for q in bench.dev["clinical_medicine"]] == ["C", "B"]
    assert ev.shots_for(bench, "clinical_medicine", 2) == bench.dev["clinical_medicine"]
    assert ev.shots_for(bench, "physician", 1) == bench.dev["clinical_medicine"][:1]  # no own dev: pooled
    dev = ev.load_benchmark(f"ceval:{BENCH}/ceval", split="dev")       # scoring the dev split itself
    assert ev.shots_for(dev, "clinical_medicine", 1, dev.questions[0]) == [dev.questions[1]]


def test_ceval_single_file_finds_dev_beside_it_and_test_split_has_no_answers():
    bench = ev.load_benchmark(f"ceval:{SAMPLE}/clinical_medicine_val.csv")
    assert len(bench.questions) == 20 and len(bench.dev["clinical_medicine"]) == 5
    assert {q.answer for q in bench.questions} == {"A", "B", "C", "D"}
    with pytest.raises(ev.BenchError, match="no scorable items.*no answer"):
        ev.load_benchmark(f"ceval:{BENCH}/ceval", split="test")


def test_cmmlu_reads_unnamed_index_column_and_subjects_from_file_names():
    bench = ev.load_benchmark(f"cmmlu:{BENCH}/cmmlu")
    assert [(q.subject, q.answer) for q in bench.questions] == [("anatomy", "B"), ("anatomy", "D"), ("virology", "B")]
    assert bench.questions[0].options["B"] == "股骨"
    assert [q.question for q in bench.dev["anatomy"]] == ["成人脊柱由多少块椎骨组成（骶骨、尾骨各计一块）？"]
    only = ev.load_benchmark(f"cmmlu:{BENCH}/cmmlu/test/anatomy.csv")   # a file in test/: dev/ beside it
    assert len(only.questions) == 2 and "anatomy" in only.dev
    medical = ev.load_benchmark(f"cmmlu:{BENCH}/cmmlu", subjects=["virology"])
    assert [q.subject for q in medical.questions] == ["virology"]


def test_cmb_keeps_single_answer_items_and_drops_empty_options():
    bench = ev.load_benchmark(f"cmb:{BENCH}/cmb")
    assert [q.answer for q in bench.questions] == ["D", "A"]
    assert bench.skipped == {"several answers": 1}
    assert [q.subject for q in bench.questions] == ["临床执业医师", "护士执业资格"]
    assert list(bench.questions[0].options) == list("ABCDE")
    assert list(bench.questions[1].options) == list("ABCD")           # "E": "" is not an option
    assert bench.questions[1].where.endswith("CMB-val-merge.json:item 3")


def test_cmexam_parses_option_lines_and_drops_multi_answer():
    bench = ev.load_benchmark(f"cmexam:{BENCH}/cmexam/test.csv")
    assert [q.answer for q in bench.questions] == ["B", "D"]
    assert bench.questions[0].options["B"] == "深大呼吸，呼气有烂苹果味"
    assert len(bench.questions[1].options) == 5
    assert bench.questions[1].where.endswith("test.csv:12")           # rows span several lines
    assert bench.skipped == {"several answers": 1}


def test_medqa_reads_jsonl_counts_malformed_line_and_takes_dev_shots():
    bench = ev.load_benchmark(f"medqa:{BENCH}/medqa")
    assert [q.answer for q in bench.questions] == ["A", "C"]
    assert bench.questions[1].options["C"] == "(100～300)×10^9/L"
    assert bench.skipped == {"unreadable record (malformed JSON)": 1}
    assert [q.answer for q in ev.shots_for(bench, "medqa", 1)] == ["C"]
    with pytest.raises(ev.BenchError, match="--shots=5.*has 1 items"):
        ev.shots_for(bench, "medqa", 5)


def test_bad_benchmark_input_is_one_line_naming_file_line_and_field(tmp_path):
    bad = tmp_path / "x_val.csv"
    bad.write_text("id,question,A,B,C,answer\n0,题目,甲,乙,丙,A\n", encoding="utf-8")
    with pytest.raises(ev.BenchError, match=r"x_val\.csv:2: missing field D"):
        ev.load_benchmark(f"ceval:{bad}")
    no_answers = tmp_path / "x_test.csv"   # C-Eval's test split: no answer column
    no_answers.write_text("id,question,A,B,C,D\n0,题目,甲,乙,丙,丁\n", encoding="utf-8")
    with pytest.raises(ev.BenchError, match=r"no scorable items.*'no answer \(a test split\?\)': 1"):
        ev.load_benchmark(f"ceval:{no_answers}")
    with pytest.raises(ev.BenchError, match="FORMAT one of"):
        ev.load_benchmark(f"mmlu:{bad}")
    with pytest.raises(ev.BenchError, match="neither a file or folder"):
        ev.load_benchmark("ceval:no/such/file.csv")


def test_hub_name_offline_fails_with_one_clear_line(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(ev.socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with pytest.raises(ev.BenchError, match="cannot reach huggingface.co.*ceval/ceval-exam.*--bench=FORMAT:path"):
        ev.load_benchmark("ceval:ceval/ceval-exam")


def test_hub_name_with_hf_offline_goes_through_datasets_and_fails_in_one_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "eval.py", "--bench=ceval:mcg-tests/no-such-dataset", "--ckpt=unused"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: datasets.load_dataset('mcg-tests/no-such-dataset'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- prompts and continuations

def test_letter_continuation_is_tokenized_with_its_context(tokenizer):
    q = ev.load_benchmark(f"ceval:{SAMPLE}").questions[0]
    requests = ev.build_requests(tokenizer, q, [], "plain", "letter")
    assert len(requests) == 4 and all(r.n_bytes == 1 for r in requests)
    eos = tokenizer.special_tokens["<eos>"]
    for letter, request in zip("ABCD", requests):
        assert request.context[0] == eos                             # a document starts after <eos>
        whole = tokenizer.encode(ev.header(q.subject, "letter") + ev.question_block(q, "letter") + letter)
        assert request.context[1:] + request.continuation == whole
        assert tokenizer.decode_ids(request.continuation) == letter
    # "A" after "答案：" is its own piece, not the word-initial "▁A" a separate encode would give
    assert requests[0].continuation != tokenizer.encode("A")


def test_sft_layout_uses_shots_as_earlier_turns(tokenizer):
    bench = ev.load_benchmark(f"ceval:{SAMPLE}")
    q, shots = bench.questions[0], ev.shots_for(bench, "clinical_medicine", 2)
    requests = ev.build_requests(tokenizer, q, shots, "sft", "text")
    history = [sft_turn(tokenizer, ev.header(q.subject, "text") + ev.question_block(shots[0], "text"),
                        shots[0].options[shots[0].answer]),
               sft_turn(tokenizer, ev.question_block(shots[1], "text"), shots[1].options[shots[1].answer])]
    expected, _ = sft_prompt_ids(tokenizer, ev.question_block(q, "text"), history, 10_000)
    assert all(r.context == expected for r in requests)
    assert [r.continuation for r in requests] == [tokenizer.encode(t) for t in q.options.values()]
    assert [r.n_bytes for r in requests] == [len(t.encode("utf-8")) for t in q.options.values()]


# ---------------------------------------------------------------- scoring math

@torch.no_grad()
def hand_logprob(model: Transformer, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(token | the tokens before it in the window), one unbatched forward per continuation
    token; the window is the last max_seq_len + 1 ids (the context loses its beginning, as in lm-eval)."""
    window = (context + continuation)[-(model.args.max_seq_len + 1):]
    total = 0.0
    for pos in range(len(window) - len(continuation), len(window)):
        logits, _ = model(torch.tensor([window[:pos]]))
        total += float(F.log_softmax(logits[0, -1].double(), -1)[window[pos]])
    return total


def test_loglikelihood_scoring_equals_hand_computation():
    model = small_vocab_model(max_seq_len=8)
    requests = [ev.Request([5, 6, 7], [8, 9], 2), ev.Request([3], [4], 1),
                ev.Request([10, 11, 12, 13, 14, 15, 16], [17, 18, 19], 3),   # 10 ids: context cut
                ev.Request([20, 21], [22, 23, 24, 25], 4),
                ev.Request([5, 6, 7], [30], 1), ev.Request([5, 6, 7], [31], 1)]   # one shared forward
    scores, truncated = ev.continuation_logprobs(model, requests, batch_size=3)
    for request, score in zip(requests, scores):
        assert score == pytest.approx(hand_logprob(model, request.context, request.continuation), abs=1e-4)
    assert truncated == 1
    alone, _ = ev.continuation_logprobs(model, requests[1:2], batch_size=1)  # padding in a batch changes nothing
    assert alone[0] == pytest.approx(scores[1], abs=1e-5)


def test_acc_norm_divides_by_utf8_bytes_and_chance_averages_per_item():
    assert ev.pick([-4.0, -6.0, -9.0], [1, 6, 12]) == (0, 2)       # per byte: -4, -1, -0.75
    results = [ev.ItemResult("f:1", "s", "A", "A", "C", 4, [], []),
               ev.ItemResult("f:2", "s", "C", "A", "C", 5, [], []),
               ev.ItemResult("f:3", "t", "B", "B", "B", 4, [], [])]
    scores = ev.summarize(results)
    assert [s.subject for s in scores] == ["s", "t", "overall"]
    assert (scores[0].acc, scores[0].acc_norm, scores[0].chance) == (0.5, 0.5, pytest.approx((1 / 4 + 1 / 5) / 2))
    overall = scores[-1]
    assert (overall.n, overall.acc, overall.acc_norm) == (3, pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert overall.chance == pytest.approx((1 / 4 + 1 / 5 + 1 / 4) / 3)


def test_wilson_interval_matches_published_values():
    lo, hi = ev.wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert ev.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert ev.wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), pytest.approx(1.0))
    lo, hi = ev.wilson_interval(6, 20)
    assert lo < 0.3 < hi and hi - lo == pytest.approx(0.3735, abs=1e-3)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)


def test_bench_end_to_end_on_bundled_sample(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert ev.main([f"--ckpt={tiny_ckpt}", f"--bench=ceval:{SAMPLE}", "--shots=5", "--choice=text",
                    "--limit=6", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "5-shot, text choices" in printed and "overall" in printed and "0.250" in printed   # chance 1/4
    report = json.loads(out.read_text(encoding="utf-8"))
    items = report["items"]
    assert len(items) == 6 and report["shots"] == 5
    overall = report["scores"][-1]
    assert overall["acc"] == pytest.approx(sum(i["pred"] == i["answer"] for i in items) / 6)
    assert overall["acc_norm"] == pytest.approx(sum(i["pred_norm"] == i["answer"] for i in items) / 6)
    for item in items:
        per_byte = [lp / b for lp, b in zip(item["logprobs"], item["n_bytes"])]
        assert item["pred"] == "ABCD"[int(np.argmax(item["logprobs"]))]
        assert item["pred_norm"] == "ABCD"[int(np.argmax(per_byte))] and all(lp < 0 for lp in item["logprobs"])
    assert ev.main([f"--ckpt={tiny_ckpt}", f"--bench=ceval:{SAMPLE}", "--limit=6", f"--out={out}"]) == 0
    letters = json.loads(out.read_text(encoding="utf-8"))              # default: letters, 0-shot
    assert all(i["n_bytes"] == [1, 1, 1, 1] and i["pred"] == i["pred_norm"] for i in letters["items"])


# ---------------------------------------------------------------- decontamination

def test_decontam_finds_planted_overlap_and_no_false_one(tmp_path, tokenizer):
    questions = ev.load_benchmark(f"ceval:{SAMPLE}").questions
    long_q = questions[6].question                    # 按我国高血压防治指南，成人诊室血压达到哪一水平可诊断为高血压？
    short_q = questions[4].question                   # 人体内最大的消化腺是 (10 characters)
    planted = f"前文无关。{long_q[:3]} {long_q[3:].replace('，', ',')}答案是140/90。"  # spacing, half-width comma
    near_miss = long_q[:12] + "之类的问题很常见"        # shares only 12 characters
    lines = [{"text": "今天天气很好，适合散步。"}, {"text": near_miss}, {"text": planted},
             {"text": "胰腺是人体内重要的消化腺之一"}]  # not the short question whole
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines) + "{broken\n",
                     encoding="utf-8")
    skiplog = ev.SkipLog()
    report, too_short, scanned = ev.find_contamination(questions, ev.iter_training_texts(str(train), None, skiplog))
    assert (scanned, too_short, skiplog.total(str(train))) == (4, 0, 1)
    assert [c.where for c in report] == [questions[6].where]
    assert report[0].overlap == 1.0 and report[0].first_seen == f"{train}:3"
    sft_csv = tmp_path / "sft.csv"                    # sft_data.csv layout; the short question in the history
    history = json.dumps([[f"请问{short_q}哪个器官？", "肝脏"]], ensure_ascii=False)
    sft_csv.write_text(f'prompt,answer,history,source\n头痛,多休息,"{history.replace(chr(34), chr(34) * 2)}",x\n',
                       encoding="utf-8")
    report, _, _ = ev.find_contamination(questions, ev.iter_training_texts(str(sft_csv), None))
    assert [(c.where, c.example) for c in report] == [(questions[4].where, ev.normalize_text(short_q))]


def test_decontam_reads_token_bin_and_cli_reports(tmp_path, tokenizer_dir, tokenizer, capsys):
    questions = ev.load_benchmark(f"ceval:{SAMPLE}").questions
    docs = ["与题目无关的一段文字。", "复习：" + questions[13].question + "？答案见课本。"]
    ids = [i for d in docs for i in tokenizer.encode(d) + [2]]
    data = tmp_path / "train.bin"
    np.array(ids, dtype=np.uint16).tofile(data)
    out = tmp_path / "contam.json"
    assert ev.main(["--decontam", f"--bench=ceval:{SAMPLE}", f"--against={data}", f"--tokenizer={tokenizer_dir}",
                    f"--out={out}"]) == 0
    printed = capsys.readouterr()
    assert "total: 1 of 20 contaminated" in printed.out and f"note: {data} has no tokenizer manifest" in printed.err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["scanned"] == 2 and [i["where"] for i in report["items"]] == [questions[13].where]
    assert report["items"][0]["first_seen"] == f"{data}:token {len(tokenizer.encode(docs[0])) + 1}"


@pytest.fixture(scope="module")
def other_tokenizer_bin(tmp_path_factory) -> tuple[str, str]:
    """(tokenizer folder, .bin) of a small SentencePiece tokenizer, not ChatGLM2's, and data_process.py's
    output with it (+ manifest): two documents, the second quoting ceval sample question 13 verbatim."""
    folder = tmp_path_factory.mktemp("other_tokenizer")
    questions = ev.load_benchmark(f"ceval:{SAMPLE}").questions
    spm.SentencePieceTrainer.train(sentence_iterator=iter([q.question for q in questions]),
                                   model_prefix=str(folder / "tokenizer"), vocab_size=600, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    corpus = folder / "corpus.jsonl"
    docs = ["与题目无关的一段文字，用来凑够长度。", "复习：" + questions[13].question + "？答案见课本。"]
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                      encoding="utf-8")
    data = folder / "train.bin"
    assert data_process.main([f"--corpus=medical={corpus}", f"--out={data}", "--val-fraction=0", "--workers=1",
                              f"--tokenizer={folder}"]) == 0
    return str(folder), str(data)


def test_decontam_decodes_bin_with_the_tokenizer_its_manifest_records(other_tokenizer_bin, capsys):
    folder, data = other_tokenizer_bin
    assert json.loads(open(data[:-4] + ".json", encoding="utf-8").read())["tokenizer"]["path"] == folder
    assert ev.main(["--decontam", f"--bench=ceval:{SAMPLE}", f"--against={data}"]) == 0   # no --tokenizer
    printed = capsys.readouterr()
    assert "total: 1 of 20 contaminated" in printed.out and "note:" not in printed.err


def test_decontam_refuses_a_tokenizer_other_than_the_bins(other_tokenizer_bin, tokenizer_dir, capsys):
    folder, data = other_tokenizer_bin
    argv = ["--decontam", f"--bench=ceval:{SAMPLE}", f"--against={data}", f"--tokenizer={tokenizer_dir}"]
    assert run_main(ev.main, argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: tokenizer mismatch: data {data} was made with {folder}")
    assert f"tokenizer folder {tokenizer_dir} uses {tokenizer_dir}" in err


# ---------------------------------------------------------------- perplexity and bits per byte

def test_window_plan_scores_every_token_exactly_once():
    for n, seq_len, stride in [(1, 8, 8), (30, 8, 8), (30, 8, 3), (17, 8, 1), (8, 8, 5)]:
        scored = []
        for begin, end, first_new in ep.window_plan(n, seq_len, stride):
            assert end - begin <= seq_len
            new = list(range(max(first_new, begin + 1), end + 1))
            assert all(t - begin >= min(t, seq_len - stride) for t in new)   # context promised by the stride
            scored += new
        assert scored == list(range(1, n + 1))
    with pytest.raises(ep.InferenceError, match="--stride"):
        ep.window_plan(10, 8, 9)


@pytest.mark.parametrize("stride", [8, 3])
@torch.no_grad()
def test_total_loss_equals_hand_computation(stride):
    model = small_vocab_model(seed=1, max_seq_len=8)
    tokens = np.random.default_rng(0).integers(3, 50, size=30).astype(np.uint16)
    tokens[[9, 20, 29]] = 2                                     # documents end in <eos>
    nats, scored = ep.total_loss(model, tokens, eos_id=2, stride=stride, batch_size=2)
    stream = [2] + tokens.tolist()
    hand = 0.0
    for begin, end, first_new in ep.window_plan(len(tokens), 8, stride):
        for t in range(max(first_new, begin + 1), end + 1):
            logits, _ = model(torch.tensor([stream[begin:t]]))
            hand -= float(F.log_softmax(logits[0, -1].double(), -1)[stream[t]])
    assert scored == 30 and nats == pytest.approx(hand, rel=1e-5)


def test_perplexity_is_exp_mean_token_loss_and_bits_per_byte(tokenizer):
    docs = ["发热是指体温升高超出正常范围。", "感冒多由病毒引起", "𠀀 rare"]
    tokens = np.array([i for d in docs[:2] for i in tokenizer.encode(d) + [2]] + tokenizer.encode(docs[2]),
                      dtype=np.uint16)                           # the last document lacks its <eos>
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("tiny", max_seq_len=64)).eval()
    report = ep.perplexity_report(model, tokenizer, tokens, "mem", None, 4, "cpu", None)
    stream = torch.tensor([[2] + tokens.tolist()])
    with torch.no_grad():
        logits, _ = model(stream[:, :-1])                        # the whole file fits one window
    mean_loss = float(F.cross_entropy(logits[0], stream[0, 1:]))
    assert report.tokens == len(tokens)
    assert report.loss == pytest.approx(mean_loss, rel=1e-5)
    assert report.perplexity == pytest.approx(math.exp(mean_loss), rel=1e-5)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)         # <eos> adds no bytes
    assert report.utf8_bytes == n_bytes == ep.utf8_bytes(tokens, tokenizer, 2)
    assert report.bits_per_byte == pytest.approx(mean_loss * len(tokens) / math.log(2) / n_bytes, rel=1e-5)
    assert report.chance_loss == pytest.approx(math.log(64794))
    counts = np.bincount(tokens)
    p = counts[counts > 0] / len(tokens)
    assert report.unigram_loss == pytest.approx(float(-(p * np.log(p)).sum()))


def test_text_and_jsonl_data_are_laid_out_like_data_process(tmp_path, tokenizer, capsys, monkeypatch):
    txt = tmp_path / "held.txt"
    txt.write_text("第一段。\n\n第二段文字\n", encoding="utf-8")
    expected = tokenizer.encode("第一段。") + [2] + tokenizer.encode("第二段文字") + [2]
    assert ep.load_eval_tokens(str(txt), tokenizer, None).tolist() == expected
    jsonl = tmp_path / "held.jsonl"
    jsonl.write_text('{"text": "第一段。"}\n{"other": 1}\n{"text": "第二段文字"}\n', encoding="utf-8")
    assert ep.load_eval_tokens(str(jsonl), tokenizer, 3).tolist() == expected[:3]
    assert "skipped 1 unreadable line(s)" in capsys.readouterr().err
    monkeypatch.setattr(ep, "ENCODE_CHUNK_DOCS", 1)            # with --max_tokens, reading stops early
    assert ep.load_eval_tokens(str(jsonl), tokenizer, 3).tolist() == expected[:3]
    assert "skipped" not in capsys.readouterr().err               # the bad 2nd line was never reached
    with pytest.raises(ep.InferenceError, match="holds token id .* but the model has 50 ids"):
        ep.load_eval_tokens(str(txt), tokenizer, None, vocab_size=50)


def test_json_data_is_read_as_the_records_it_holds(tmp_path, tokenizer):
    # shibing624/medical's pretrain files are JSON Lines named .json; wiki is one JSON array in a .json:
    # both are records, never raw text lines (that would score the JSON syntax as if it were text)
    expected = tokenizer.encode("第一段。") + [2] + tokenizer.encode("第二段文字") + [2]
    lines = tmp_path / "valid_encyclopedia.json"
    lines.write_text('{"text": "第一段。"}\n{"text": "第二段文字"}\n', encoding="utf-8")
    assert ep.load_eval_tokens(str(lines), tokenizer, None).tolist() == expected
    array = tmp_path / "wiki.json"
    array.write_text('[{"completion": "第一段。"},\n {"completion": "第二段文字"}]', encoding="utf-8")
    assert ep.load_eval_tokens(str(array), tokenizer, None, text_field="completion").tolist() == expected
    import lzma
    packed = tmp_path / "held.jsonl.xz"
    packed.write_bytes(lzma.compress('{"text": "第一段。"}\n{"text": "第二段文字"}\n'.encode("utf-8")))
    assert ep.load_eval_tokens(str(packed), tokenizer, None).tolist() == expected


def test_decontam_reads_json_lines_named_json(tmp_path):
    # shibing624/medical's finetune files (the medical SFT data) are JSON Lines named train_zh_0.json
    questions = ev.load_benchmark(f"ceval:{SAMPLE}").questions
    train = tmp_path / "train_zh_0.json"
    rows = [{"instruction": "无关的问题", "output": "无关"},
            {"instruction": questions[6].question, "output": "A"}]
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    skiplog = ev.SkipLog()
    report, _, scanned = ev.find_contamination(questions, ev.iter_training_texts(str(train), None, skiplog))
    assert (scanned, skiplog.total(str(train))) == (2, 0)
    assert [c.where for c in report] == [questions[6].where]


def test_bin_with_another_tokenizers_manifest_is_refused(tmp_path, tokenizer):
    data = tmp_path / "val.bin"
    np.array([5, 6, 2], dtype=np.uint16).tofile(data)
    (tmp_path / "val.json").write_text(json.dumps({"tokenizer": {"path": "other", "sha256": "f" * 64,
                                                                  "vocab_size": 32000}}))
    with pytest.raises(TokenizerError, match="tokenizer mismatch: data .*val.bin"):
        ep.load_eval_tokens(str(data), tokenizer, None)


def test_eval_pretrain_cli_samples_and_report(tiny_ckpt, tmp_path, capsys):
    held = tmp_path / "held.txt"
    held.write_text("高血压是常见的慢性病。\n糖尿病需要长期管理。\n", encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert ep.main([f"--ckpt={tiny_ckpt}", "--prompt=床前明月光，", "--max_new_tokens=4", f"--data={held}",
                    f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "--- 床前明月光，" in printed and "chance  loss 11.0790" in printed and "guide:" in printed
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["tokens"] > 0 and report["perplexity"] == pytest.approx(math.exp(report["loss"]))


# ---------------------------------------------------------------- loading the three checkpoint kinds

def test_loads_checkpoint_seed_state_dict_and_hf_export_to_same_logits(tiny_ckpt, tmp_path, tokenizer_dir):
    from export_hf import export_hf
    reference, tok, meta = load_for_inference(tiny_ckpt)
    assert meta["kind"] == "checkpoint"
    seed = tmp_path / "seed.pth"                                 # torch.compile'd seed weights
    torch.save({f"_orig_mod.{k}": v for k, v in reference.state_dict().items()}, seed)
    export_hf(tiny_ckpt, str(tmp_path / "hf"))
    x = torch.tensor([tok.encode("头痛怎么办")])
    expected, _ = reference(x)
    for path, kind in [(str(seed), "state_dict"), (str(tmp_path / "hf"), "hf")]:
        model, _, meta = load_for_inference(path, n_heads=4)
        assert meta["kind"] == kind
        torch.testing.assert_close(model(x)[0], expected, rtol=1e-4, atol=1e-4)


def test_answer_mode_streams_and_writes_answers(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert ev.main([f"--ckpt={tiny_ckpt}", "--prompt=头痛怎么办？", "--prompt=你好", "--max_new_tokens=5",
                    "--temperature=0", f"--out={out}"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["头痛怎么办？", "你好"]
    printed = capsys.readouterr().out
    assert printed.count("问：") == 2 and records[0]["answer"] in printed


def test_checkpoint_with_another_tokenizer_is_refused(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "ckpt.pt"
    save_tiny_checkpoint(str(path), tokenizer_dir)
    ckpt = torch.load(path, weights_only=True)
    ckpt["tokenizer"] = {"path": "tokenizers/mine", "sha256": "0" * 64, "vocab_size": 64794}
    torch.save(ckpt, path)
    with pytest.raises(TokenizerError, match=r"tokenizer mismatch: checkpoint .*ckpt.pt.* but tokenizer folder"):
        load_for_inference(str(path))
    assert run_main(ev.main, [f"--ckpt={path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer mismatch") and err.count("\n") == 1
