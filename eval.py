"""Evaluate a fine-tuned model: answer prompts, score medical multiple-choice benchmarks, check contamination.

    python eval.py --ckpt=out/sft/ckpt.pt                                   # built-in questions, SFT layout
    python eval.py --ckpt=out/sft/ckpt.pt --prompts=questions.txt --temperature=0 --out=answers.jsonl
    python eval.py --ckpt=out/hf --prompt=头痛怎么办？                        # ckpt.pt, seed .pth or HF folder
    python eval.py --ckpt=out/sft/ckpt.pt --bench=ceval:data/bench_sample --shots=5   # the bundled sample
    python eval.py --ckpt=out/sft/ckpt.pt --bench=ceval:path/to/ceval-exam --subjects=medical
    python eval.py --ckpt=out/sft/ckpt.pt --bench=cmmlu:path/to/cmmlu --shots=5 --out=cmmlu.json
    python eval.py --ckpt=out/sft/ckpt.pt --bench=cmb:path/to/CMB-val-merge.json --layout=sft
    python eval.py --ckpt=out/sft/ckpt.pt --bench=ceval:ceval/ceval-exam --subjects=medical   # hub (online)
    python eval.py --decontam --bench=ceval:data/bench_sample --against=sft_data/sft_data.csv
    python eval.py --bench=ceval:path/to/ceval-exam --shots=5 --export_lmeval=out/lmeval_ceval   # lm-eval tasks

Benchmark scoring follows lm-evaluation-harness: each option is a continuation of one context and gets the
summed log-probability of its tokens, tokenized together with the context (never the logit of a lone
letter token: SentencePiece spells "A" after "：" and "▁A" at a word start differently). Two prompt templates:
- --template=lm-eval (the default for letter choices in the plain layout): lm-evaluation-harness's own
  ceval-valid_* and cmmlu_* tasks, item for item (description, first k dev items, " " before the letter,
  no document-start token, left truncation to max_seq_len); cmb, cmexam and medqa get the analogous
  template (lmeval_tasks.py says which). Scores from it stand beside published lm-eval scores, and
  --export_lmeval=DIR writes the benchmark as an lm-eval task folder that gives the same numbers there.
- --template=native: this project's own (the C-Eval paper's header "以下是中国关于{科目}考试的…", no space
  before the letter), with the choices and layouts below; the default with --choice=text or --layout=sft,
  which lm-eval's tasks do not have.
- --choice=letter (default, the C-Eval/CMMLU convention): the context lists the options and ends in
  "答案："; the continuations are the letters. acc_norm then equals acc (all one byte).
- --choice=text (cloze): the context is the question and "答案："; the continuations are the option texts.
- acc picks the highest summed log-probability; acc_norm divides it by the continuation's UTF-8 bytes.
- 95% intervals are Wilson score intervals; "overall" pools all items (micro average). chance is the
  mean over items of 1/options.
- --layout=plain (native) puts an `<eos>` (document start) before the prompt, for pretrained models;
  --layout=sft uses `prompt <bos> answer`, with k-shot examples as earlier turns, for SFT models.

Formats (a file, a folder, or a Hugging Face dataset name via datasets.load_dataset):
  ceval   CSV id,question,A,B,C,D,answer        files <subject>_<split>.csv        default split val
  cmmlu   CSV ,Question,A,B,C,D,Answer          files <split>/<subject>.csv       default split test
  cmb     JSON list: question, option{A..E}, answer, exam_type, exam_subject, question_type  (split val)
  cmexam  CSV Question, Options ("A 内容" lines), Answer                                     (split test)
  medqa   JSON Lines question, options{A..E}, answer_idx                                     (split test)
In a folder, a file belongs to a split when the split's name is a word of its path (val/x_val.csv,
CMB-val/CMB-val-merge.json, test/anatomy.csv, test.jsonl); k-shot examples come from the "dev" files
(same subject when it has enough, else the first ones): a folder's own, or for a file those its layout puts
beside it (`*_dev.*` in its folder, a `dev/` folder beside its split folder; no other folder is searched), or
--dev=PATH; --shots=0 reads none. A hub name's --subjects are its
config names (default: the medical subjects for ceval and cmmlu, none for the others), its dev split
"dev"; offline, it fails at once with one line (HF_HUB_OFFLINE=1 reads datasets' cache instead). Items
without an answer, with several answers, or whose answer is not an option are skipped, counted, reported.

Decontamination: an item is contaminated when a 13-character n-gram of its question (after NFKC, lower
case, and dropping whitespace and punctuation, so characters, not tokens, which suits Chinese) occurs in
the training text; questions shorter than 13 such characters cannot be checked and are counted. The
training text is streamed, so memory holds only the benchmark's n-grams.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import math
import os
import re
import socket
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm import tqdm

from chatglm_tokenizer import DEFAULT_TOKENIZER, ChatGLMTokenizer, load_tokenizer, resolve_tokenizer_dir
from corpus_io import SkipLog, file_layout, iter_records, write_atomic_text
from inference import (InferenceError, add_model_args, add_prompt_args, add_sampling_args, autocast_for,
                       describe_model, load_for_inference, pick_device, prompt_budget, read_prompts, run_main,
                       sampling_kwargs, sft_prompt_ids, sft_turn, special_ids, stream_text)
from lmeval_tasks import lmeval_context, lmeval_continuation, write_task_folder
from model import Transformer
from tokenfile import bin_tokenizer, manifest_path, read_bin

FORMATS = ("ceval", "cmmlu", "cmb", "cmexam", "medqa")
FILE_SUFFIX = {"ceval": ".csv", "cmmlu": ".csv", "cmb": ".json", "cmexam": ".csv", "medqa": ".jsonl"}
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "cmb": "val", "cmexam": "test", "medqa": "test"}
MEDICAL_SUBJECTS = {
    "ceval": ["clinical_medicine", "basic_medicine", "physician"],
    "cmmlu": ["anatomy", "clinical_knowledge", "college_medicine", "college_medical_statistics", "genetics",
              "nutrition", "professional_medicine", "traditional_chinese_medicine", "virology"],
}
SUBJECT_NAMES = {  # names used in the prompt header, as the C-Eval and CMMLU papers write them
    "clinical_medicine": "临床医学", "basic_medicine": "基础医学", "physician": "医师资格",
    "anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medicine": "大学医学",
    "college_medical_statistics": "大学医学统计", "genetics": "遗传学", "nutrition": "营养学",
    "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学",
}
BUILTIN_QUESTIONS = [
    "头痛应该怎么办？",
    "高血压患者的饮食需要注意什么？",
    "请介绍一下糖尿病的常见症状。",
    "什么是流行性感冒？如何预防？",
    "你好，请介绍一下你自己。",
    "中国的首都是哪里？",
]
Z_95 = 1.959963984540054     # standard normal quantile for a two-sided 95% interval
NGRAM = 13
TEMPLATES = ("lm-eval", "native")
HUB_TIMEOUT_S = 5.0
BIN_BLOCK_TOKENS = 1 << 22   # tokens of a .bin scanned for <eos> at a time


class BenchError(ValueError):
    """Unreadable benchmark input; one line naming the file (and line and field) or the hub dataset."""


class SkipItem(Exception):
    """An item that cannot be scored as single-answer multiple choice; the message is the reason."""


@dataclass
class Question:
    subject: str
    question: str
    options: dict[str, str]   # letter -> option text, in letter order
    answer: str               # one letter of options
    where: str                # "file:line", "file:item N" or "hub name/config row N"


@dataclass
class Benchmark:
    name: str
    split: str
    questions: list[Question]
    dev: dict[str, list[Question]] = field(default_factory=dict)   # subject -> k-shot examples
    skipped: Counter = field(default_factory=Counter)              # reason -> items skipped

    @property
    def fmt(self) -> str:
        return self.name.partition(":")[0]


# ---------------------------------------------------------------- one row -> one Question

def _field(row: dict, name: str, where: str) -> str:
    if name not in row or row[name] is None:
        raise BenchError(f"{where}: missing field {name}")
    return str(row[name]).strip()


def _answer(row: dict, name: str) -> str:
    """The answer field; absent is the same as empty (C-Eval's test split publishes no answer column)."""
    return str(row.get(name) or "")


def _question(subject: str, text: str, options: dict[str, str], answer: str, where: str) -> Question:
    """Check the answer is one letter among the options (SkipItem with the reason otherwise)."""
    answer = answer.strip().upper()
    if not answer:
        raise SkipItem("no answer (a test split?)")
    if len(answer) > 1:
        raise SkipItem("several answers")
    if answer not in options:
        raise SkipItem("answer not among the options")
    if len(options) < 2:
        raise SkipItem("fewer than two options")
    return Question(subject, text, options, answer, where)


def parse_ceval_row(row: dict, where: str, subject: str) -> Question:
    options = {letter: _field(row, letter, where) for letter in "ABCD"}
    return _question(subject, _field(row, "question", where), options, _answer(row, "answer"), where)


def parse_cmmlu_row(row: dict, where: str, subject: str) -> Question:
    options = {letter: _field(row, letter, where) for letter in "ABCD"}
    return _question(subject, _field(row, "Question", where), options, _answer(row, "Answer"), where)


def parse_cmb_row(row: dict, where: str, subject: str) -> Question:
    option = row.get("option")
    if not isinstance(option, dict):
        raise BenchError(f"{where}: field option: expected an object of lettered options")
    if "多" in str(row.get("question_type", "")):   # 多项选择题: several answers by design
        raise SkipItem("several answers")
    options = {str(k).strip().upper(): str(v).strip() for k, v in sorted(option.items()) if str(v or "").strip()}
    subject = str(row.get("exam_subject") or row.get("exam_type") or subject).strip()
    return _question(subject, _field(row, "question", where), options, _answer(row, "answer"), where)


CMEXAM_OPTION = re.compile(r"^\s*([A-Z])(?:\s+|\s*[.．、:：]\s*)(.*)$")   # "A 内容" (or "A. 内容")


def parse_cmexam_row(row: dict, where: str, subject: str) -> Question:
    options = {}
    for line in _field(row, "Options", where).splitlines():
        match = CMEXAM_OPTION.match(line)
        if line.strip() and not match:
            raise SkipItem("an option line is not 'A 内容'")
        if match:
            options[match.group(1)] = match.group(2).strip()
    return _question(subject, _field(row, "Question", where), options, _answer(row, "Answer"), where)


def parse_medqa_row(row: dict, where: str, subject: str) -> Question:
    options = row.get("options")
    if not isinstance(options, dict):
        raise BenchError(f"{where}: field options: expected an object of lettered options")
    options = {str(k).strip().upper(): str(v).strip() for k, v in sorted(options.items())}
    return _question(subject, _field(row, "question", where), options, _answer(row, "answer_idx"), where)


PARSERS = {"ceval": parse_ceval_row, "cmmlu": parse_cmmlu_row, "cmb": parse_cmb_row,
           "cmexam": parse_cmexam_row, "medqa": parse_medqa_row}


def parse_rows(fmt: str, rows: Iterable[tuple[str, dict]], subject: str, skipped: Counter) -> list[Question]:
    """Questions from (where, row) pairs; unscorable items are counted in `skipped` by reason."""
    questions = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise BenchError(f"{where}: expected an object with the {fmt} fields")
        try:
            questions.append(PARSERS[fmt](row, where, subject))
        except SkipItem as reason:
            skipped[str(reason)] += 1
    return questions


# ---------------------------------------------------------------- files and folders

def iter_csv_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(path:line, row) of a CSV with a header; a row's line is where it starts (fields may hold newlines)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))   # SFT answers can exceed the 128 KB default
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        try:
            for row in reader:
                if None in row:
                    raise BenchError(f"{path}:{start}: more fields than the header has")
                yield f"{path}:{start}", row
                start = reader.line_num + 1
        except csv.Error as exc:
            raise BenchError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def iter_json_rows(path: str, layout: str, skipped: Counter) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSON list or JSON Lines file, streamed; malformed lines are printed and counted."""
    for record in iter_records(path, layout):
        if record.error is not None:
            print(f"{record.where}: skipped: {record.error}", file=sys.stderr)
            skipped[f"unreadable record ({record.error.split(' (')[0]})"] += 1
            continue
        yield record.where, record.value


def read_benchmark_file(path: str, fmt: str, subject: str, skipped: Counter) -> list[Question]:
    if fmt == "medqa":
        rows = iter_json_rows(path, "jsonl", skipped)
    elif fmt == "cmb":
        rows = iter_json_rows(path, "json_array", skipped)
    else:
        rows = iter_csv_rows(path)
    return parse_rows(fmt, rows, subject, skipped)


def _path_words(path: str) -> set[str]:
    return set(re.split(r"[\\/_\-.\s]+", path.lower()))


def _subject_of(path: str, fmt: str) -> str:
    """ceval: clinical_medicine_val.csv -> clinical_medicine; cmmlu: test/anatomy.csv -> anatomy; others:
    the format name (cmb reads exam_subject from each item)."""
    if fmt not in ("ceval", "cmmlu"):
        return fmt
    stem = os.path.basename(path)[:-len(FILE_SUFFIX[fmt])]
    return re.sub(r"_(val|test|dev|train)$", "", stem)


def split_files(root: str, fmt: str, split: str) -> list[str]:
    """Files of `split` under folder `root` (the split's name is a word of the path below root)."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(FILE_SUFFIX[fmt]) and split in _path_words(os.path.relpath(path, root)):
                found.append(path)
    return sorted(found)


def dev_files_beside(path: str, fmt: str, split: str) -> list[str]:
    """The dev files a benchmark file's own layout puts beside it, found without walking any folder:
    `*_dev.<ext>` in its folder (C-Eval's flat layout), and the files of a `dev` folder beside its folder when
    that is named after its split (ceval/val/x_val.csv -> ceval/dev/, cmmlu/test/anatomy.csv -> cmmlu/dev/)."""
    suffix = FILE_SUFFIX[fmt]
    folder = os.path.dirname(os.path.abspath(path))
    found = sorted(glob.glob(os.path.join(glob.escape(folder), f"*_dev{suffix}")))
    dev_folder = os.path.join(os.path.dirname(folder), "dev")
    if split in _path_words(os.path.basename(folder)) and os.path.isdir(dev_folder):
        found += sorted(os.path.join(dev_folder, n) for n in os.listdir(dev_folder) if n.endswith(suffix))
    return [f for f in found if os.path.isfile(f)]


def read_dev(bench: Benchmark, fmt: str, files: list[str], asked: bool) -> None:
    """k-shot examples from dev files. A file found by layout (not named with --dev) that does not parse is
    reported and skipped: a malformed file nobody asked for never stops a run."""
    dev_skipped: Counter = Counter()   # skipped dev items are not part of the score
    for file in files:
        try:
            questions = read_benchmark_file(file, fmt, _subject_of(file, fmt), dev_skipped)
        except BenchError as exc:
            if asked:
                raise
            print(f"warning: dev file {file} skipped ({exc}); pass --dev=PATH to choose the k-shot examples",
                  file=sys.stderr)
            continue
        for question in questions:
            bench.dev.setdefault(question.subject, []).append(question)


def read_local(fmt: str, path: str, split: str, dev_path: str | None, shots: int | None = None) -> Benchmark:
    """The questions of a file, or of a folder's files of `split`; dev examples unless shots == 0: from --dev,
    from the folder's dev files, or from where the file's layout puts them (dev_files_beside)."""
    bench = Benchmark(f"{fmt}:{path}", split, [])
    files = [path] if os.path.isfile(path) else split_files(path, fmt, split)
    if not files:
        raise BenchError(f"{path}: no {FILE_SUFFIX[fmt]} file of split '{split}' (a file belongs to a split "
                         f"when the split's name is a word of its path); choose one with --split")
    for file in files:
        bench.questions += read_benchmark_file(file, fmt, _subject_of(file, fmt), bench.skipped)
    if shots == 0:
        return bench
    if dev_path:
        dev_files = [dev_path] if os.path.isfile(dev_path) else split_files(dev_path, fmt, "dev")
    else:
        dev_files = split_files(path, fmt, "dev") if os.path.isdir(path) else dev_files_beside(path, fmt, split)
    read_dev(bench, fmt, dev_files, asked=bool(dev_path))
    return bench


# ---------------------------------------------------------------- the Hugging Face hub

def _check_hub_reachable(name: str) -> None:
    """Fail fast with one line when the hub cannot be reached (datasets itself retries for ~25 s).
    HF_HUB_OFFLINE=1 skips the check so that datasets reads its local cache."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return   # reachability through a proxy is for datasets to find out
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
    except OSError as exc:
        raise BenchError(f"cannot reach {host} to download {name!r} ({exc.strerror or exc}): offline? download "
                         f"the dataset elsewhere and pass its folder, e.g. "
                         f"--bench=FORMAT:path/to/{name.split('/')[-1]}, or set HF_HUB_OFFLINE=1 to use a cached copy"
                         ) from None


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    from datasets import load_dataset
    try:
        rows = load_dataset(name, config, split=split)
    except Exception as exc:   # datasets raises many kinds: connection, missing config, missing split, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BenchError(f"datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: {first}") from None
    label = f"{name}/{config}" if config else name
    for i, row in enumerate(rows):
        yield f"{label} {split} row {i + 1}", row


def read_hub(fmt: str, name: str, split: str, subjects: list[str] | None, shots: int) -> Benchmark:
    """A hub dataset with one config per subject (C-Eval, CMMLU) or none; rows have the local fields."""
    _check_hub_reachable(name)
    bench = Benchmark(f"{fmt}:{name}", split, [])
    configs = subjects or MEDICAL_SUBJECTS.get(fmt) or [None]
    for config in configs:
        subject = config or fmt
        bench.questions += parse_rows(fmt, _hub_rows(name, config, split), subject, bench.skipped)
        if shots:
            for question in parse_rows(fmt, _hub_rows(name, config, "dev"), subject, Counter()):
                bench.dev.setdefault(question.subject, []).append(question)
    return bench


def load_benchmark(spec: str, split: str | None = None, subjects: list[str] | None = None,
                   dev_path: str | None = None, shots: int | None = None) -> Benchmark:
    """Read `FORMAT:PATH_OR_HUB_NAME`; subjects filters by subject (["medical"] = MEDICAL_SUBJECTS). shots: the
    k-shot examples the run takes; 0 reads no dev data, None (a caller that does not say) reads what exists."""
    fmt, _, where = spec.partition(":")
    if fmt not in FORMATS or not where:
        raise BenchError(f"--bench={spec}: expected FORMAT:PATH_OR_HUB_NAME with FORMAT one of {', '.join(FORMATS)}")
    split = split or DEFAULT_SPLIT[fmt]
    if subjects == ["medical"]:
        subjects = MEDICAL_SUBJECTS.get(fmt)
    if os.path.exists(where):
        bench = read_local(fmt, where, split, dev_path, shots)
    elif re.fullmatch(r"[\w.\-]+/[\w.\-]+", where) and not where.endswith(FILE_SUFFIX[fmt]):
        bench = read_hub(fmt, where, split, subjects, shots)
    else:
        raise BenchError(f"--bench={spec}: {where} is neither a file or folder here nor a hub name (owner/name)")
    if subjects:
        bench.questions = [q for q in bench.questions if q.subject in subjects]
    if not bench.questions:
        raise BenchError(f"--bench={spec}: no scorable items (split {split}, subjects {subjects or 'all'}, "
                         f"skipped {dict(bench.skipped)})")
    return bench


def shots_for(bench: Benchmark, subject: str, k: int, scored: Question | None = None) -> list[Question]:
    """The first k dev items of `subject`, or of the whole dev split when the subject has fewer; never the
    item being scored itself (--split=dev)."""
    if k == 0:
        return []
    same = [q for q in bench.dev.get(subject, []) if q.where != getattr(scored, "where", None)]
    pool = same if len(same) >= k else [q for items in bench.dev.values() for q in items
                                        if q.where != getattr(scored, "where", None)]
    if len(pool) < k:
        raise BenchError(f"--shots={k}: the dev split of {bench.name} has {len(pool)} items; pass --dev=PATH "
                         f"or fewer --shots")
    return pool[:k]


# ---------------------------------------------------------------- prompts and continuations

@dataclass
class Request:
    context: list[int]
    continuation: list[int]
    n_bytes: int              # UTF-8 bytes of the continuation text, for acc_norm


def question_block(q: Question, choice: str) -> str:
    lines = [q.question.strip()]
    if choice == "letter":
        lines += [f"{letter}. {text}" for letter, text in q.options.items()]
    return "\n".join(lines) + "\n答案："


def answer_text(q: Question, letter: str, choice: str) -> str:
    return letter if choice == "letter" else q.options[letter]


def header(subject: str, choice: str) -> str:
    name = SUBJECT_NAMES.get(subject, subject)
    if choice == "letter":
        return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
    return f"以下是关于{name}的问题和答案。\n\n"


def encode_pair(tokenizer: ChatGLMTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: encode context + continuation together, and take as continuation
    the tokens past the context's own encoding (trailing whitespace of the context moves to the continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    if len(whole) <= len(context_ids):   # the continuation merged into the context's last token
        return context_ids, tokenizer.encode(continuation)
    return whole[:len(context_ids)], whole[len(context_ids):]


def lmeval_requests(tokenizer: ChatGLMTokenizer, fmt: str, q: Question, shots: list[Question]) -> list[Request]:
    """lm-evaluation-harness's requests (--template=lm-eval): its context, " " + letter as continuation, no
    document-start token. acc_norm's length is the letter's (lm-eval divides by the choice's characters)."""
    context = lmeval_context(fmt, q, shots)
    return [Request(*encode_pair(tokenizer, context, lmeval_continuation(letter)), len(letter.encode("utf-8")))
            for letter in q.options]


def build_requests(tokenizer: ChatGLMTokenizer, q: Question, shots: list[Question], layout: str,
                   choice: str, template: str = "native", fmt: str = "ceval") -> list[Request]:
    """One request per option of q, in option order."""
    if template == "lm-eval":
        return lmeval_requests(tokenizer, fmt, q, shots)
    answers = [answer_text(q, letter, choice) for letter in q.options]
    if layout == "sft":
        history = [sft_turn(tokenizer, (header(q.subject, choice) if i == 0 else "") + question_block(s, choice),
                            answer_text(s, s.answer, choice)) for i, s in enumerate(shots)]
        prompt = ("" if shots else header(q.subject, choice)) + question_block(q, choice)
        context, _ = sft_prompt_ids(tokenizer, prompt, history, max_prompt_tokens=1 << 30)
        return [Request(context, tokenizer.encode(a), len(a.encode("utf-8"))) for a in answers]
    solved = "".join(question_block(s, choice) + answer_text(s, s.answer, choice) + "\n\n" for s in shots)
    text = header(q.subject, choice) + solved + question_block(q, choice)
    doc_start = [special_ids(tokenizer)[1]]
    requests = []
    for a in answers:
        context, continuation = encode_pair(tokenizer, text, a)
        requests.append(Request(doc_start + context, continuation, len(a.encode("utf-8"))))
    return requests


# ---------------------------------------------------------------- scoring

@torch.inference_mode()
def continuation_logprobs(model: Transformer, requests: list[Request], batch_size: int = 8, device: str = "cpu",
                          autocast: contextlib.AbstractContextManager | None = None) -> tuple[list[float], int]:
    """(summed log-probability of each request's continuation given its context, requests whose context was
    cut from the left to fit max_seq_len). Requests with the same input ids share one forward pass (the
    options of a letter-choice item: one context, one-token continuations); longest inputs go first."""
    max_len = model.args.max_seq_len
    by_input: dict[tuple[int, ...], list[int]] = {}
    truncated = 0
    for i, request in enumerate(requests):
        if len(request.continuation) > max_len:
            raise BenchError(f"a continuation of {len(request.continuation)} tokens exceeds max_seq_len={max_len}")
        ids = request.context + request.continuation
        truncated += len(ids) - 1 > max_len
        by_input.setdefault(tuple(ids[-(max_len + 1):-1]), []).append(i)
    inputs = sorted(by_input, key=len, reverse=True)
    scores = [0.0] * len(requests)
    for start in tqdm(range(0, len(inputs), batch_size), desc="scoring", unit=" batches", leave=False):
        batch = inputs[start:start + batch_size]
        x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)    # [B, T], right-padded
        for row, ids in enumerate(batch):
            x[row, :len(ids)] = torch.tensor(ids)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x.to(device))                            # [B, T, vocab]
        for row, ids in enumerate(batch):
            for i in by_input[ids]:
                continuation = requests[i].continuation
                n, end = len(continuation), len(ids)
                logprobs = logits[row, end - n:end].float().log_softmax(-1)   # [n, vocab]
                targets = torch.tensor(continuation, device=logprobs.device)
                scores[i] = float(logprobs.gather(-1, targets[:, None]).sum())
    return scores, truncated


def pick(logprobs: list[float], n_bytes: list[int]) -> tuple[int, int]:
    """(index for acc: highest summed log-probability, index for acc_norm: highest log-probability per byte)."""
    normed = [lp / max(b, 1) for lp, b in zip(logprobs, n_bytes)]
    return int(np.argmax(logprobs)), int(np.argmax(normed))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good at small n and near 0 or 1, unlike p ± z·se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class ItemResult:
    where: str
    subject: str
    answer: str
    pred: str
    pred_norm: str
    n_options: int
    logprobs: list[float]
    n_bytes: list[int]


@dataclass
class Score:
    subject: str
    n: int
    acc: float
    acc_ci: tuple[float, float]
    acc_norm: float
    acc_norm_ci: tuple[float, float]
    chance: float


def score_group(subject: str, results: list[ItemResult]) -> Score:
    n = len(results)
    right = sum(r.pred == r.answer for r in results)
    right_norm = sum(r.pred_norm == r.answer for r in results)
    return Score(subject, n, right / n, wilson_interval(right, n), right_norm / n, wilson_interval(right_norm, n),
                 sum(1 / r.n_options for r in results) / n)


def summarize(results: list[ItemResult]) -> list[Score]:
    """One Score per subject (sorted), then "overall" over all items."""
    subjects = sorted({r.subject for r in results})
    scores = [score_group(s, [r for r in results if r.subject == s]) for s in subjects]
    return scores + [score_group("overall", results)]


def run_benchmark(model: Transformer, tokenizer: ChatGLMTokenizer, bench: Benchmark, shots: int, layout: str,
                  choice: str, batch_size: int, device: str,
                  autocast: contextlib.AbstractContextManager | None = None,
                  template: str = "native") -> tuple[list[ItemResult], int]:
    """(per-item results, requests whose context had to be cut from the left to fit the model)."""
    requests, spans = [], []
    for q in bench.questions:
        item_requests = build_requests(tokenizer, q, shots_for(bench, q.subject, shots, q), layout, choice,
                                       template, bench.fmt)
        spans.append((len(requests), len(item_requests)))
        requests += item_requests
    scores, truncated = continuation_logprobs(model, requests, batch_size, device, autocast)
    results = []
    for q, (start, count) in zip(bench.questions, spans):
        logprobs, n_bytes = scores[start:start + count], [r.n_bytes for r in requests[start:start + count]]
        best, best_norm = pick(logprobs, n_bytes)
        letters = list(q.options)
        results.append(ItemResult(q.where, q.subject, q.answer, letters[best], letters[best_norm], len(letters),
                                  logprobs, n_bytes))
    return results, truncated


def format_scores(scores: list[Score]) -> str:
    width = max(12, *(len(s.subject) for s in scores)) + 2

    def cell(value: float, ci: tuple[float, float]) -> str:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = [f"{'subject':<{width}}{'n':>6}  {'acc   95% CI':<24}{'acc_norm 95% CI':<24}chance"]
    for s in scores:
        lines.append(f"{s.subject:<{width}}{s.n:>6}  {cell(s.acc, s.acc_ci):<24}"
                     f"{cell(s.acc_norm, s.acc_norm_ci):<24}{s.chance:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- decontamination

def normalize_text(text: str) -> str:
    """NFKC, lower case, whitespace/punctuation/symbols dropped: what 13-gram overlap compares."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).lower())


def char_ngrams(text: str, n: int = NGRAM) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def _strings(value) -> Iterator[str]:
    """Every string inside a JSON value (texts of any record layout: text, instruction/output, turns, ...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _iter_sft_csv(path: str) -> Iterator[tuple[str, str]]:
    for where, row in iter_csv_rows(path):
        texts = [row.get("prompt") or "", row.get("answer") or ""] if "prompt" in row else list(row.values())
        history = row.get("history") or ""
        try:
            texts += list(_strings(json.loads(history))) if history.startswith("[") else []
        except json.JSONDecodeError:
            texts.append(history)
        yield where, "\n".join(t for t in texts if t)


def bin_tokenizer_folder(bin_path: str, tokenizer_path: str | None) -> str:
    """The tokenizer folder to decode a .bin with: --tokenizer, else the one its manifest records, else
    chatglm_tokenizer. Without a manifest nothing says which tokenizer made the .bin, so a note says so;
    with one, read_bin refuses a --tokenizer that differs from it."""
    recorded = bin_tokenizer(bin_path)
    if recorded is None:
        chosen = tokenizer_path or DEFAULT_TOKENIZER
        print(f"note: {bin_path} has no tokenizer manifest ({manifest_path(bin_path)}); decoding it with "
              f"{chosen}, unchecked (pass --tokenizer if it was made with another)", file=sys.stderr)
        return resolve_tokenizer_dir(chosen)
    if tokenizer_path:
        return resolve_tokenizer_dir(tokenizer_path)
    folder = resolve_tokenizer_dir(str(recorded.get("path")))
    if not os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise InferenceError(f"{bin_path} was made with tokenizer {recorded.get('path')} (sha256 "
                             f"{str(recorded['sha256'])[:12]}…), which is not here: pass --tokenizer=ITS_FOLDER")
    return folder


def open_bin(path: str, tokenizer_path: str | None) -> tuple[np.ndarray, ChatGLMTokenizer]:
    """(tokens, tokenizer) of a token .bin, the tokenizer being the one it was made with."""
    folder = bin_tokenizer_folder(path, tokenizer_path)
    return read_bin(path, folder), load_tokenizer(folder)


def _iter_bin(path: str, tokens: np.ndarray, tokenizer: ChatGLMTokenizer) -> Iterator[tuple[str, str]]:
    """Documents of a token .bin (each ends at <eos>), decoded; read in blocks, so memory holds one block
    and one document."""
    eos = special_ids(tokenizer)[1]
    doc_start = 0
    for start in range(0, len(tokens), BIN_BLOCK_TOKENS):
        for end in np.flatnonzero(np.asarray(tokens[start:start + BIN_BLOCK_TOKENS]) == eos) + start:
            if end > doc_start:
                yield f"{path}:token {doc_start}", tokenizer.decode_ids(tokens[doc_start:end].tolist())
            doc_start = int(end) + 1
    if doc_start < len(tokens):
        yield f"{path}:token {doc_start}", tokenizer.decode_ids(tokens[doc_start:].tolist())


def _iter_record_texts(path: str, skiplog: SkipLog) -> Iterator[tuple[str, str]]:
    layout = file_layout(path)
    for record in iter_records(path, layout):
        if record.error is None:
            yield record.where, "\n".join(_strings(record.value))
        else:
            skiplog.skip(path, record.where, record.error)


def iter_training_texts(path: str, tokenizer_path: str | None,
                        skiplog: SkipLog | None = None) -> Iterator[tuple[str, str]]:
    """(where, text) of a training file: sft_data .csv, .jsonl, .json (array or JSON Lines), .txt, or a token .bin.
    Unreadable records are counted in skiplog (and the first few printed). A .bin's tokenizer is settled (and
    a mismatch refused) on this call, before any text is read."""
    if path.endswith(".csv"):
        return _iter_sft_csv(path)
    if path.endswith(".bin"):
        return _iter_bin(path, *open_bin(path, tokenizer_path))
    return _iter_record_texts(path, skiplog or SkipLog())


@dataclass
class Contamination:
    where: str
    subject: str
    overlap: float           # share of the question's n-grams found (1.0 for a short question found whole)
    first_seen: str          # training text location of the first match
    example: str             # one matching n-gram (normalized)


class OverlapIndex:
    """The benchmark side of decontamination. A question of at least n normalized characters matches when
    any of its character n-grams occurs in the training text; a shorter one (down to min_whole characters)
    matches only when it occurs whole (GPT-3's rule for short texts); shorter still cannot be checked."""

    def __init__(self, questions: list[Question], n: int = NGRAM, min_whole: int = 8):
        self.questions, self.n, self.min_whole = questions, n, min_whole
        self.grams: dict[str, list[int]] = {}      # n-gram -> questions holding it
        self.whole: dict[str, list[int]] = {}      # first min_whole chars of a short question -> its indices
        self.n_grams, self.too_short = [], 0
        for i, q in enumerate(questions):
            text = normalize_text(q.question)
            grams = char_ngrams(text, n) or ({text} if len(text) >= min_whole else set())
            self.too_short += not grams
            self.n_grams.append(len(grams))
            for gram in grams:
                index = self.grams if len(gram) == n else self.whole
                index.setdefault(gram if len(gram) == n else gram[:min_whole], []).append(i)
        self.found: dict[int, set[str]] = {}
        self.first_seen: dict[int, str] = {}

    def scan(self, where: str, text: str) -> None:
        s, n, m = normalize_text(text), self.n, self.min_whole
        for j in range(len(s) - m + 1):
            for i in self.grams.get(s[j:j + n], ()):
                self._hit(i, s[j:j + n], where)
            for i in self.whole.get(s[j:j + m], ()):
                question = normalize_text(self.questions[i].question)
                if s.startswith(question, j):
                    self._hit(i, question, where)

    def _hit(self, i: int, gram: str, where: str) -> None:
        self.found.setdefault(i, set()).add(gram)
        self.first_seen.setdefault(i, where)

    def report(self) -> list[Contamination]:
        return [Contamination(self.questions[i].where, self.questions[i].subject, len(grams) / self.n_grams[i],
                              self.first_seen[i], min(grams)) for i, grams in sorted(self.found.items())]


def find_contamination(questions: list[Question], texts: Iterable[tuple[str, str]],
                       n: int = NGRAM) -> tuple[list[Contamination], int, int]:
    """(contaminated items, items too short to check, texts scanned) of questions against (where, text)."""
    index = OverlapIndex(questions, n)
    scanned = 0
    for where, text in texts:
        index.scan(where, text)
        scanned += 1
    return index.report(), index.too_short, scanned


def run_decontam(bench: Benchmark, against: list[str], tokenizer_path: str | None, out: str | None) -> None:
    for path in against:
        if not os.path.isfile(path):
            raise InferenceError(f"--against {path}: no such file")
    skiplog = SkipLog()
    sources = [(path, iter_training_texts(path, tokenizer_path, skiplog)) for path in against]  # all checked first
    texts = (pair for path, source in sources
             for pair in tqdm(source, desc=os.path.basename(path), unit=" docs", leave=False))
    report, too_short, scanned = find_contamination(bench.questions, texts)
    for path in against:
        if skiplog.total(path):
            print(f"{path}: {skiplog.total(path)} unreadable records not checked {skiplog.counts(path)}")
    per_subject = Counter(c.subject for c in report)
    totals = Counter(q.subject for q in bench.questions)
    print(f"{NGRAM}-character overlap of {bench.name} (split {bench.split}) with {scanned:,} training texts "
          f"from {', '.join(against)}:")
    for subject in sorted(totals):
        print(f"  {subject}: {per_subject[subject]} of {totals[subject]} items contaminated")
    print(f"  total: {len(report)} of {len(bench.questions)} contaminated; {too_short} too short to check")
    for c in report:
        print(f"  {c.where} ({c.subject}): {c.overlap:.0%} of its {NGRAM}-grams, first in {c.first_seen}: {c.example}")
    if out:
        write_atomic_text(out, json.dumps({"bench": bench.name, "against": against, "ngram": NGRAM,
                                           "scanned": scanned, "too_short": too_short,
                                           "items": [asdict(c) for c in report]},
                                          ensure_ascii=False, indent=1) + "\n")


# ---------------------------------------------------------------- answering prompts

def answer_prompts(model: Transformer, tokenizer: ChatGLMTokenizer, args: argparse.Namespace, device: str) -> None:
    options = sampling_kwargs(args, eos_id=special_ids(tokenizer)[1])
    budget = prompt_budget(model.args.max_seq_len, args.max_new_tokens)
    records = []
    for prompt in read_prompts(args.prompts, args.prompt, BUILTIN_QUESTIONS):
        ids, _ = sft_prompt_ids(tokenizer, prompt, [], budget)
        print(f"问：{prompt}\n答：", end="", flush=True)
        pieces = []
        with autocast_for(device, args.dtype):
            for piece in stream_text(model, tokenizer, ids, options, device):
                pieces.append(piece)
                print(piece, end="", flush=True)
        print("\n")
        records.append({"prompt": prompt, "answer": "".join(pieces)})
    if args.out:
        write_atomic_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_ckpt="out/sft/ckpt.pt")
    add_prompt_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--bench", default=None, help="FORMAT:PATH_OR_HUB_NAME, FORMAT one of " + ", ".join(FORMATS))
    parser.add_argument("--shots", type=int, default=0, help="k-shot examples from the dev split (0 or 5 usual)")
    parser.add_argument("--split", default=None, help="split to score (default: val for ceval/cmb, else test)")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects, or 'medical' (default all)")
    parser.add_argument("--dev", default=None, help="file or folder of k-shot examples (default: the dev split)")
    parser.add_argument("--template", default=None, choices=TEMPLATES,
                        help="--bench prompts: lm-eval (lm-evaluation-harness's, the default) or native (this "
                             "project's; the only one with --layout=sft or --choice=text, so their default)")
    parser.add_argument("--layout", default="plain", choices=("plain", "sft"),
                        help="--bench prompt layout: plain (pretrained models) or sft (answers always use sft)")
    parser.add_argument("--choice", default="letter", choices=("letter", "text"), help="what each option scores")
    parser.add_argument("--export_lmeval", default=None, metavar="DIR",
                        help="write --bench as an lm-eval task folder (group = DIR's name) instead of scoring it")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass when scoring")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items (a quick look)")
    parser.add_argument("--decontam", action="store_true", help="check --bench against --against instead")
    parser.add_argument("--against", action="append", default=[],
                        help="training text for --decontam: .csv .jsonl .json .txt .bin (repeat or comma-separate)")
    parser.add_argument("--out", default=None, help="write answers (.jsonl), scores or the contamination report here")
    args = parser.parse_args(argv)
    if args.shots < 0:
        parser.error("--shots must be >= 0")
    if args.decontam and not (args.bench and args.against):
        parser.error("--decontam needs --bench=FORMAT:PATH and --against=TRAINING_FILE")
    if args.export_lmeval and not args.bench:
        parser.error("--export_lmeval needs --bench=FORMAT:PATH")
    if args.export_lmeval and args.decontam:
        parser.error("--export_lmeval and --decontam are separate runs")
    native_only = [flag for flag, on in (("--layout=sft", args.layout == "sft"),
                                         ("--choice=text", args.choice == "text")) if on]
    if args.template is None:
        args.template = "native" if native_only else "lm-eval"
    elif args.template == "lm-eval" and native_only:
        parser.error(f"--template=lm-eval scores letters in the plain layout, as lm-eval's ceval and cmmlu tasks "
                     f"do; {native_only[0]} needs --template=native")
    if args.export_lmeval and args.template != "lm-eval":
        parser.error("--export_lmeval writes lm-eval's template (--template=lm-eval, plain layout, letter choices)")
    return args


def template_label(template: str, layout: str) -> str:
    return "lm-evaluation-harness template" if template == "lm-eval" else f"native template, {layout} layout"


def export_lmeval(bench: Benchmark, folder: str, shots: int) -> None:
    """--export_lmeval: the benchmark as an lm-eval task folder with the same prompts as --template=lm-eval."""
    for subject in sorted({q.subject for q in bench.questions}):
        shots_for(bench, subject, shots)   # enough dev items for every subject, or one line saying not
    group, tasks = write_task_folder(folder, bench.fmt, bench.split, bench.questions, bench.dev, shots)
    print(f"wrote {folder}: lm-eval group {group} ({len(tasks)} subject task{'s' * (len(tasks) > 1)}, "
          f"{len(bench.questions)} items of {bench.name} split {bench.split}, {shots}-shot)")
    print(f"score a Hugging Face model folder with it (offline: HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1):\n"
          f"  lm_eval run --model hf --model_args pretrained=out/hf,trust_remote_code=True --tasks {group} "
          f"--include_path {folder}")


def bench_main(args: argparse.Namespace, bench: Benchmark) -> None:
    device = pick_device(args.device)
    model, tokenizer, meta = load_for_inference(args.ckpt, args.tokenizer, device, args.n_heads)
    print(describe_model(args.ckpt, model, meta))
    results, truncated = run_benchmark(model, tokenizer, bench, args.shots, args.layout, args.choice,
                                       args.batch_size, device, autocast_for(device, args.dtype), args.template)
    scores = summarize(results)
    skipped = f"; skipped {sum(bench.skipped.values())} {dict(bench.skipped)}" if bench.skipped else ""
    print(f"{bench.name} split {bench.split}: {len(results)} items, {args.shots}-shot, {args.choice} choices, "
          f"{template_label(args.template, args.layout)}{skipped}")
    if truncated:
        print(f"note: {truncated} option prompts were cut from the left to fit {model.args.max_seq_len} tokens")
    print(format_scores(scores))
    print("acc = highest summed log-probability; acc_norm = per UTF-8 byte; 95% Wilson intervals; "
          "overall = all items pooled")
    if args.out:
        payload = {"bench": bench.name, "split": bench.split, "ckpt": args.ckpt, "shots": args.shots,
                   "template": args.template, "layout": args.layout, "choice": args.choice,
                   "skipped": dict(bench.skipped),
                   "truncated": truncated, "scores": [asdict(s) for s in scores],
                   "items": [asdict(r) for r in results]}
        write_atomic_text(args.out, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bench:
        subjects = args.subjects.split(",") if args.subjects else None
        bench = load_benchmark(args.bench, args.split, subjects, args.dev, 0 if args.decontam else args.shots)
        bench.questions = bench.questions[:args.limit] if args.limit else bench.questions
        if args.decontam:
            against = [p for spec in args.against for p in spec.split(",") if p]
            run_decontam(bench, against, args.tokenizer, args.out)
        elif args.export_lmeval:
            export_lmeval(bench, args.export_lmeval, args.shots)
        else:
            bench_main(args, bench)
        return 0
    device = pick_device(args.device)
    model, tokenizer, meta = load_for_inference(args.ckpt, args.tokenizer, device, args.n_heads)
    print(describe_model(args.ckpt, model, meta))
    torch.manual_seed(args.seed)
    answer_prompts(model, tokenizer, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
