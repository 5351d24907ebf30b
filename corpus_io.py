"""Reading raw corpora: shared by data_process.py, sft_data_process.py and train_tokenizer.py.

    from corpus_io import expand_paths, iter_records, SkipLog
    log = SkipLog()
    for path in expand_paths("data/sample/*.jsonl"):              # a file, a folder or a glob
        for rec in iter_records(path, "jsonl"):                   # "jsonl" | "json_array" | "txt"
            if rec.error:
                log.skip("mine", rec.where, rec.error)            # prints "file:line: reason", counts it
                continue
            use(rec.value)

    from corpus_io import iter_corpus_texts                       # the corpus registry, as data_process.py
    for text in iter_corpus_texts(["wiki=/d/wikipedia-cn-20230720-filtered.json", "txt=notes.txt"]):
        ...
    python data_process.py --list-corpora                         # the registry, each format described

Files are streamed (whole-file JSON arrays through ijson, never `json.load`), compressed files
(.gz .bz2 .xz .zst) are read transparently, and a bad record comes back as an error naming its file and
line instead of raising, so callers can skip, count and report it (SkipLog) or stop on it (strict).
"""
from __future__ import annotations

import ast
import bz2
import codecs
import glob
import gzip
import hashlib
import io
import itertools
import json
import lzma
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple

import ijson
import zstandard
from tqdm import tqdm

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_CORPORA = ["medical=data/sample/medical.jsonl", "wiki=data/sample/wiki.json",
                  "baidubaike=data/sample/baike.jsonl"]
LAYOUTS = ("jsonl", "json_array", "txt", "hf")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_READ_BUFFER = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
# A byte that is not UTF-8, inside a JSON array, reaches ijson as this noncharacter (never in interchange text)
# and two hex digits naming the byte, so only the record holding it is skipped (see _Utf8Marker).
_INVALID_MARK = "\ufdd0"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")   # how the surrogateescape error handler decodes such a byte
# What reading a damaged or unreadable file raises (truncated or corrupt .gz/.bz2/.xz/.zst, permissions).
# The readers let these through: each caller decides whether that stops it or skips the rest of the file.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


class CorpusError(Exception):
    """One-line user-facing error: bad path or glob, unknown corpus, unwritable output, strict-mode bad record."""


class BadRecord(ValueError):
    """A record that cannot be turned into text; the message is the reason printed as `file:line: reason`.
    Reasons read `kind (detail)`: counts are kept per kind (the part before ` (`)."""


class Record(NamedTuple):
    """One record of a file. `where` is "path:LINE" (jsonl, txt) or "path:item N" (json_array);
    `error` is set (and `value` None) when the record is unreadable."""
    where: str
    value: Any
    error: str | None


class Position(NamedTuple):
    """Where a reader stands in one file, so a run can resume there: records consumed, bytes of the
    (decompressed) stream consumed, and the number of the last line consumed. Line layouts resume by
    seeking to `offset` (compressed: skipping bytes without parsing); JSON arrays re-parse and skip
    `records` items (their `offset` only measures progress)."""
    records: int = 0
    offset: int = 0
    line: int = 0


class RawItem(NamedTuple):
    """One unparsed record: the bytes of a line (jsonl, txt) or an already parsed value (json_array, hf).
    `error` is set (and `payload` None) for a JSON array item holding bytes that are not UTF-8, or for a
    file-level failure (the reader stops after it); `position` is the resume point after it."""
    number: int
    payload: Any
    error: str | None
    position: Position


# ---------------------------------------------------------------- paths and files

def expand_paths(spec: str) -> list[str]:
    """A file, a folder (its files, sorted) or a glob (sorted); CorpusError when nothing matches."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if not n.startswith("."))
        files = [os.path.join(spec, n) for n in names if os.path.isfile(os.path.join(spec, n))]
        if not files:
            raise CorpusError(f"{spec}: the folder holds no files")
        return files
    if not glob.has_magic(spec):
        raise CorpusError(f"{spec}: no such file or folder")
    files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not files:
        raise CorpusError(f"{spec}: no file matches this pattern")
    return files


def open_binary(path: str) -> BinaryIO:
    """Open `path` for reading bytes, decompressing .gz .bz2 .xz .zst (by extension) on the fly."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdReader(open(path, "rb")), _READ_BUFFER)
    return open(path, "rb", buffering=_READ_BUFFER)


def file_layout(path: str) -> str:
    """"jsonl", "json_array" or "txt" by the name (compression suffix aside): .jsonl, .json, anything else.
    A .json file is read to its first non-blank byte: "[" is a JSON array, else JSON Lines (shibing624/
    medical names its JSON Lines files .json)."""
    name = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(".jsonl"):
        return "jsonl"
    if not name.endswith(".json"):
        return "txt"
    with open_binary(path) as f:
        while chunk := f.read(1 << 16):
            head = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")   # whitespace, a UTF-8 byte-order mark
            if head:
                return "json_array" if head.startswith(b"[") else "jsonl"
    return "jsonl"


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst stream frame after frame. zstandard's own stream_reader ends quietly on a
    truncated file; this raises ZstdError there instead, so a damaged shard is never silently cut short."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._context = zstandard.ZstdDecompressor()
        self._frame: Any = None
        self._out, self._pos, self._eof = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out) and not self._eof:
            self._decompress_more()
        count = min(len(buffer), len(self._out) - self._pos)
        buffer[:count] = self._out[self._pos:self._pos + count]
        self._pos += count
        return count

    def _decompress_more(self) -> None:
        chunk = self._raw.read(1 << 18)
        if not chunk:
            if self._frame is not None and not self._frame.eof:
                raise zstandard.ZstdError("the file ends in the middle of a zstd frame (truncated?)")
            self._eof = True
            return
        pieces = []
        while chunk:
            if self._frame is None or self._frame.eof:
                self._frame = self._context.decompressobj()
            pieces.append(self._frame.decompress(chunk))
            chunk = self._frame.unused_data if self._frame.eof else b""
        self._out, self._pos = b"".join(pieces), 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def ensure_output_folder(path: str) -> None:
    """Create the folder that will hold output file `path`; CorpusError (one line) when that is impossible, so
    a run fails before any work rather than at its end."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise CorpusError(f"the output folder {folder} is not writable")


def write_atomic_text(path: str, text: str) -> None:
    """Write `text` to `path` through `path.tmp` + fsync + os.replace, so `path` is never half-written."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CorpusError(f"cannot write {path}: {exc.strerror or exc}") from None


def replace_folder(tmp: str, out: str) -> None:
    """Move the finished folder `tmp` to `out` (same file system); an older `out` is swapped aside first, then
    removed, so `out` is always either the old folder or the new one, never half-written."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-old-", dir=os.path.dirname(os.path.abspath(out)))
        os.replace(out, os.path.join(old, "previous"))
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old)


# ---------------------------------------------------------------- records

def where_of(path: str, layout: str, number: int) -> str:
    """The `file:line` label of record `number` (1-based) of `path`."""
    return f"{path}:item {number}" if layout in ("json_array", "hf") else f"{path}:{number}"


def iter_raw(path: str, layout: str, start: Position | None = None) -> Iterator[RawItem]:
    """Unparsed records of `path` from `start` on: what data_process.py ships to its workers to parse."""
    if layout in ("jsonl", "txt"):
        return _iter_lines(path, start or Position())
    if layout == "json_array":
        return _iter_json_array(path, start or Position())
    if layout == "hf":
        return _iter_hf(path, start or Position())
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def parse_payload(layout: str, payload: Any) -> Any:
    """The value of a RawItem payload: a line decoded (and JSON-parsed for jsonl); BadRecord if unreadable."""
    if layout not in ("jsonl", "txt"):
        return payload
    try:
        line = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"invalid UTF-8 (byte 0x{payload[exc.start]:02x} at byte {exc.start + 1} of the line)") \
            from None
    if layout == "txt":
        return line.strip()
    try:
        return json.loads(line.rstrip("\r\n"))  # a newline inside an unterminated string misleads the message
    except json.JSONDecodeError as exc:
        raise BadRecord(f"malformed JSON ({exc.msg} at column {exc.colno})") from None


def iter_records(path: str, layout: str) -> Iterator[Record]:
    """Records of one file. Blank lines are ignored; a malformed line or invalid UTF-8 (a line, or an item
    of a JSON array) yields an error record and reading goes on; a malformed JSON array yields one error
    record and ends that file."""
    for item in iter_raw(path, layout):
        where = where_of(path, layout, item.number)
        if item.error is not None:
            yield Record(where, None, item.error)
            continue
        try:
            yield Record(where, parse_payload(layout, item.payload), None)
        except BadRecord as exc:
            yield Record(where, None, str(exc))


def _iter_lines(path: str, start: Position) -> Iterator[RawItem]:
    records, offset, line_no = start
    with open_binary(path) as f:
        _skip_bytes(f, offset)
        for raw in f:
            offset += len(raw)
            line_no += 1
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark some Windows tools write
            if not raw.strip():
                continue
            records += 1
            yield RawItem(line_no, raw, None, Position(records, offset, line_no))


def _skip_bytes(f: BinaryIO, count: int) -> None:
    """Move `f` forward `count` bytes: a seek for plain files, reading and dropping for compressed ones."""
    if count and f.seekable() and not isinstance(f, (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile)):
        f.seek(count)
        return
    while count > 0:
        chunk = f.read(min(count, _READ_BUFFER))
        if not chunk:
            break
        count -= len(chunk)


class _Utf8Marker:
    """Turns a byte stream into valid UTF-8 for ijson, which otherwise stops the whole file at the first
    byte that is not UTF-8: each such byte becomes _INVALID_MARK and its value in hex. Clean chunks pass
    through unchanged; `seen` says whether any byte was marked (only then need records be checked)."""

    def __init__(self) -> None:
        self._pending = b""   # the start of a character that the next chunk completes
        self.seen = False

    def feed(self, data: bytes, final: bool) -> bytes:
        """The UTF-8 of `data` (after what was pending) as far as its characters are complete."""
        data = self._pending + data if self._pending else data
        try:
            used = codecs.utf_8_decode(data, "strict", final)[1]
            out = data[:used]
        except UnicodeDecodeError:
            self.seen = True
            text, used = codecs.utf_8_decode(data, "surrogateescape", final)
            marked = _ESCAPED_BYTE.sub(lambda m: f"{_INVALID_MARK}{ord(m.group()) - 0xdc00:02x}", text)
            out = marked.encode("utf-8")
        self._pending = data[used:]
        return out


class _CountingReader:
    """A read() pass-through for ijson that counts the bytes of the original stream (for progress),
    remembers its first non-blank byte (to tell a JSON array from other JSON) and marks bytes that are
    not UTF-8 (see _Utf8Marker)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.count = 0
        self.first = b""
        self.utf8 = _Utf8Marker()

    def read(self, size: int = -1) -> bytes:
        while True:
            data = self.stream.read(size)
            self.count += len(data)
            if not self.first and data.strip():
                self.first = data.strip()[:1]
            out = self.utf8.feed(data, final=not data)
            if out or not data:   # b"" means the end to ijson: read on while only a partial character came
                return out


def _marked(text: str, place: str) -> str | None:
    """The skip reason when `text` holds a byte _Utf8Marker marked, naming the byte and `place`."""
    at = text.find(_INVALID_MARK)
    return None if at < 0 else f"invalid UTF-8 (byte 0x{text[at + 1:at + 3]} in {place})"


def _invalid_utf8(value: Any, field: str = "") -> str | None:
    """Why a parsed record is skipped when one of its strings or field names holds a marked byte, else None.
    `field` is the path to `value` (`sections[0].title`), empty for the record itself."""
    if isinstance(value, str):
        return _marked(value, f"field '{field}'" if field else "the record")
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{field}.{key}" if field else key
            reason = _marked(key, f"a field name of '{field}'" if field else "a field name") \
                or _invalid_utf8(item, name)
            if reason:
                return reason
    elif isinstance(value, list):
        for i, item in enumerate(value):
            reason = _invalid_utf8(item, f"{field}[{i}]")
            if reason:
                return reason
    return None


def _ijson_message(exc: Exception) -> str:
    """The first line of an ijson error. yajl hands over its message as a bytes repr when the quoted
    context cuts a character in two; that is decoded back to text."""
    message = str(exc).strip()
    if message[:2] in ("b'", 'b"'):
        try:
            message = ast.literal_eval(message).decode("utf-8", "replace").strip()
        except (ValueError, SyntaxError):
            pass
    return message.splitlines()[0][:120] if message else type(exc).__name__


def _iter_json_array(path: str, start: Position) -> Iterator[RawItem]:
    """Items of a whole-file JSON array, streamed. An item holding bytes that are not UTF-8 comes back as
    an error and reading goes on; malformed JSON ends the file with one error."""
    number = 0
    with open_binary(path) as f:
        reader = _CountingReader(f)
        items = ijson.items(reader, "item", use_float=True)
        while True:
            try:
                value = next(items)
            except StopIteration:
                break
            except (ijson.JSONError, UnicodeDecodeError, ValueError) as exc:
                reason = f"malformed JSON array ({_ijson_message(exc)}); rest of the file skipped"
                yield RawItem(number + 1, None, reason, Position(number + 1, reader.count))
                return
            number += 1
            if number > start.records:
                invalid = _invalid_utf8(value) if reader.utf8.seen else None
                yield RawItem(number, None if invalid else value, invalid, Position(number, reader.count))
        if reader.first not in (b"[", b""):
            yield RawItem(1, None, "not a JSON array (the file must be one [...] of records)",
                          Position(1, reader.count))


def _iter_hf(dataset: str, start: Position) -> Iterator[RawItem]:
    """A Hugging Face dataset streamed (train split): for users online; offline it is one clear error."""
    try:
        import datasets
        import huggingface_hub.utils
        # their retry chatter would bury the one line that matters
        datasets.logging.set_verbosity_error()
        huggingface_hub.utils.logging.set_verbosity_error()
        stream = datasets.load_dataset(dataset, split="train", streaming=True)
        if start.records:
            stream = stream.skip(start.records)
        records = iter(stream)
        first = next(records, None)
    except Exception as exc:  # offline, unknown dataset, missing dependency: all end the same way
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CorpusError(f"hf:{dataset}: cannot stream it from the Hugging Face hub ({first_line})") from None
    values = records if first is None else itertools.chain([first], records)
    for number, value in enumerate(values, start.records + 1):
        yield RawItem(number, value, None, Position(number))


# ---------------------------------------------------------------- record → text

def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages ("null", "array", ...)."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def str_field(record: Any, field: str, label: str | None = None) -> str:
    """record[field] as a string; BadRecord naming the field when the record is not an object, the field
    is missing, or it is not a string."""
    label = label or field
    if not isinstance(record, dict):
        raise BadRecord(f"not a JSON object (got {json_type(record)})")
    if field not in record:
        raise BadRecord(f"missing field '{label}'")
    value = record[field]
    if not isinstance(value, str):
        raise BadRecord(f"field '{label}' is not a string (got {json_type(value)})")
    return value


def field_text(record: Any, field: str) -> str:
    """The text of one string field (wiki, c4_zh, medical, jsonl:FIELD, json:FIELD, hf:...)."""
    return str_field(record, field)


def line_text(record: Any) -> str:
    """A plain-text line is its own document (txt)."""
    return record


def baike_text(record: Any) -> str:
    """BaiduBaike, in the seed's layout: `title：summary` then `section title：content。` per section.
    A null summary counts as empty (the seed then dropped the title as well; we keep it)."""
    title = str_field(record, "title")
    summary = record.get("summary")
    if summary is not None and not isinstance(summary, str):
        raise BadRecord(f"field 'summary' is not a string (got {json_type(summary)})")
    sections = record.get("sections")
    if sections is None:
        sections = []
    if not isinstance(sections, list):
        raise BadRecord(f"field 'sections' is not an array (got {json_type(sections)})")
    parts = [f"{title}：{summary or ''}"]
    for i, section in enumerate(sections):
        head = str_field(section, "title", f"sections[{i}].title")
        body = str_field(section, "content", f"sections[{i}].content")
        parts.append(f"{head}：{body}。")
    return "".join(parts)


def title_content_text(record: Any) -> str:
    """WuDao: title followed directly by content, as the seed did."""
    return str_field(record, "title") + str_field(record, "content")


def qa_text(record: Any) -> str:
    """shibing624/medical finetune as pretraining text: the question (instruction, then input when
    present), a newline, the answer (output)."""
    question = "\n".join(p for p in (str_field(record, "instruction"), str_field(record, "input")) if p)
    return question + "\n" + str_field(record, "output")


# ---------------------------------------------------------------- the corpus registry

@dataclass(frozen=True)
class Corpus:
    """A named corpus format: how files are laid out and how one record becomes one document."""
    name: str
    layout: str
    extract: Callable[[Any], str]
    about: str


PRETRAIN_CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("wiki", "json_array", partial(field_text, field="completion"),
           "pleisto/wikipedia-cn-20230720-filtered: one whole-file JSON array of {\"completion\", \"source\"}; "
           "text = completion"),
    Corpus("baidubaike", "jsonl", baike_text,
           "BaiduBaiKe 563w: JSON Lines {\"title\", \"summary\" (may be null), \"sections\": [{\"title\", "
           "\"content\"}]}; text = title：summary + section title：content。 ..."),
    Corpus("c4_zh", "jsonl", partial(field_text, field="text"),
           "C4 Chinese: JSON Lines {\"text\", ...}, usually chinese-c4-00NN-of-0096.jsonl.zst; text = text"),
    Corpus("wudao", "json_array", title_content_text,
           "WuDaoCorpus2.0_base_200G: each part-*.json one JSON array of {\"title\", \"content\", ...}; "
           "text = title + content"),
    Corpus("medical", "jsonl", partial(field_text, field="text"),
           "shibing624/medical pretrain split (train_encyclopedia.json, medical_book_zh.json): "
           "JSON Lines {\"text\"}; text = text"),
    Corpus("medical_qa", "jsonl", qa_text,
           "shibing624/medical finetune split as pretraining text: JSON Lines {\"instruction\", \"input\", "
           "\"output\"}; text = instruction + input, newline, output"),
]}

GENERIC_CORPORA = {
    "jsonl:FIELD": "JSON Lines, one object a line; text = the string field FIELD",
    "json:FIELD": "one whole-file JSON array of objects (streamed); text = the string field FIELD",
    "txt": "plain UTF-8 text, one document per non-empty line",
    "hf:DATASET[:FIELD]": "a Hugging Face dataset streamed with datasets.load_dataset(streaming=True), "
                          "train split; text = FIELD (default text). Needs network access",
}


def get_corpus(name: str) -> Corpus:
    """The registry entry for a corpus name (`wiki`, `jsonl:content`, `hf:user/set:field`, ...)."""
    if name in PRETRAIN_CORPORA:
        return PRETRAIN_CORPORA[name]
    kind, _, arg = name.partition(":")
    if kind in ("jsonl", "json") and arg:
        return Corpus(name, "jsonl" if kind == "jsonl" else "json_array", partial(field_text, field=arg),
                      GENERIC_CORPORA[f"{kind}:FIELD"])
    if name == "txt":
        return Corpus(name, "txt", line_text, GENERIC_CORPORA["txt"])
    if kind in ("jsonl", "json", "hf") and not arg:
        raise CorpusError(f"corpus '{name}' needs a field: {kind}:FIELD" if kind != "hf"
                          else "corpus 'hf' needs a dataset: hf:DATASET[:FIELD]")
    if kind == "hf" and arg:
        field = arg.split(":", 1)[1] if ":" in arg else "text"
        return Corpus(name, "hf", partial(field_text, field=field), GENERIC_CORPORA["hf:DATASET[:FIELD]"])
    known = ", ".join(list(PRETRAIN_CORPORA) + list(GENERIC_CORPORA))
    raise CorpusError(f"unknown corpus '{name}'; known: {known} (see python data_process.py --list-corpora)")


def describe_corpora() -> str:
    """The registry as text, one corpus a paragraph (for --list-corpora)."""
    entries = [(c.name, c.about) for c in PRETRAIN_CORPORA.values()] + list(GENERIC_CORPORA.items())
    lines = [f"{name}\n    {about}" for name, about in entries]
    lines.append("compressed files (.gz .bz2 .xz .zst) are read transparently; "
                 "use --corpus NAME=PATH_OR_GLOB (hf:DATASET[:FIELD] takes no path)")
    return "\n".join(lines)


def extract_text(corpus: Corpus, value: Any) -> str:
    """The document text of one parsed record; BadRecord when the record does not fit or is empty."""
    text = corpus.extract(value)
    if not text.strip():
        raise BadRecord("empty document")
    surrogate = _SURROGATE.search(text)
    if surrogate:  # json.loads accepts "\ud83d" escapes that are no character and cannot be encoded
        raise BadRecord(f"invalid Unicode (lone surrogate \\u{ord(surrogate.group()):04x})")
    return text


class CorpusSource(NamedTuple):
    """One --corpus argument resolved: its corpus format and the files (or the hf dataset name) to read."""
    spec: str
    corpus: Corpus
    paths: list[str]


def parse_corpus_spec(spec: str) -> CorpusSource:
    """`NAME=PATH_OR_GLOB` (or `hf:DATASET[:FIELD]`) → a CorpusSource; CorpusError when it names an unknown
    corpus or matches no file."""
    if spec.startswith("hf:") and "=" not in spec:
        corpus = get_corpus(spec)
        return CorpusSource(spec, corpus, [spec[3:].split(":", 1)[0]])
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise CorpusError(f"--corpus {spec!r}: expected NAME=PATH_OR_GLOB (or hf:DATASET[:FIELD])")
    corpus = get_corpus(name)
    if corpus.layout == "hf":
        raise CorpusError(f"--corpus {spec!r}: hf:DATASET[:FIELD] takes no =PATH")
    return CorpusSource(spec, corpus, expand_paths(path))


def source_labels(sources: list[CorpusSource]) -> list[str]:
    """Each source's name in counts and tables: its corpus name, numbered when a name repeats."""
    names = [s.corpus.name for s in sources]
    return [n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}" for i, n in enumerate(names)]


def iter_source_texts(source: CorpusSource, skiplog: SkipLog | None = None) -> Iterator[str]:
    """Document texts of one resolved source, in file and record order; bad records go to `skiplog`."""
    for path in source.paths:
        for item in iter_raw(path, source.corpus.layout):
            where = where_of(path, source.corpus.layout, item.number)
            try:
                if item.error is not None:
                    raise BadRecord(item.error)
                yield extract_text(source.corpus, parse_payload(source.corpus.layout, item.payload))
            except BadRecord as exc:
                if skiplog is not None:
                    skiplog.skip(source.corpus.name, where, str(exc))


def iter_corpus_texts(specs: Iterable[str], skiplog: SkipLog | None = None) -> Iterator[str]:
    """Document texts of the same `--corpus` specs data_process.py takes, source after source. Every spec
    is resolved first, so a bad one fails before any reading."""
    sources = [parse_corpus_spec(spec) for spec in specs]
    for source in sources:
        yield from iter_source_texts(source, skiplog)


def sample_corpus_specs() -> list[str]:
    """The bundled sample corpora as --corpus specs with absolute paths (the default when none is given)."""
    specs = []
    for spec in SAMPLE_CORPORA:
        name, path = spec.split("=", 1)
        specs.append(f"{name}={os.path.join(REPO_DIR, path)}")
    return specs


def text_keys(text: str) -> bytes:
    """16-byte hash of the whitespace-normalised text: bytes 0-7 the dedup key, 8-15 the val-split key."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


# ---------------------------------------------------------------- work in parallel, results in order

def ordered_map(fn: Callable, items: Iterable, workers: int, initializer: Callable, initargs: tuple) -> Iterator:
    """fn over `items` in `workers` processes (each set up by initializer(*initargs)), results in input order,
    at most ~2 tasks per worker in flight (Pool.imap would read the whole input ahead into its queue). One worker
    runs in this process."""
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = context.Pool(workers, initializer=_start_worker, initargs=(initializer, initargs, os.getpid()))
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def _start_worker(initializer: Callable, initargs: tuple, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    initializer(*initargs)


def _exit_with_parent(parent_pid: int) -> None:
    # A killed parent (kill -9) leaves pool workers blocked on their task queue forever; poll and follow it.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


# ---------------------------------------------------------------- counting skipped records

class SkipLog:
    """Counts skipped records per source and reason kind, prints the first few of each source as
    `where: reason` (stderr, through tqdm so bars stay intact); in strict mode the first one is an error."""

    def __init__(self, strict: bool = False, show_first: int = 5):
        self.strict = strict
        self.show_first = show_first
        self._counts: dict[str, dict[str, int]] = {}
        self._shown: dict[str, int] = {}

    def skip(self, source: str, where: str, reason: str) -> None:
        if self.strict:
            raise CorpusError(f"{where}: {reason}")
        kind = reason.split(" (", 1)[0]
        counts = self._counts.setdefault(source, {})
        counts[kind] = counts.get(kind, 0) + 1
        shown = self._shown.get(source, 0)
        if shown < self.show_first:
            tqdm.write(f"{where}: {reason}", file=sys.stderr)
        elif shown == self.show_first:
            tqdm.write(f"({source}: further skipped records are counted, not printed)", file=sys.stderr)
        self._shown[source] = shown + 1

    def counts(self, source: str) -> dict[str, int]:
        """Skipped records of `source` by reason kind."""
        return dict(self._counts.get(source, {}))

    def total(self, source: str) -> int:
        return sum(self._counts.get(source, {}).values())

    def restore(self, source: str, counts: dict[str, int]) -> None:
        """Start `source` from earlier counts (a resumed run); what was printed then is not printed again."""
        self._counts[source] = dict(counts)
        self._shown[source] = self.show_first + 1 if counts else 0
