"""Conversation corpora → CSV: the machinery sft_data_process.py and dpo_data_process.py share.

Named readers (a file layout from corpus_io plus a function turning one record into rows), `NAME=PATH_OR_GLOB`
sources, streaming with malformed records skipped + counted (SkipLog), exact dedup on a digest, an atomic
CSV (OUT.tmp, fsync, rename; removed on failure) with every field quoted, and the per-source summary table.

    from sft_corpus import Reader, parse_source, iter_parsed, write_csv_atomic, summary_table
    source = parse_source("belle=/d/belle.json", get_reader)        # get_reader: the stage's registry
    stats = write_csv_atomic(out, COLUMNS, lambda writer: convert(sources, writer))
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, NamedTuple, Protocol, TextIO, TypeVar

from tqdm import tqdm

from corpus_io import (READ_ERRORS, BadRecord, CorpusError, SkipLog, expand_paths, file_layout, iter_records, json_type,
                       str_field)

# json.loads accepts "\ud83d" escapes that are not characters; they cannot be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The bundled samples live beside the scripts, so their bare commands work from any working directory.
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_data", "sample")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
T = TypeVar("T")


# ---------------------------------------------------------------- record fields

def clean_text(text: str, label: str) -> str:
    """`text` stripped; BadRecord when it holds a lone surrogate (not valid Unicode, cannot be written)."""
    if _SURROGATE.search(text):
        raise BadRecord(f"invalid Unicode (field '{label}' holds a lone surrogate escape)")
    return text.strip()


def text_field(record: Any, field: str, label: str | None = None) -> str:
    """A string field, stripped; BadRecord naming the field when absent, not a string or not valid Unicode."""
    return clean_text(str_field(record, field, label), label or field)


def list_field(record: Any, field: str) -> list:
    """record[field] as a list; BadRecord naming the field when the record is not an object or it is no array."""
    if not isinstance(record, dict):
        raise BadRecord(f"not a JSON object (got {json_type(record)})")
    if field not in record:
        raise BadRecord(f"missing field '{field}'")
    if not isinstance(record[field], list):
        raise BadRecord(f"field '{field}' is not an array (got {json_type(record[field])})")
    return record[field]


def history_json(turns: list[tuple[str, str]]) -> str:
    """The `history` column: earlier [prompt, answer] turns as a JSON list (`[]` for none)."""
    return json.dumps([list(turn) for turn in turns], ensure_ascii=False)


# ---------------------------------------------------------------- readers and sources

@dataclass(frozen=True)
class Reader:
    """A named corpus format: its file layout (a corpus_io layout, or "auto": by each file's name and first
    byte, corpus_io.file_layout) and how one record becomes the stage's row."""
    name: str
    layout: str
    parse: Callable[[Any], Any]
    about: str


class Source(NamedTuple):
    """One --corpus argument resolved: the name written to `source`, its reader, and its files."""
    name: str
    reader: Reader
    paths: list[str]


def parse_source(spec: str, get_reader: Callable[[str], Reader]) -> Source:
    """`NAME=PATH_OR_GLOB` → Source; CorpusError for a bad spec, an unknown name or a path matching nothing."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise CorpusError(f"--corpus {spec!r}: expected NAME=PATH_OR_GLOB (NAME one of --list-corpora)")
    return Source(name, get_reader(name), expand_paths(path))


def find_reader(name: str, registry: dict[str, Reader], generic: dict[str, str],
                make_parse: Callable[..., Callable[[Any], Any]], what: str, stage: str) -> Reader:
    """The reader for corpus `name`: one of `registry`, or a generic `jsonl:F1,F2,...` / `json:F1,F2,...` one
    reading the fields named, as many as the `generic` entries name (`make_parse(*fields)` parses a record).
    CorpusError naming the known readers otherwise."""
    if name in registry:
        return registry[name]
    kind, _, arg = name.partition(":")
    fields = arg.split(",")
    for pattern, about in generic.items():
        if pattern.partition(":")[0] == kind and len(fields) == pattern.count(",") + 1 and all(fields):
            return Reader(name, "jsonl" if kind == "jsonl" else "json_array", make_parse(*fields), about)
    known = ", ".join(list(registry) + list(generic))
    raise CorpusError(f"unknown {what} corpus '{name}'; known: {known} (see python {stage} --list-corpora)")


def describe_registry(entries: list[tuple[str, str]]) -> str:
    """Readers as text, one a paragraph (for --list-corpora)."""
    lines = [f"{name}\n    {about}" for name, about in entries]
    lines.append("compressed files (.gz .bz2 .xz .zst) are read transparently; use --corpus NAME=PATH_OR_GLOB")
    return "\n".join(lines)


class Counts(Protocol):
    read: int
    malformed: int


def iter_parsed(path: str, source: str, reader: Reader, skiplog: SkipLog, stats: Counts) -> Iterator[Any]:
    """reader.parse of each well-formed record of one file; malformed records go to `skiplog` (which raises
    in strict mode) and count in stats.malformed; every record counts in stats.read."""
    layout = file_layout(path) if reader.layout == "auto" else reader.layout
    records = tqdm(iter_records(path, layout), desc=f"{source} {os.path.basename(path)}",
                   unit=" rec", mininterval=1.0)
    try:
        for record in records:
            stats.read += 1
            try:
                if record.error is not None:
                    raise BadRecord(record.error)
                parsed = reader.parse(record.value)
            except BadRecord as exc:
                stats.malformed += 1
                skiplog.skip(source, record.where, str(exc))
                continue
            yield parsed
    except READ_ERRORS as exc:
        # an unreadable or corrupt (compressed) file: stop, rather than keep a silently partial corpus
        raise CorpusError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- writing

class DedupWriter:
    """Writes CSV rows (every field quoted), each exact duplicate of `key` only once."""

    def __init__(self, stream: TextIO, columns: tuple[str, ...]):
        # QUOTE_ALL: every field quoted, so no reader has to guess whether an empty field is text
        self.writer = csv.writer(stream, quoting=csv.QUOTE_ALL, lineterminator="\n")
        self.writer.writerow(columns)
        self.seen: set[int] = set()

    def write(self, row: tuple[str, ...], key: tuple[str, ...]) -> bool:
        """Write `row`; False (nothing written) when a row with the same key was written before."""
        # 8 bytes of blake2b: collisions stay negligible (~1e-7 at 2M rows) while memory stays small
        text = json.dumps(list(key), ensure_ascii=False).encode("utf-8")
        digest = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
        if digest in self.seen:
            return False
        self.seen.add(digest)
        self.writer.writerow(row)
        return True


def _open_tmp(out: str) -> TextIO:
    """OUT.tmp opened for writing (folders made); CorpusError when the output cannot be written."""
    if os.path.isdir(out):
        raise CorpusError(f"cannot write {out}: it is a folder")
    parent = os.path.dirname(out) or "."
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise CorpusError(f"cannot write {out}: {parent} is not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
        return open(out + ".tmp", "w", encoding="utf-8", newline="")
    except OSError as exc:
        raise CorpusError(f"cannot write {out}: {exc.strerror or exc}") from None


def write_csv_atomic(out: str, columns: tuple[str, ...], fill: Callable[[DedupWriter], T]) -> T:
    """fill(writer) writes the rows of `out`, atomically: OUT.tmp, fsync, rename; removed on any failure."""
    tmp = out + ".tmp"
    stream = _open_tmp(out)
    try:
        with stream:
            result = fill(DedupWriter(stream, columns))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise CorpusError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return result


# ---------------------------------------------------------------- report

def summary_table(stats: dict[str, Any], skiplog: SkipLog, notes: tuple[str, ...] = ()) -> str:
    """One line per source plus a total (columns: the fields of the stats dataclass), the notes, then the
    malformed records of each source by reason."""
    kind = type(next(iter(stats.values()))) if stats else None
    names = [f.name for f in fields(kind)] if kind else []
    width = max([len("source"), len("total")] + [len(s) for s in stats])
    lines = [f"{'source':<{width}} " + " ".join(f"{n:>10}" for n in names)]
    if kind:
        total = kind(**{n: sum(getattr(s, n) for s in stats.values()) for n in names})
        for source, counts in [*stats.items(), ("total", total)]:
            lines.append(f"{source:<{width}} " + " ".join(f"{getattr(counts, n):>10,}" for n in names))
    lines += notes
    for source in stats:
        for reason, count in skiplog.counts(source).items():
            lines.append(f"{source}: malformed, {reason}: {count:,}")
    return "\n".join(lines)


def convert_corpora(specs: list[str], out: str, get_reader: Callable[[str], Reader],
                    write: Callable[[list[Source]], dict[str, Any]], skiplog: SkipLog, note: str, unit: str) -> int:
    """A conversion stage's run: resolve the --corpus specs, write the CSV `out` (`write`), print the summary
    table (with `note` explaining the stage's own column) and what was written. The exit code: 0, or 1 when
    an error stopped it or nothing was kept (the CSV then holds only its header), 130 when interrupted."""
    started = time.perf_counter()
    try:
        stats = write([parse_source(spec, get_reader) for spec in specs])
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; {out} left as it was", file=sys.stderr)
        return 130
    print(summary_table(stats, skiplog, (note,)))
    kept = sum(s.kept for s in stats.values())
    print(f"wrote {kept:,} {unit} to {out} ({os.path.getsize(out) / 1e6:.2f} MB) "
          f"in {time.perf_counter() - started:.1f}s")
    if kept == 0:
        print(f"error: no {unit} kept; {out} holds only its header", file=sys.stderr)
        return 1
    return 0


def count_arg(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value
