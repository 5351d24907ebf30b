"""The data-cleaning pipeline behind data_clean.py, and the decisions data_process.py --clean applies.

    from cleaning import CleanConfig, signature_pass, merge, CleanPlan
    signature_pass(sources, cfg, out, shard=(0, 1), workers=2)   # OUT/shards/shard-0-of-1/: resumable
    merge(sources, cfg, out, n_shards=1, workers=2)              # OUT/decisions.json, *.removed.npy, report
    plan = CleanPlan.load(out, sources)                          # data_process.py: refuses other input files

Stages (DESIGN.md, STYLE.md rule 12): (1) the signature pass streams every record (corpus_io readers,
bad records counted in a SkipLog), and in `workers` processes edits each document, applies the quality
rules, and for those kept computes MinHash band keys and shingle tokens; all of it is appended to files
on disk, committed every ~10 s with a state file, so a kill -9 and the same command again continues where
the last commit stood and ends with the same files. `--shard i/N` runs that pass over every N-th block
of records on N machines. (2) The merge reads the band keys one band at a time, groups equal keys by
sorting, checks each candidate pair's exact shingle Jaccard, joins the duplicates into clusters (union by
smallest key) and keeps the first document of each cluster in --corpus order. (3) It writes the decisions
(only the removed documents, with their reason and the document they duplicate), a report, and last
decisions.json, which ties them to the input files (size and a sampled blake2b fingerprint each).

A document is named by its key: source index (8 bits), file index (20 bits), record number (36 bits:
the line of a JSON Lines or text file, the item of a JSON array), so keys sort in --corpus order.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

import minhash
import quality as qrules
from corpus_io import (READ_ERRORS, BadRecord, CorpusError, CorpusSource, Position, SkipLog, extract_text, iter_raw,
                       ordered_map, parse_payload, source_labels, where_of, write_atomic_text)

VERSION = 1
NEAR_DUPLICATE = "near_duplicate"
REASONS = ["kept"] + qrules.RULE_NAMES + [NEAR_DUPLICATE]
KEPT, NEAR_DUP_CODE = 0, len(REASONS) - 1
SOURCE_BITS, FILE_BITS, RECORD_BITS = 8, 20, 36
SHARD_BLOCK = 1024           # shards take turns by blocks of this many records of a file
BATCH_DOCS = 256
COMMIT_SECONDS = 10.0       # a crash costs at most this much work; each commit fsyncs every band file
COMMIT_EVERY_ENV = "MCG_DATA_CLEAN_COMMIT_EVERY"   # test hook: commit every N batches instead of every ~10 s
KILL_AFTER_ENV = "MCG_DATA_CLEAN_KILL_AFTER"       # test hook: SIGKILL itself after N batches
DOC_DTYPE = np.dtype([("key", "<u8"), ("reason", "u1")])
INDEX_DTYPE = np.dtype([("key", "<u8"), ("offset", "<u8"), ("count", "<u4")])
REMOVED_DTYPE = np.dtype([("file", "<u4"), ("record", "<u8"), ("reason", "u1"), ("kept", "<u8"),
                          ("matched", "<u8"), ("jaccard", "<f4")])
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 64, 1 << 16


@dataclass(frozen=True)
class CleanConfig:
    """What decides the decisions: the quality rules in force (none: --quality=none), the edits, and the
    near-duplicate settings (threshold None: --near_dedup=none)."""
    quality: qrules.QualityConfig | None = field(default_factory=qrules.QualityConfig)
    rules: tuple[str, ...] = tuple(qrules.RULE_NAMES)
    threshold: float | None = 0.4
    shingle: int = 3
    bands: int = 60
    rows: int = 3

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rules"] = list(self.rules)
        return d

def make_key(source: int, file: int, record: int) -> int:
    return (source << (FILE_BITS + RECORD_BITS)) | (file << RECORD_BITS) | record


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = keys.astype(np.uint64)
    return ((keys >> np.uint64(FILE_BITS + RECORD_BITS)).astype(np.int64),
            ((keys >> np.uint64(RECORD_BITS)) & np.uint64((1 << FILE_BITS) - 1)).astype(np.int64),
            (keys & np.uint64((1 << RECORD_BITS) - 1)).astype(np.int64))


def check_limits(sources: list[CorpusSource]) -> None:
    if len(sources) > 1 << SOURCE_BITS:
        raise CorpusError(f"at most {1 << SOURCE_BITS} --corpus sources, got {len(sources)}")
    for source in sources:
        if len(source.paths) > 1 << FILE_BITS:
            raise CorpusError(f"--corpus {source.spec}: more than {1 << FILE_BITS} files")
        if source.corpus.layout == "hf":
            raise CorpusError(f"--corpus {source.spec}: data_clean needs files (hf: datasets cannot be "
                              f"fingerprinted); save the dataset as JSON Lines first")


def fingerprint(path: str) -> dict:
    """Size and blake2b of the first and last MiB plus 64 evenly spaced 64 KiB blocks: reads ~6 MB of any
    file, so checking a 200 GB corpus takes seconds, and any change of size or of a sampled byte shows."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= 2 * (1 << 20) + FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        else:
            spots = [0, size - (1 << 20)] + [size * i // (FINGERPRINT_BLOCKS + 1)
                                             for i in range(1, FINGERPRINT_BLOCKS + 1)]
            for spot in spots:
                f.seek(spot)
                digest.update(f.read(1 << 20 if spot in (0, size - (1 << 20)) else FINGERPRINT_BLOCK))
    return {"path": os.path.abspath(path), "size": size, "blake2b_sampled": digest.hexdigest()}


def describe_sources(sources: list[CorpusSource]) -> list[dict]:
    labels = source_labels(sources)
    return [{"label": label, "corpus": s.corpus.name, "spec": s.spec, "files": [fingerprint(p) for p in s.paths]}
            for label, s in zip(labels, sources)]


def run_key(described: list[dict], cfg: CleanConfig) -> str:
    """A hash of the inputs (as fingerprinted) and the settings: work on disk from any other command is
    not resumed or merged."""
    what = {"version": VERSION, "config": cfg.as_dict(),
            "sources": [[d["corpus"], [[f["size"], f["blake2b_sampled"]] for f in d["files"]]]
                        for d in described]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- worker side

class Batch(NamedTuple):
    """Records of one file for a worker: (number, payload, error) triples; `end` is the resume position
    after them."""
    source: int
    file: int
    path: str
    corpus: str
    layout: str
    items: list
    end: Position
    records_read: int
    file_done: bool


class Result(NamedTuple):
    """A worker's verdicts for one Batch: every good document's key and reason code; for the kept ones
    with shingles, their band keys [docs, bands], index rows (key, where their tokens start, how many)
    and shingle tokens; and the bad records as (where, reason)."""
    source: int
    file: int
    end: Position
    records_read: int
    file_done: bool
    errors: list
    docs: np.ndarray
    bands: np.ndarray
    index: np.ndarray
    tokens: np.ndarray


_CFG: CleanConfig | None = None


def init_worker(cfg: CleanConfig) -> None:
    """Remember the settings in this process (a pool worker, or this one with --workers=1)."""
    global _CFG
    _CFG = cfg


def judge_texts(texts: list[str], cfg: CleanConfig) -> tuple[list[str], np.ndarray]:
    """The texts edited (unchanged under --quality=none) and a reason code per text (0 kept)."""
    codes = np.zeros(len(texts), dtype=np.uint8)
    if cfg.quality is None:
        return texts, codes
    edited, failed = qrules.judge(texts, cfg.quality, [r for r in qrules.RULES if r.name in cfg.rules])
    for i, name in enumerate(failed):
        if name:
            codes[i] = REASONS.index(name)
    return edited, codes


def process_batch(batch: Batch) -> Result:
    """Parse, edit, judge and sign one batch (runs in a worker)."""
    from corpus_io import get_corpus
    cfg = _CFG
    corpus = get_corpus(batch.corpus)
    texts, numbers, errors = [], [], []
    for number, payload, error in batch.items:
        try:
            if error is not None:
                raise BadRecord(error)
            texts.append(extract_text(corpus, parse_payload(batch.layout, payload)))
            numbers.append(number)
        except BadRecord as exc:
            errors.append((where_of(batch.path, batch.layout, number), str(exc)))
    base = make_key(batch.source, batch.file, 0)
    docs = np.empty(len(texts), dtype=DOC_DTYPE)
    docs["key"] = np.asarray(numbers, dtype=np.uint64) + np.uint64(base)
    edited, docs["reason"] = judge_texts(texts, cfg)
    kept = np.flatnonzero(docs["reason"] == KEPT)
    if cfg.threshold is None or not len(kept):
        return Result(batch.source, batch.file, batch.end, batch.records_read, batch.file_done, errors, docs,
                      np.empty((0, cfg.bands), np.uint64), np.empty(0, INDEX_DTYPE), np.empty(0, np.uint32))
    edited = [edited[i] for i in kept]
    doc, h = minhash.shingle_hashes(edited, cfg.shingle)
    tokens, counts = minhash.shingle_tokens(doc, h, len(edited))
    has = counts > 0   # a text of nothing but punctuation has no shingle: it cannot be a near-duplicate
    sig = minhash.signatures(doc, h, len(edited), cfg.bands * cfg.rows)
    bands = minhash.band_keys(sig, cfg.bands, cfg.rows)[has]
    index = np.empty(len(bands), INDEX_DTYPE)
    index["key"] = docs["key"][kept][has]
    index["count"] = counts[has]
    index["offset"] = (np.cumsum(counts) - counts)[has]
    return Result(batch.source, batch.file, batch.end, batch.records_read, batch.file_done, errors, docs, bands,
                  index, tokens)


# ---------------------------------------------------------------- main side: batches and the ordered pool

@dataclass
class Cursor:
    source: int = 0
    file: int = 0
    position: Position = field(default_factory=Position)


def in_shard(global_file: int, ordinal: int, shard: tuple[int, int]) -> bool:
    """Whether record `ordinal` (0-based) of the `global_file`-th file of the run belongs to `shard`."""
    index, count = shard
    return (global_file + ordinal // SHARD_BLOCK) % count == index


def iter_batches(sources: list[CorpusSource], cursor: Cursor, shard: tuple[int, int],
                 batch_docs: int = BATCH_DOCS) -> Iterator[Batch]:
    """This shard's records from `cursor` on, in batches within one file; every file ends with a batch
    marked file_done."""
    global_file = 0
    for s, source in enumerate(sources):
        for f, path in enumerate(source.paths):
            if (s, f) >= (cursor.source, cursor.file):
                start = cursor.position if (s, f) == (cursor.source, cursor.file) else Position()
                yield from _file_batches(s, f, global_file, path, source.corpus, start, shard, batch_docs)
            global_file += 1


def _file_batches(s: int, f: int, global_file: int, path: str, corpus: Any, start: Position,
                  shard: tuple[int, int], batch_docs: int) -> Iterator[Batch]:
    items: list = []
    last = start
    read = 0
    layout = corpus.layout
    try:
        for item in iter_raw(path, layout, start):
            last = item.position
            read += 1
            if in_shard(global_file, item.position.records - 1, shard):
                items.append((item.number, item.payload, item.error))
            if len(items) >= batch_docs or read >= 8 * batch_docs:
                yield Batch(s, f, path, corpus.name, layout, items, last, read, False)
                items, read = [], 0
    except READ_ERRORS as exc:
        reason = f"unreadable file ({type(exc).__name__}: {str(exc)[:160]}); rest of the file skipped"
        number = items[-1][0] if items else (last.line if layout in ("jsonl", "txt") else last.records)
        items.append((number + 1, None, reason))
    yield Batch(s, f, path, corpus.name, layout, items, last, read, True)


# ---------------------------------------------------------------- the signature pass of one shard

def shard_dir(out: str, shard: tuple[int, int]) -> str:
    return os.path.join(out, "shards", f"shard-{shard[0]}-of-{shard[1]}")


class ShardFiles:
    """One shard's work on disk: append-only files (documents and reasons; the shingle index and tokens;
    one file of keys per band, in index order, so the merge reads one band at a time) and the state file
    that says how far they are valid."""

    def __init__(self, folder: str, bands: int = 0):
        self.folder = folder
        self.state_path = os.path.join(folder, "state.json")
        names = ["docs", "index", "tokens"] + [f"band-{b}" for b in range(bands)]
        self.paths = {name: os.path.join(folder, f"{name}.bin") for name in names}
        self.files: dict[str, Any] = {}

    def read_state(self) -> dict | None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def open(self, lengths: dict[str, int] | None) -> None:
        """Open every file: truncated to `lengths` (resume) or emptied (fresh start)."""
        os.makedirs(self.folder, exist_ok=True)
        for name, path in self.paths.items():
            # band files get a few KB per batch: a small buffer each (60 buffers of 1 MiB would be 60 MiB)
            f = open(path, "r+b" if lengths else "wb", buffering=1 << 16 if name.startswith("band-") else 1 << 20)
            if lengths:
                f.truncate(lengths[name])
                f.seek(lengths[name])
            self.files[name] = f

    def lengths_ok(self, lengths: dict[str, int]) -> bool:
        return all(os.path.isfile(p) and os.path.getsize(p) >= lengths.get(n, 0) for n, p in self.paths.items())

    def sync(self) -> dict[str, int]:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        return {name: f.tell() for name, f in self.files.items()}

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}

    def load(self, name: str, dtype: np.dtype, mapped: bool = True) -> np.ndarray:
        """A finished file as a read-only memmap, or (`mapped` False) read into memory."""
        if os.path.getsize(self.paths[name]) == 0:
            return np.empty(0, dtype)
        return np.memmap(self.paths[name], dtype=dtype, mode="r") if mapped else np.fromfile(self.paths[name], dtype)


class ShardRun:
    """Applies worker results in order: appends them, counts them, commits every ~10 s, resumes."""

    def __init__(self, sources: list[CorpusSource], key: str, folder: str, strict: bool, bands: int):
        self.sources, self.key = sources, key
        self.labels = source_labels(sources)
        self.files = ShardFiles(folder, bands)
        self.skiplog = SkipLog(strict=strict)
        self.counts = [Counter() for _ in sources]
        self.cursor = Cursor()
        self.done = False
        self.token_offset = 0
        self.batches = self.since_commit = 0
        self.last_commit = time.monotonic()
        self.commit_every = int(os.environ.get(COMMIT_EVERY_ENV) or 0)
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV) or 0)

    def start(self) -> None:
        """Resume this shard's interrupted (or finished) pass of the same command; else start afresh."""
        state = self.files.read_state()
        if state is None or state.get("key") != self.key or \
                (not state["done"] and not self.files.lengths_ok(state["lengths"])):
            if state is not None:
                tqdm.write(f"{self.files.state_path} is from another command or incomplete: starting afresh",
                           file=sys.stderr)
            self.files.open(None)
            return
        source, file, position = state["cursor"]
        self.cursor = Cursor(source, file, Position(*position))
        self.counts = [Counter(c) for c in state["counts"]]
        for label, skipped in zip(self.labels, state["skipped"]):
            self.skiplog.restore(label, skipped)
        self.done = state["done"]
        if not self.done:
            self.files.open(state["lengths"])
            self.token_offset = state["lengths"]["tokens"] // 4
            tqdm.write(f"resuming the signature pass: {sum(sum(c.values()) for c in self.counts):,} documents "
                       f"already judged", file=sys.stderr)

    def apply(self, result: Result) -> None:
        for where, reason in result.errors:
            self.skiplog.skip(self.labels[result.source], where, reason)
        counts = self.counts[result.source]
        for code, n in zip(*np.unique(result.docs["reason"], return_counts=True)):
            counts[REASONS[code]] += int(n)
        index = result.index.copy()
        index["offset"] += np.uint64(self.token_offset)
        self.token_offset += len(result.tokens)
        for name, array in (("docs", result.docs), ("index", index), ("tokens", result.tokens)):
            self.files.files[name].write(array.tobytes())
        for b in range(result.bands.shape[1] if len(result.bands) else 0):
            self.files.files[f"band-{b}"].write(np.ascontiguousarray(result.bands[:, b]).tobytes())
        self.cursor = (Cursor(result.source, result.file + 1) if result.file_done
                       else Cursor(result.source, result.file, result.end))
        self.batches += 1
        self.since_commit += 1
        if (self.since_commit >= self.commit_every if self.commit_every
                else time.monotonic() - self.last_commit >= COMMIT_SECONDS):
            self.commit()
        if self.kill_after and self.batches >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like kill -9, buffers unflushed

    def commit(self, done: bool = False) -> None:
        """fsync the files, then atomically replace the state naming their lengths; a crash in between
        leaves the previous state, which a resumed run truncates back to."""
        state = {"version": VERSION, "key": self.key, "done": done, "lengths": self.files.sync(),
                 "cursor": [self.cursor.source, self.cursor.file, list(self.cursor.position)],
                 "counts": [dict(c) for c in self.counts],
                 "skipped": [self.skiplog.counts(label) for label in self.labels]}
        write_atomic_text(self.files.state_path, json.dumps(state))
        self.since_commit = 0
        self.last_commit = time.monotonic()


def signature_pass(sources: list[CorpusSource], cfg: CleanConfig, key: str, out: str, shard: tuple[int, int],
                   workers: int, strict: bool = False, batch_docs: int = BATCH_DOCS) -> ShardRun:
    """Judge and sign this shard's documents (resuming an interrupted pass of the same command)."""
    run = ShardRun(sources, key, shard_dir(out, shard), strict, cfg.bands if cfg.threshold is not None else 0)
    run.start()
    if run.done:
        return run
    batches = iter_batches(sources, run.cursor, shard, batch_docs)
    bar = tqdm(desc=f"judge + sign (shard {shard[0]}/{shard[1]})", unit="doc", dynamic_ncols=True,
               initial=sum(sum(c.values()) for c in run.counts))
    try:
        with contextlib.closing(ordered_map(process_batch, batches, workers, init_worker, (cfg,))) as results:
            for result in results:
                run.apply(result)
                bar.update(len(result.docs))
                bar.set_postfix(source=run.labels[result.source], refresh=False)
        run.commit(done=True)
        run.done = True
    finally:
        bar.close()
        run.files.close()
    return run


# ---------------------------------------------------------------- merge: candidates, exact check, clusters

class TokenStore:
    """The shingle tokens of every signed document, across shards, looked up by document key. Tokens are
    read with pread, not mapped, so memory holds only the index (28 bytes per document), however large
    the token files."""

    def __init__(self, folders: list[str]):
        shards = [ShardFiles(folder) for folder in folders]
        self.fds = [os.open(s.paths["tokens"], os.O_RDONLY) for s in shards]
        indexes = [s.load("index", INDEX_DTYPE, mapped=False) for s in shards]
        keys = np.concatenate([ix["key"] for ix in indexes]) if indexes else np.empty(0, np.uint64)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.shard = np.concatenate([np.full(len(ix), i) for i, ix in enumerate(indexes)])[order]
        self.offset = np.concatenate([ix["offset"] for ix in indexes])[order]
        self.count = np.concatenate([ix["count"] for ix in indexes])[order]

    def get_many(self, keys: np.ndarray) -> dict[int, np.ndarray]:
        """The tokens of each key (one index search for all of them)."""
        keys = np.unique(keys)
        at = np.searchsorted(self.keys, keys)
        out = {}
        for key, shard, offset, count in zip(keys.tolist(), self.shard[at].tolist(), self.offset[at].tolist(),
                                             self.count[at].tolist()):
            out[key] = np.frombuffer(os.pread(self.fds[shard], 4 * count, 4 * offset), dtype="<u4")
        return out


_STORE: TokenStore | None = None


def _init_verifier(folders: list[str]) -> None:
    global _STORE
    _STORE = TokenStore(folders)


def _verify(pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of each candidate pair (runs in a worker); each document's set is built once per chunk."""
    sets = {key: minhash.token_set(tokens) for key, tokens in _STORE.get_many(pairs.ravel()).items()}
    return np.array([minhash.jaccard(sets[a], sets[b], as_sets=True) for a, b in pairs.tolist()], dtype=np.float32)


def candidate_pairs(folders: list[str], bands: int) -> np.ndarray:
    """Unique candidate pairs over all bands, one band in memory at a time, grouped by sorting."""
    shards = [ShardFiles(folder, bands) for folder in folders]
    keys = np.concatenate([s.load("index", INDEX_DTYPE, mapped=False)["key"] for s in shards])
    # documents by their rank in key order, so a pair packs into one uint64 and np.unique is one fast sort
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(keys), dtype=np.uint64)
    rank[order] = np.arange(len(keys), dtype=np.uint64)
    found = np.empty(0, dtype=np.uint64)
    for b in tqdm(range(bands), desc="group band keys", unit="band", dynamic_ncols=True):
        hashes = np.concatenate([s.load(f"band-{b}", np.dtype("<u8"), mapped=False) for s in shards])
        pairs = minhash.band_pairs(hashes, rank)
        found = np.unique(np.concatenate([found, (pairs[:, 0] << np.uint64(32)) | pairs[:, 1]]))
    ranked = keys[order]
    return np.stack([ranked[(found >> np.uint64(32)).astype(np.int64)],
                     ranked[(found & np.uint64(0xFFFFFFFF)).astype(np.int64)]], axis=1)


def near_duplicates(folders: list[str], cfg: CleanConfig, workers: int) -> dict[str, np.ndarray]:
    """Removed near-duplicates: their keys, the kept document of their cluster, the document they
    matched directly and that match's Jaccard; plus every cluster's size."""
    pairs = candidate_pairs(folders, cfg.bands)
    chunks = [pairs[i:i + 2048] for i in range(0, len(pairs), 2048)]
    bar = tqdm(total=len(pairs), desc="check candidates", unit="pair", dynamic_ncols=True)
    scores = []
    with contextlib.closing(ordered_map(_verify, chunks, workers, _init_verifier, (folders,))) as results:
        for score in results:
            scores.append(score)
            bar.update(len(score))
    bar.close()
    score = np.concatenate(scores) if scores else np.empty(0, np.float32)
    edges, score = pairs[score >= cfg.threshold], score[score >= cfg.threshold]
    nodes, roots = minhash.components(edges) if len(edges) else (np.empty(0, np.uint64),) * 2
    removed = nodes != roots
    # each removed document's own match: its partner of smallest key among its edges
    both = np.concatenate([edges, edges[:, ::-1]])
    both_score = np.concatenate([score, score])
    order = np.lexsort((both[:, 1], both[:, 0]))
    both, both_score = both[order], both_score[order]
    first = np.searchsorted(both[:, 0], nodes[removed])
    _, sizes = np.unique(roots, return_counts=True)
    return {"key": nodes[removed], "kept": roots[removed], "matched": both[first, 1],
            "jaccard": both_score[first], "cluster_sizes": sizes, "candidates": np.array(len(pairs))}


def merge(sources: list[CorpusSource], cfg: CleanConfig, key: str, described: list[dict], out: str,
          n_shards: int, workers: int) -> dict:
    """Combine the shards' passes into decisions, the report and decisions.json; the summary."""
    folders = [shard_dir(out, (i, n_shards)) for i in range(n_shards)]
    try:   # decisions.json is the commit mark: none while the files it vouches for are being replaced
        os.remove(os.path.join(out, "decisions.json"))
    except FileNotFoundError:
        pass
    labels = source_labels(sources)
    counts = [Counter() for _ in sources]
    skipped = [Counter() for _ in sources]
    for folder in folders:
        state = ShardFiles(folder).read_state()
        if state is None or state.get("key") != key or not state["done"]:
            raise CorpusError(f"{folder}: the signature pass of this shard is missing, unfinished or from "
                              f"another command; run it (--shard) with the same inputs and settings first")
        for i in range(len(sources)):
            counts[i].update(state["counts"][i])
            skipped[i].update(state["skipped"][i])
    docs = np.concatenate([ShardFiles(f).load("docs", DOC_DTYPE) for f in folders])
    docs = docs[np.argsort(docs["key"], kind="stable")]
    dups = near_duplicates(folders, cfg, workers) if cfg.threshold is not None else None
    removed = _removed_rows(docs, dups, len(sources))
    summary = _summary(labels, counts, skipped, removed, dups, cfg)
    from clean_report import write_report
    write_report(out, sources, summary, removed)
    for i, rows in enumerate(removed):
        _save_npy(os.path.join(out, removed_file(i, labels[i])), rows)
    decisions = {"version": VERSION, "key": key, "config": cfg.as_dict(), "reasons": REASONS,
                 "sources": [{**d, "removed_file": removed_file(i, d["label"]), **summary["sources"][i]}
                             for i, d in enumerate(described)]}
    write_atomic_text(os.path.join(out, "decisions.json"), json.dumps(decisions, ensure_ascii=False, indent=1))
    return summary


def removed_file(index: int, label: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    return f"source-{index}-{safe}.removed.npy"


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path + ".tmp", "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _removed_rows(docs: np.ndarray, dups: dict | None, n_sources: int) -> list[np.ndarray]:
    """Per source, the removed documents as REMOVED_DTYPE rows in key order."""
    bad = docs[docs["reason"] != KEPT]
    keys = np.concatenate([bad["key"], dups["key"] if dups else np.empty(0, np.uint64)])
    rows = np.zeros(len(keys), dtype=REMOVED_DTYPE)
    rows["reason"] = np.concatenate([bad["reason"], np.full(len(keys) - len(bad), NEAR_DUP_CODE, np.uint8)])
    rows["jaccard"] = np.nan
    if dups:
        rows["kept"][len(bad):] = dups["kept"]
        rows["matched"][len(bad):] = dups["matched"]
        rows["jaccard"][len(bad):] = dups["jaccard"]
    order = np.argsort(keys, kind="stable")
    rows, keys = rows[order], keys[order]
    source, rows["file"], rows["record"] = split_keys(keys)
    return [rows[source == i] for i in range(n_sources)]


def _summary(labels: list[str], counts: list[Counter], skipped: list[Counter], removed: list[np.ndarray],
             dups: dict | None, cfg: CleanConfig) -> dict:
    sources = []
    for i, label in enumerate(labels):
        by_reason = {name: int(counts[i].get(name, 0)) for name in REASONS[1:-1]}
        near = int((removed[i]["reason"] == NEAR_DUP_CODE).sum())
        by_reason[NEAR_DUPLICATE] = near
        documents = sum(counts[i].values())
        sources.append({"documents": documents, "kept": documents - sum(by_reason.values()),
                        "removed": by_reason, "malformed": dict(skipped[i])})
    sizes = Counter(dups["cluster_sizes"].tolist()) if dups else Counter()
    return {"labels": labels, "sources": sources, "config": cfg.as_dict(),
            "candidate_pairs": int(dups["candidates"]) if dups else 0,
            "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())}}


# ---------------------------------------------------------------- applying decisions

class CleanPlan:
    """Decisions loaded for the same inputs: which records each file drops, and the edit to apply to
    the rest. data_process.py --clean uses it; data_clean.py --write_jsonl too."""

    def __init__(self, folder: str, decisions: dict, removed: list[np.ndarray]):
        self.folder, self.decisions = folder, decisions
        self._removed = {}
        for s, rows in enumerate(removed):
            for f in np.unique(rows["file"]).tolist():
                self._removed[(s, f)] = np.sort(rows["record"][rows["file"] == f])
        cfg = decisions["config"]
        self.quality = qrules.QualityConfig(**cfg["quality"]) if cfg["quality"] else None
        self.counts = [len(rows) for rows in removed]

    @classmethod
    def load(cls, folder: str, sources: list[CorpusSource]) -> CleanPlan:
        """CorpusError (one line) unless `folder` holds finished decisions made for exactly these
        sources and files (same order, sizes and fingerprints)."""
        path = os.path.join(folder, "decisions.json")
        try:
            with open(path, encoding="utf-8") as f:
                decisions = json.load(f)
        except FileNotFoundError:
            raise CorpusError(f"--clean {folder}: no decisions.json there (run data_clean.py --out {folder} "
                              f"first, to its end)") from None
        except (OSError, ValueError) as exc:
            raise CorpusError(f"--clean {folder}: cannot read {path} ({exc})") from None
        if not isinstance(decisions, dict) or decisions.get("version") != VERSION:
            raise CorpusError(f"{path}: written by another version of data_clean.py; run it again")
        try:
            _check_same_inputs(path, decisions["sources"], sources)
            removed = [np.load(os.path.join(folder, s["removed_file"]), allow_pickle=False)
                       for s in decisions["sources"]]
            return cls(folder, decisions, removed)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise CorpusError(f"--clean {folder}: the decisions are incomplete or damaged ({type(exc).__name__}: "
                              f"{exc}); run data_clean.py --out {folder} again") from None

    def removed_records(self, source: int, file: int) -> np.ndarray:
        return self._removed.get((source, file), np.empty(0, np.uint64))

    def keep_items(self, source: int, file: int, items: list) -> list:
        """The items (tuples whose first field is the record number) that the decisions keep."""
        drop = self.removed_records(source, file)
        if not len(drop) or not items:
            return items
        numbers = np.fromiter((item[0] for item in items), dtype=np.uint64, count=len(items))
        idx = np.minimum(np.searchsorted(drop, numbers), len(drop) - 1)
        keep = drop[idx] != numbers
        return [item for item, k in zip(items, keep.tolist()) if k]

    def edit(self) -> Callable[[str], str] | None:
        return partial(qrules.edit_text, cfg=self.quality) if self.quality else None

    def manifest(self) -> dict:
        """What data_process.py records in its manifest about the decisions it applied."""
        with open(os.path.join(self.folder, "decisions.json"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return {"folder": os.path.abspath(self.folder), "decisions_sha256": digest,
                "edits": bool(self.quality), "config": self.decisions["config"],
                "removed": {s["label"]: n for s, n in zip(self.decisions["sources"], self.counts)}}


def _check_same_inputs(path: str, recorded: list[dict], sources: list[CorpusSource]) -> None:
    if len(recorded) != len(sources):
        raise CorpusError(f"{path} was made for {len(recorded)} --corpus sources, this run has {len(sources)}")
    for i, (rec, source) in enumerate(zip(recorded, sources)):
        if rec["corpus"] != source.corpus.name or len(rec["files"]) != len(source.paths):
            raise CorpusError(f"{path}: source {i + 1} was {rec['spec']} ({len(rec['files'])} files), "
                              f"this run has {source.spec} ({len(source.paths)} files)")
        for old, file in zip(rec["files"], source.paths):
            now = fingerprint(file)
            if (now["size"], now["blake2b_sampled"]) != (old["size"], old["blake2b_sampled"]):
                raise CorpusError(f"{file}: not the file the decisions in {path} were made for (size "
                                  f"{now['size']:,} vs {old['size']:,} bytes, or changed content); "
                                  f"run data_clean.py again")


def iter_documents(sources: list[CorpusSource], wanted: Callable[[int, int], np.ndarray | None]) -> Iterator[tuple]:
    """(source, file, record number, text) of the good records each file's `wanted(source, file)` names
    (sorted record numbers; None: every record), file by file; a file with nothing wanted is not read."""
    for s, source in enumerate(sources):
        for f, path in enumerate(source.paths):
            numbers = wanted(s, f)
            if numbers is not None and not len(numbers):
                continue
            last = int(numbers[-1]) if numbers is not None else None
            for item in iter_raw(path, source.corpus.layout):
                if last is not None and item.number > last:
                    break
                if item.error is None and (numbers is None or _contains(numbers, item.number)):
                    try:
                        yield s, f, item.number, extract_text(source.corpus,
                                                              parse_payload(source.corpus.layout, item.payload))
                    except BadRecord:
                        continue


def _contains(sorted_numbers: np.ndarray, number: int) -> bool:
    i = int(np.searchsorted(sorted_numbers, number))
    return i < len(sorted_numbers) and int(sorted_numbers[i]) == number


def write_kept_jsonl(sources: list[CorpusSource], plan: CleanPlan, path: str) -> int:
    """The kept documents, edited, as JSON Lines {"text", "source"}; the number written."""
    labels = source_labels(sources)
    edit = plan.edit()
    written = 0
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        for s, f, number, text in tqdm(iter_documents(sources, lambda s, f: None), desc="write kept",
                                       unit="doc", dynamic_ncols=True):
            if _contains(plan.removed_records(s, f), number):
                continue
            out.write(json.dumps({"text": edit(text) if edit else text, "source": labels[s]},
                                 ensure_ascii=False) + "\n")
            written += 1
    os.replace(path + ".tmp", path)
    return written
