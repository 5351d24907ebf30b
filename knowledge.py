"""Retrieval from a knowledge file for serve.py: a Chinese-aware BM25 index (bm25s over jieba search-mode
words and character bigrams), built once by streaming the file and cached beside it.

    from knowledge import KnowledgeBase, rag_question
    kb = KnowledgeBase.open("data/medical_qa.jsonl")          # builds data/medical_qa.jsonl.bm25s/ once
    hits = kb.search("高血压患者能喝咖啡吗？", k=3)             # [Passage(text, file, line, score), ...]
    question = rag_question("高血压患者能喝咖啡吗？", [h.text for h in hits])

A knowledge file is plain text, one passage per paragraph (paragraphs are separated by blank lines), or
JSON Lines whose records' string fields, in order, together form one passage (medical Q&A pairs such as
`{"问": …, "答": …}` or `{"question": …, "answer": …}`, encyclopedia records `{"title": …, "text": …}`).
A .json file holding one JSON array is read item by item. Compressed files (.gz .bz2 .xz .zst) are read
transparently (corpus_io). Unreadable records are skipped, counted and reported with their file and line.

The cache folder `FILE.bm25s/` holds the bm25s index and the passages (so a hit is read back by offset,
not kept in memory); it records the file's size and modification time and is rebuilt when either changes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Iterator

import bm25s
import jieba
import numpy as np
from tqdm import tqdm

from corpus_io import READ_ERRORS, BadRecord, CorpusError, SkipLog, file_layout, iter_raw, parse_payload, where_of

CACHE_SUFFIX = ".bm25s"
CACHE_VERSION = 1          # bump when tokenisation or the cache layout changes
_CJK = re.compile(r"[\u3400-\u9fff]+")
_WORD = re.compile(r"[\w\u3400-\u9fff]", re.UNICODE)   # a token must hold a letter, digit or CJK character
# function words and question words that would otherwise match every question in a Q&A file
STOPWORDS = frozenset("的 了 是 在 和 与 及 或 吗 呢 吧 啊 呀 么 我 你 他 她 它 我们 你们 这 那 这个 那个 一个 有 有没有 "
                      "会 能 能不能 可以 要 什么 怎么 怎么办 怎样 如何 为什么 为何 哪些 哪个 多少 是否 请问 应该 "
                      "the a an of to is are and or in on for what how why which do does can".split())

jieba.setLogLevel(60)      # its dictionary-loading chatter goes to stderr at every start otherwise


def tokenize_zh(text: str) -> list[str]:
    """Search-mode jieba words (a long medical term also yields its parts: 螺杆菌 -> 螺杆, 杆菌, 螺杆菌),
    lower-cased, without punctuation, whitespace and stopwords, plus every pair of adjacent Chinese
    characters, so a paraphrase that jieba cuts differently (幽门螺旋杆菌 / 幽门螺杆菌) still shares terms."""
    words = (w.strip().lower() for w in jieba.cut_for_search(text))
    words = [w for w in words if w and _WORD.search(w) and w not in STOPWORDS]
    pairs = (run[i:i + 2] for run in _CJK.findall(text) for i in range(len(run) - 1))
    return words + [p for p in pairs if p not in STOPWORDS]


@dataclass
class Passage:
    """A retrieved passage and where it came from (`line`: the file line it starts on, or the item number
    of a JSON array)."""
    text: str
    file: str
    line: int
    score: float


def record_text(record: object) -> str | None:
    """The passage of one JSON record: its top-level string fields joined by newlines (None when it has
    none)."""
    if isinstance(record, str):
        return record.strip() or None
    if not isinstance(record, dict):
        return None
    parts = [v.strip() for v in record.values() if isinstance(v, str) and v.strip()]
    return "\n".join(parts) or None


def read_passages(path: str, skiplog: SkipLog) -> Iterator[tuple[int, str]]:
    """(line or item number, passage text) of a knowledge file, streamed."""
    layout = file_layout(path)
    if layout == "txt":
        yield from _paragraphs(path, skiplog)
        return
    for item in iter_raw(path, layout):
        where = where_of(path, layout, item.number)
        try:
            if item.error is not None:
                raise BadRecord(item.error)
            text = record_text(parse_payload(layout, item.payload))
            if text is None:
                raise BadRecord("no text (expected a JSON object with string fields)")
        except BadRecord as exc:
            skiplog.skip(path, where, str(exc))
            continue
        yield item.number, text


def _paragraphs(path: str, skiplog: SkipLog) -> Iterator[tuple[int, str]]:
    """Runs of non-blank lines; iter_raw skips blank lines, so a jump in line numbers ends a paragraph."""
    start, lines, last = 0, [], 0
    for item in iter_raw(path, "txt"):
        if lines and item.number != last + 1:
            yield start, "\n".join(lines)
            lines = []
        last = item.number
        try:
            line = parse_payload("txt", item.payload)
        except BadRecord as exc:
            skiplog.skip(path, where_of(path, "txt", item.number), str(exc))
            continue
        if not lines:
            start = item.number
        lines.append(line)
    if lines:
        yield start, "\n".join(lines)


class KnowledgeBase:
    """A BM25 index over the passages of one file, and the passages themselves (read back by offset)."""

    def __init__(self, path: str, cache_dir: str, retriever: bm25s.BM25, offsets: np.ndarray, info: dict):
        self.path, self.cache_dir, self.retriever, self.offsets, self.info = path, cache_dir, retriever, offsets, info

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def open(cls, path: str, rebuild: bool = False) -> KnowledgeBase:
        """Load the cached index of `path`, building it first when missing, stale or `rebuild`."""
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise CorpusError(f"--knowledge {path}: {exc.strerror or exc}") from None
        cache_dir = path + CACHE_SUFFIX
        source = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "version": CACHE_VERSION}
        info = None if rebuild else _read_info(cache_dir)
        if info is None or info.get("source") != source:
            info = _build(path, cache_dir, source)
        retriever = bm25s.BM25.load(cache_dir, mmap=True)
        offsets = np.load(os.path.join(cache_dir, "passages.offsets.npy"))
        return cls(path, cache_dir, retriever, offsets, info)

    def search(self, query: str, k: int) -> list[Passage]:
        """The k best passages for `query` (fewer when fewer share a word with it), best first."""
        words = [w for w in tokenize_zh(query) if w in self.retriever.vocab_dict]
        if not words or k < 1:
            return []
        scores = self.retriever.get_scores(words)                    # [passages]
        k = min(k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [self.passage(int(i), float(scores[i])) for i in best if scores[i] > 0]

    def passage(self, index: int, score: float = 0.0) -> Passage:
        with open(os.path.join(self.cache_dir, "passages.jsonl"), "rb") as f:
            f.seek(int(self.offsets[index]))
            record = json.loads(f.readline())
        return Passage(record["text"], self.path, record["line"], score)


def _read_info(cache_dir: str) -> dict | None:
    try:
        with open(os.path.join(cache_dir, "info.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _build(path: str, cache_dir: str, source: dict) -> dict:
    """Index the file into a temporary folder and move it into place (info.json, written last, marks a
    complete cache); nothing is left behind when it fails."""
    tmp = f"{cache_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        info = _index_into(path, tmp, source)
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(tmp, cache_dir)
    except OSError as exc:
        raise CorpusError(f"--knowledge {path}: cannot write its index {cache_dir} ({exc.strerror or exc})") \
            from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{path}: indexed {info['passages']} passages ({info['words']} distinct words, "
          f"{sum(info['skipped'].values())} records skipped) into {cache_dir}", file=sys.stderr)
    return info


def _index_into(path: str, folder: str, source: dict) -> dict:
    """Stream the file into token ids and a passage store (passages.jsonl + byte offsets), then index."""
    skiplog, vocab, docs, offsets = SkipLog(), {}, [], []
    with open(os.path.join(folder, "passages.jsonl"), "wb") as store:
        try:
            for line, text in tqdm(read_passages(path, skiplog), desc=f"indexing {path}", unit=" passages"):
                offsets.append(store.tell())
                store.write(json.dumps({"line": line, "text": text}, ensure_ascii=False).encode() + b"\n")
                docs.append([vocab.setdefault(w, len(vocab)) for w in tokenize_zh(text)])
        except READ_ERRORS as exc:   # a truncated .gz, an unreadable file, ...
            raise CorpusError(f"--knowledge {path}: cannot read it ({exc})") from None
    if not docs:
        raise CorpusError(f"--knowledge {path}: no passages read ({skiplog.total(path)} records skipped)")
    retriever = bm25s.BM25()
    retriever.index((docs, vocab), show_progress=False)
    retriever.save(folder, show_progress=False)
    np.save(os.path.join(folder, "passages.offsets.npy"), np.asarray(offsets, dtype=np.int64))
    info = {"source": source, "passages": len(docs), "skipped": skiplog.counts(path), "words": len(vocab)}
    with open(os.path.join(folder, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
    return info


RAG_HEADER = "参考资料：\n"
RAG_QUESTION = "请根据参考资料回答问题：\n"


def rag_question(question: str, passages: list[str]) -> str:
    """The question as the model sees it with retrieved passages placed before it."""
    if not passages:
        return question
    listed = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return f"{RAG_HEADER}{listed}\n{RAG_QUESTION}{question}"
