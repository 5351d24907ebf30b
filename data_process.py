"""Tokenize pretraining corpora into one token file: data/pretrain_data.bin (+ manifest, + val split).

    python data_process.py                      # bundled sample (data/sample/) → data/pretrain_data.bin in seconds
    python data_process.py \\
      --corpus wiki=/d/wikipedia-cn-20230720-filtered.json \\
      --corpus baidubaike=/d/563w_baidubaike.json \\
      --corpus c4_zh='/d/c4_zh/*.jsonl.zst' \\
      --corpus wudao='/d/WuDaoCorpus2.0_base_200G/*.json' \\
      --corpus medical='/d/shibing624_medical/pretrain/*.json' \\
      --workers 16 --out data/pretrain_data.bin
    python data_process.py --list-corpora       # the registry, with each format described
    options: --val-fraction=0.01 (0.1 for the bundled sample) --min-tokens=5 --no-dedup --strict
             --tokenizer=chatglm_tokenizer --val-out=PATH --batch-docs=512
             --clean=data/clean/   (data_clean.py's decisions: only the kept documents, edited as judged)

Output (DESIGN.md): `--out` holds little-endian uint16 token ids, every document followed by <eos> (2),
nothing else; beside it `x/foo.json`, the manifest (tokenizer sha256 and vocab size, dtype, eos id,
totals and per-source counts). A stable `--val-fraction` of the documents, chosen by a hash of their
text, goes to `--val-out` (default: pretrain_data.bin → pretrain_val.bin, foo.bin → foo_val.bin).

How: the main process streams records (never a whole corpus in memory) in batches to `--workers`
processes that parse, extract, hash and tokenize them (sentencepiece's native batch encode); results come
back in order, so the bytes do not depend on `--workers`. The main process drops exact duplicates (an
8-byte hash of the whitespace-normalised text, across all sources) and too-short documents, and appends
the rest to `OUT.partial` files. Every ~2 s it fsyncs them and atomically rewrites a small state file
(where each source stands, file lengths, counts); the dedup hashes go to an append-only file. After a
crash or `kill -9`, the same command truncates the partial files to the last commit and carries on from
there: the result is byte-identical to an uninterrupted run. At the end the partial files are renamed into
place, so nothing at the final paths is ever half-written. Rerunning a finished command redoes it.
Test hooks (environment): MCG_DATA_PROCESS_COMMIT_EVERY=N commits every N batches instead of every ~2 s;
MCG_DATA_PROCESS_KILL_AFTER=N makes the run SIGKILL itself after writing N batches.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from corpus_io import (COMPRESSED_SUFFIXES, READ_ERRORS, BadRecord, CorpusError, CorpusSource, Position, SkipLog,
                       describe_corpora, ensure_output_folder, extract_text, get_corpus, iter_raw, ordered_map,
                       parse_corpus_spec, parse_payload, sample_corpus_specs, source_labels, text_keys, where_of,
                       write_atomic_text)
from cleaning import CleanPlan
from tokenfile import default_val_path, manifest_path, with_token_offsets

DEFAULT_OUT = os.path.join("data", "pretrain_data.bin")
DEFAULT_VAL_FRACTION = 0.01
# The bundled sample is ~140 documents: 1% would hold out one or two, too few tokens for even one
# validation window of the tiny preset, so the bare demo run holds out 10%.
SAMPLE_VAL_FRACTION = 0.1
UINT16_LIMIT = 65536
BATCH_BYTES = 1 << 20           # a batch also closes at this many raw bytes: bounds memory in flight
COMMIT_SECONDS = 2.0            # how much work a crash can cost at most (plus the batches in flight)
COMMIT_EVERY_ENV = "MCG_DATA_PROCESS_COMMIT_EVERY"  # test hook: commit every N batches instead
KILL_AFTER_ENV = "MCG_DATA_PROCESS_KILL_AFTER"      # test hook: SIGKILL itself after writing N batches
STATE_VERSION = 1


@dataclass
class Options:
    """One run, as given on the command line (sources already resolved to files)."""
    sources: list[CorpusSource]
    out: str
    val_out: str | None
    val_fraction: float
    min_tokens: int
    dedup: bool
    strict: bool
    workers: int
    batch_docs: int
    tokenizer: str
    clean: CleanPlan | None = None   # --clean: the records it drops, the edit for the rest


# ---------------------------------------------------------------- worker side: parse, extract, tokenize

class Batch(NamedTuple):
    """Consecutive records of one file, sent to a worker. `items` are (number, payload, error) triples."""
    source: int
    file: int
    path: str
    corpus: str
    layout: str
    items: list
    end: Position
    bytes_read: int
    file_done: bool


class Encoded(NamedTuple):
    """A worker's answer for one Batch: the tokens of its good documents (each ending in eos), their
    lengths, their 16-byte text hashes as uint64 pairs [dedup key, split key], and the bad records."""
    source: int
    file: int
    end: Position
    bytes_read: int
    file_done: bool
    records: int
    errors: list
    tokens: np.ndarray
    lengths: np.ndarray
    keys: np.ndarray


_SP: Any = None  # the worker's sentencepiece model
_EOS = 2
_EDIT: Any = None  # --clean: the text edit data_clean.py judged the documents after


def init_worker(model_file: str, eos_id: int, edit: Any = None) -> None:
    """Load sentencepiece in this process (a pool worker, or this one with --workers=1)."""
    global _SP, _EOS, _EDIT
    import sentencepiece as spm
    _SP = spm.SentencePieceProcessor(model_file=model_file)
    _EOS = eos_id
    _EDIT = edit


def encode_batch(batch: Batch) -> Encoded:
    """Parse, extract, hash and tokenize one batch (runs in a worker)."""
    corpus = get_corpus(batch.corpus)
    texts, errors = [], []
    for number, payload, error in batch.items:
        try:
            if error is not None:
                raise BadRecord(error)
            texts.append(extract_text(corpus, parse_payload(batch.layout, payload)))
        except BadRecord as exc:
            errors.append((where_of(batch.path, batch.layout, number), str(exc)))
    if _EDIT is not None:
        texts = [_EDIT(t) for t in texts]
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, ids in enumerate(_SP.encode(texts, num_threads=1)):
        flat.extend(ids)
        flat.append(_EOS)
        lengths[i] = len(ids) + 1
    keys = np.frombuffer(b"".join(map(text_keys, texts)), dtype="<u8").reshape(-1, 2)
    return Encoded(batch.source, batch.file, batch.end, batch.bytes_read, batch.file_done, len(batch.items),
                   errors, np.array(flat, dtype="<u2"), lengths, keys)


# ---------------------------------------------------------------- main side: batching

@dataclass
class Cursor:
    """The next record to read: source index, file index within it, position within that file."""
    source: int = 0
    file: int = 0
    position: Position = field(default_factory=Position)


def iter_batches(sources: list[CorpusSource], cursor: Cursor, batch_docs: int) -> Iterator[Batch]:
    """Every remaining record, from `cursor` on, in batches that never span two files; each file ends with
    a batch marked file_done (possibly empty)."""
    for s, source in enumerate(sources):
        for f, path in enumerate(source.paths):
            if (s, f) < (cursor.source, cursor.file):
                continue
            start = cursor.position if (s, f) == (cursor.source, cursor.file) else Position()
            yield from _file_batches(s, f, path, source.corpus.name, source.corpus.layout, start, batch_docs)


def _file_batches(s: int, f: int, path: str, corpus: str, layout: str, start: Position,
                  batch_docs: int) -> Iterator[Batch]:
    items: list = []
    first = last = start  # positions before the batch's first item and after its last
    try:
        for item in iter_raw(path, layout, start):
            items.append((item.number, item.payload, item.error))
            last = item.position
            if len(items) >= batch_docs or last.offset - first.offset >= BATCH_BYTES:
                yield Batch(s, f, path, corpus, layout, items, last, last.offset - first.offset, False)
                items, first = [], last
    except READ_ERRORS as exc:
        # a damaged file (say, a truncated .zst) costs its rest, counted and reported, not the whole run
        reason = f"unreadable file ({type(exc).__name__}: {str(exc)[:160]}); rest of the file skipped"
        number = items[-1][0] if items else (last.line if layout in ("jsonl", "txt") else last.records)
        items.append((number + 1, None, reason))
    yield Batch(s, f, path, corpus, layout, items, last, last.offset - first.offset, True)


# ---------------------------------------------------------------- exact dedup in ~8-14 bytes per document

class DedupSet:
    """Membership of 8-byte text hashes. A sorted numpy array (8 bytes per hash, grown in place) plus a
    small Python set of recent hashes, merged into the array when it reaches 1/16 of it, so memory stays
    near 8 bytes per unique document (about 14 at worst), far below a Python set's ~70."""

    MIN_RECENT = 1 << 16

    def __init__(self, hashes: np.ndarray | None = None):
        self._sorted = np.sort(hashes) if hashes is not None else np.empty(0, dtype=np.uint64)
        self._count = len(self._sorted)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return self._count + len(self._recent)

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Add `keys` in order; True where a key was not seen before (in earlier calls or earlier in `keys`)."""
        known = self._sorted[:self._count]
        index = np.searchsorted(known, keys)
        in_sorted = (index < self._count) & (known[np.minimum(index, max(self._count - 1, 0))] == keys) \
            if self._count else np.zeros(len(keys), dtype=bool)
        fresh = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys.tolist()):
            if not in_sorted[i] and key not in self._recent:
                self._recent.add(key)
                fresh[i] = True
        if len(self._recent) >= max(self.MIN_RECENT, self._count // 16):
            self._merge()
        return fresh

    def _merge(self) -> None:
        new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        total = self._count + len(new)
        if total > len(self._sorted):
            # ndarray.resize reallocs in place (mremap for big arrays): no second copy of the table
            self._sorted.resize(max(total, len(self._sorted) * 5 // 4), refcheck=False)
        self._sorted[self._count:total] = new
        # timsort ("stable") merges the sorted prefix with the new tail in linear time
        self._sorted[:total].sort(kind="stable")
        self._count = total
        self._recent.clear()


# ---------------------------------------------------------------- counts and the run's state

@dataclass
class SourceStats:
    """What happened to one source's records. Bad records are counted by reason in the SkipLog."""
    documents_read: int = 0
    documents: int = 0
    tokens: int = 0
    val_documents: int = 0
    val_tokens: int = 0
    too_short: int = 0
    duplicate: int = 0


class PartialFiles:
    """The run's files under temporary names: train tokens, val tokens, dedup hashes, and the state."""

    def __init__(self, opts: Options):
        self.state_path = opts.out + ".partial-state.json"
        self.paths = {"train": opts.out + ".partial", "digests": opts.out + ".partial-digests"}
        if opts.val_out:
            self.paths["val"] = opts.val_out + ".partial"
        self.files: dict[str, BinaryIO] = {}

    def open(self, lengths: dict[str, int] | None) -> None:
        """Open every file: truncated to `lengths` (resume) or emptied (fresh start)."""
        for name, path in self.paths.items():
            try:
                f = open(path, "r+b" if lengths else "wb", buffering=1 << 20)
            except OSError as exc:
                raise CorpusError(f"cannot write {path}: {exc.strerror or exc}") from None
            if lengths:
                f.truncate(lengths[name])
                f.seek(lengths[name])
            self.files[name] = f

    def lengths_ok(self, lengths: dict[str, int]) -> bool:
        return set(lengths) == set(self.paths) and all(
            os.path.isfile(p) and os.path.getsize(p) >= lengths[n] for n, p in self.paths.items())

    def sync(self) -> dict[str, int]:
        """Flush and fsync every file; their lengths, which a resumed run truncates back to."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        return {name: f.tell() for name, f in self.files.items()}

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}


def run_key(opts: Options, identity: dict) -> str:
    """A hash of everything that decides the output bytes: a state file from any other command (other
    sources, changed files, options or tokenizer) is not resumed."""
    files = [[p, *_file_stamp(p)] for s in opts.sources for p in s.paths]
    what = {"version": STATE_VERSION, "sources": [[s.spec, s.corpus.name] for s in opts.sources],
            "files": files, "tokenizer": [identity["sha256"], identity["vocab_size"]],
            "out": os.path.abspath(opts.out), "val_out": opts.val_out and os.path.abspath(opts.val_out),
            "val_fraction": opts.val_fraction, "min_tokens": opts.min_tokens, "dedup": opts.dedup,
            "clean": opts.clean and opts.clean.manifest()["decisions_sha256"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _file_stamp(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:  # an hf dataset name, not a file
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------- one run: apply results, commit, resume, publish

class Run:
    """Applies the workers' results in order: drops short and duplicate documents, splits off val, appends
    tokens to the partial files, commits the state every few seconds, and publishes at the end."""

    def __init__(self, opts: Options, identity: dict, eos_id: int):
        self.opts, self.identity, self.eos_id = opts, identity, eos_id
        self.key = run_key(opts, identity)
        self.labels = source_labels(opts.sources)
        self.partials = PartialFiles(opts)
        self.skiplog = SkipLog(strict=opts.strict)
        self.stats = [SourceStats() for _ in opts.sources]
        self.cursor = Cursor()
        self.seen = DedupSet()
        # a document is held out when its split key < val_fraction * 2**64 (train_tokenizer.py uses the same)
        self.val_threshold = min(math.ceil(opts.val_fraction * 2.0 ** 64), 2 ** 64 - 1)
        self.done = False
        self.published: list[tuple[str, str]] = []
        self.batches = self.since_commit = 0
        self.last_commit = time.monotonic()
        self.commit_every = int(os.environ.get(COMMIT_EVERY_ENV) or 0)
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV) or 0)

    def start(self) -> None:
        """Resume from the state file of the same command when there is one; else start afresh."""
        state = self._load_state()
        if state is None:
            self.partials.open(None)
            return
        position = state["cursor"]
        self.cursor = Cursor(position[0], position[1], Position(*position[2]))
        self.stats = [SourceStats(**s) for s in state["stats"]]
        for label, counts in zip(self.labels, state["skipped"]):
            self.skiplog.restore(label, counts)
        self.done = state["done"]
        if self.done:
            return
        self.partials.open(state["lengths"])
        digests = np.fromfile(self.partials.paths["digests"], dtype="<u8",
                              count=state["lengths"]["digests"] // 8)
        self.seen = DedupSet(digests.astype(np.uint64))
        kept = sum(s.documents + s.val_documents for s in self.stats)
        tqdm.write(f"resuming an interrupted run: {kept:,} documents already written; "
                   f"source {position[0] + 1}, file {position[1] + 1}, record {position[2][0]:,}", file=sys.stderr)

    def _load_state(self) -> dict | None:
        path = self.partials.state_path
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = {}
        if state.get("key") != self.key:
            tqdm.write(f"{path} is from another command (or unreadable): starting afresh", file=sys.stderr)
            return None
        if not state["done"] and not self.partials.lengths_ok(state["lengths"]):
            tqdm.write(f"the partial files beside {path} are shorter than it says: starting afresh", file=sys.stderr)
            return None
        return state

    def apply(self, enc: Encoded) -> None:
        """Count, filter, dedup, split and write one worker result (results arrive in input order)."""
        stats = self.stats[enc.source]
        stats.documents_read += enc.records
        for where, reason in enc.errors:
            self.skiplog.skip(self.labels[enc.source], where, reason)
        long_enough = enc.lengths > self.opts.min_tokens
        stats.too_short += int(len(long_enough) - long_enough.sum())
        fresh = long_enough.copy()
        if self.opts.dedup:
            fresh[long_enough] = self.seen.add_new(enc.keys[long_enough, 0])
            stats.duplicate += int(long_enough.sum() - fresh.sum())
            self.partials.files["digests"].write(enc.keys[fresh, 0].astype("<u8").tobytes())
        to_val = fresh & (enc.keys[:, 1] < self.val_threshold)
        to_train = fresh & ~to_val
        stats.documents += int(to_train.sum())
        stats.tokens += self._write_docs("train", enc, to_train)
        stats.val_documents += int(to_val.sum())
        stats.val_tokens += self._write_docs("val", enc, to_val)
        self.cursor = (Cursor(enc.source, enc.file + 1) if enc.file_done
                       else Cursor(enc.source, enc.file, enc.end))
        self._after_batch()

    def _write_docs(self, split: str, enc: Encoded, keep: np.ndarray) -> int:
        if not keep.any():
            return 0
        tokens = enc.tokens[np.repeat(keep, enc.lengths)]
        self.partials.files[split].write(tokens.tobytes())
        return len(tokens)

    def _after_batch(self) -> None:
        self.batches += 1
        self.since_commit += 1
        due = (self.since_commit >= self.commit_every if self.commit_every
               else time.monotonic() - self.last_commit >= COMMIT_SECONDS)
        if due:
            self.commit()
        if self.kill_after and self.batches >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like `kill -9`, unflushed buffers and all

    def commit(self, done: bool = False) -> None:
        """Make everything written so far durable, then record it: fsync the partial files, then replace
        the state file atomically. A crash before the replace leaves the previous state, which a resumed
        run truncates back to."""
        lengths = self.partials.sync()
        state = {"version": STATE_VERSION, "key": self.key, "done": done,
                 "cursor": [self.cursor.source, self.cursor.file, list(self.cursor.position)],
                 "lengths": lengths, "stats": [asdict(s) for s in self.stats],
                 "skipped": [self.skiplog.counts(label) for label in self.labels]}
        write_atomic_text(self.partials.state_path, json.dumps(state))
        self.since_commit = 0
        self.last_commit = time.monotonic()

    def finish(self) -> None:
        """Commit as done, then move each partial file into place and write its manifest. An empty val
        split is not published (pretrain.py would pick it up and find no window in it)."""
        if not any(s.documents for s in self.stats):
            self._nothing_usable()
        if not self.done:
            self.commit(done=True)
            self.partials.close()
            self.done = True
        self._publish("train", self.opts.out)
        if self.opts.val_out and sum(s.val_documents for s in self.stats):
            self._publish("val", self.opts.val_out)
        else:
            self._no_val_split()
        _remove(self.partials.paths["digests"])
        _remove(self.partials.state_path)

    def _nothing_usable(self) -> None:
        """No training document survived: write nothing, leave no partial file, and say what was read."""
        self.partials.close()
        for path in [*self.partials.paths.values(), self.partials.state_path]:
            _remove(path)
        read = sum(s.documents_read for s in self.stats)
        malformed = sum(sum(self.skiplog.counts(label).values()) for label in self.labels)
        raise CorpusError(
            f"no usable document in {', '.join(s.spec for s in self.opts.sources)}: {read:,} record(s) read, "
            f"{malformed:,} malformed, {sum(s.too_short for s in self.stats):,} too short (--min-tokens), "
            f"{sum(s.duplicate for s in self.stats):,} duplicate, {sum(s.val_documents for s in self.stats):,} held "
            f"out for validation; nothing written to {self.opts.out}")

    def _publish(self, split: str, final: str) -> None:
        if os.path.exists(final + ".partial"):
            _remove(manifest_path(final))  # never a new .bin beside an old manifest
            os.replace(final + ".partial", final)
        elif not os.path.exists(final):
            raise CorpusError(f"{final}.partial is gone; delete {self.partials.state_path} and run again")
        write_atomic_text(manifest_path(final), json.dumps(self.manifest(split), ensure_ascii=False, indent=2))
        self.published.append((split, final))

    def _no_val_split(self) -> None:
        if self.opts.val_out:
            _remove(self.opts.val_out + ".partial")
        path = self.opts.val_out or default_val_path(self.opts.out)
        why = "no document fell in the val split" if self.opts.val_out else "--val-fraction=0"
        if os.path.exists(path):
            tqdm.write(f"warning: {why}, but {path} from an earlier run is still there: pretrain.py would "
                       f"validate on it (delete it, or pass --val_data)", file=sys.stderr)
        elif self.opts.val_out:
            tqdm.write(f"note: {why} (too few documents for --val-fraction={self.opts.val_fraction}): "
                       f"no {path} written", file=sys.stderr)

    def close(self) -> None:
        self.partials.close()

    def manifest(self, split: str) -> dict:
        """What training checks before using a .bin (tokenizer, dtype, eos) and what the run counted."""
        train = split == "train"
        sources = with_token_offsets([self._source_manifest(i, train) for i in range(len(self.stats))])
        has_val = self.opts.val_out and any(s.val_documents for s in self.stats)
        other = (self.opts.val_out if has_val else None) if train else self.opts.out
        return {"split": split, "dtype": "uint16", "byte_order": "little", "eos_id": self.eos_id,
                "layout": "token ids only, every document followed by eos_id, no header",
                "tokenizer": self.identity,
                "tokens": sum(s["tokens"] for s in sources),
                "documents": sum(s["documents_kept"] for s in sources),
                "other_split": other and os.path.basename(other),
                "val_fraction": self.opts.val_fraction, "min_tokens": self.opts.min_tokens,
                "dedup": self.opts.dedup, "clean": self.opts.clean and self.opts.clean.manifest(),
                "sources": sources}

    def _source_manifest(self, i: int, train: bool) -> dict:
        stats, source = self.stats[i], self.opts.sources[i]
        skipped = self.skiplog.counts(self.labels[i])
        return {"name": self.labels[i], "corpus": source.corpus.name, "spec": source.spec,
                "files": source.paths, "documents_read": stats.documents_read,
                "documents_kept": stats.documents if train else stats.val_documents,
                "documents_other_split": stats.val_documents if train else stats.documents,
                "too_short": stats.too_short, "duplicate": stats.duplicate,
                "malformed": sum(skipped.values()), "malformed_by_reason": skipped,
                "tokens": stats.tokens if train else stats.val_tokens}


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- progress and the closing table

class Progress:
    """One tqdm bar per source: bytes read (MB/s), documents and tokens kept; opened by its first result."""

    def __init__(self, opts: Options, labels: list[str]):
        self.opts, self.labels = opts, labels
        self.current = -1
        self.bar: tqdm | None = None

    def update(self, enc: Encoded, stats: SourceStats) -> None:
        if enc.source != self.current:
            self.close()
            self.current = enc.source
            self.bar = tqdm(desc=self.labels[enc.source], total=_source_bytes(self.opts.sources[enc.source]),
                            unit="B", unit_scale=True, dynamic_ncols=True)
        self.bar.update(enc.bytes_read)
        self.bar.set_postfix(docs=f"{stats.documents + stats.val_documents:,}",
                             tokens=f"{stats.tokens + stats.val_tokens:,}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _source_bytes(source: CorpusSource) -> int | None:
    """Total bytes to read, when known (progress counts decompressed bytes, so not for compressed files)."""
    if source.corpus.layout == "hf" or any(p.lower().endswith(COMPRESSED_SUFFIXES) for p in source.paths):
        return None
    return sum(os.path.getsize(p) for p in source.paths)


def summary_table(run: Run) -> str:
    """Per-source counts and totals, as printed at the end of a run."""
    columns = ["source", "files", "read", "train", "val", "too short", "duplicate", "malformed", "tokens"]
    rows = []
    for i, stats in enumerate(run.stats):
        rows.append([run.labels[i], len(run.opts.sources[i].paths), stats.documents_read, stats.documents,
                     stats.val_documents, stats.too_short, stats.duplicate,
                     run.skiplog.total(run.labels[i]), stats.tokens + stats.val_tokens])
    rows.append(["total"] + [sum(r[c] for r in rows) for c in range(1, len(columns))])
    widths = [max(len(columns[c]), *(len(f"{r[c]:,}" if c else r[c]) for r in rows)) for c in range(len(columns))]
    lines = ["  ".join(h.ljust(widths[0]) if c == 0 else h.rjust(widths[c]) for c, h in enumerate(columns))]
    for r in rows:
        lines.append("  ".join(str(v).ljust(widths[0]) if c == 0 else f"{v:,}".rjust(widths[c])
                               for c, v in enumerate(r)))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def process(opts: Options) -> Run:
    """Run data_process with `opts` (resuming a matching interrupted run) and return the finished Run."""
    import sentencepiece as spm
    from chatglm_tokenizer import TokenizerError, resolve_tokenizer_dir, tokenizer_identity
    try:
        identity = tokenizer_identity(opts.tokenizer)  # loads (and checks) the tokenizer once
    except TokenizerError as exc:
        raise CorpusError(str(exc)) from None
    if identity["vocab_size"] > UINT16_LIMIT:
        raise CorpusError(f"--tokenizer {opts.tokenizer} has {identity['vocab_size']} ids; uint16 tokens allow "
                          f"at most {UINT16_LIMIT}")
    model_file = os.path.join(resolve_tokenizer_dir(opts.tokenizer), "tokenizer.model")
    eos_id = spm.SentencePieceProcessor(model_file=model_file).eos_id()  # ChatGLMTokenizer's <eos> is sp's
    if eos_id < 0:
        raise CorpusError(f"--tokenizer {opts.tokenizer} has no <eos> piece; every document must end with one")
    run = Run(opts, identity, eos_id)
    try:
        run.start()
        if not run.done:
            _tokenize_all(run, model_file, eos_id)
        run.finish()
    finally:
        run.close()
    return run


def _tokenize_all(run: Run, model_file: str, eos_id: int) -> None:
    opts = run.opts
    batches = iter_batches(opts.sources, run.cursor, opts.batch_docs)
    if opts.clean is not None:  # the removed records never reach a worker
        batches = (b._replace(items=opts.clean.keep_items(b.source, b.file, b.items)) for b in batches)
    progress = Progress(opts, run.labels)
    # closing(): on an error (say --strict) the worker pool stops now, not whenever the generator is collected
    edit = opts.clean.edit() if opts.clean is not None else None
    with contextlib.closing(ordered_map(encode_batch, batches, opts.workers, init_worker, (model_file, eos_id, edit))) as results:
        try:
            for enc in results:
                run.apply(enc)
                progress.update(enc, run.stats[enc.source])
        finally:
            progress.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH_OR_GLOB",
                        help="a corpus to include (repeatable; see --list-corpora); default: the bundled sample")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output token file (default %(default)s)")
    parser.add_argument("--val-out", default=None, help="held-out token file (default: derived from --out)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"fraction of documents held out, chosen by a hash of their text (0 disables; "
                             f"default {DEFAULT_VAL_FRACTION}, or {SAMPLE_VAL_FRACTION} for the bundled sample)")
    parser.add_argument("--min-tokens", type=int, default=5,
                        help="keep a document when its tokens plus <eos> are more than this")
    parser.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--workers", type=int, default=_usable_cpus(),
                        help="tokenizer processes (default: the CPUs this process may use, %(default)s)")
    parser.add_argument("--batch-docs", type=int, default=512, help="documents per worker batch")
    parser.add_argument("--tokenizer", default="chatglm_tokenizer", help="tokenizer folder")
    parser.add_argument("--clean", default=None, metavar="DIR",
                        help="apply data_clean.py's decisions in DIR: tokenize only the documents they keep")
    parser.add_argument("--list-corpora", action="store_true", help="describe the known corpus formats")
    return parser.parse_args(argv)


def _usable_cpus() -> int:
    # sched_getaffinity respects container and taskset limits; cpu_count does not
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_options(args: argparse.Namespace) -> Options:
    """Check the flags and resolve every --corpus to its files (CorpusError naming the flag otherwise)."""
    if args.val_fraction is None:
        args.val_fraction = DEFAULT_VAL_FRACTION if args.corpus else SAMPLE_VAL_FRACTION
    if not 0 <= args.val_fraction < 1:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for flag, value, least in (("--min-tokens", args.min_tokens, 0), ("--workers", args.workers, 1),
                               ("--batch-docs", args.batch_docs, 1)):
        if value < least:
            raise CorpusError(f"{flag} must be at least {least}, got {value}")
    specs = args.corpus or sample_corpus_specs()
    sources = [parse_corpus_spec(spec) for spec in specs]
    val_out = (args.val_out or default_val_path(args.out)) if args.val_fraction > 0 else None
    for path in [args.out] + ([val_out] if val_out else []):
        ensure_output_folder(path)
    if val_out and os.path.abspath(val_out) == os.path.abspath(args.out):
        raise CorpusError("--val-out must differ from --out")
    clean = None
    if args.clean:
        clean = CleanPlan.load(args.clean, sources)
    return Options(sources, args.out, val_out, args.val_fraction, args.min_tokens, not args.no_dedup,
                   args.strict, args.workers, args.batch_docs, args.tokenizer, clean)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_corpora:
        print(describe_corpora())
        return 0
    try:
        run = process(build_options(args))
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last commit", file=sys.stderr)
        return 130
    print(summary_table(run))
    for split, path in run.published:
        manifest = run.manifest(split)
        print(f"wrote {path}: {manifest['tokens']:,} tokens, {manifest['documents']:,} documents "
              f"(manifest {manifest_path(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
