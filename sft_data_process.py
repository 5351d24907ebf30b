"""Raw SFT corpora → sft_data/sft_data.csv (columns prompt, answer, history, source), the input of sft.py.

    python sft_data_process.py                         # bundled sample (sft_data/sample/) → sft_data/sft_data.csv
    python sft_data_process.py \
      --corpus alpaca_zh=/d/alpaca_gpt4_data_zh.json --corpus belle=/d/Belle_open_source_1M.json \
      --corpus medical_sft='/d/shibing624_medical/finetune/train_*.json' \
      --corpus huatuo=/d/HuatuoGPT_sft_data_v1.jsonl --corpus disc_med=/d/DISC-Med-SFT_released.jsonl \
      --corpus chatmed=/d/ChatMed_Consult-v0.3.json --out sft_data/sft_data.csv
    python sft_data_process.py --corpus sharegpt=medical_sft_1K_format.jsonl --max_chars=0   # no upper bound
    python sft_data_process.py --corpus jsonl:question,answer='my_qa/*.jsonl'   # any Q&A JSON Lines
    python sft_data_process.py --list-corpora          # every reader and the layout it expects

(shibing624/medical's finetune/ folder also holds valid_* and test_* files: `train_*.json` keeps them out
of the training data.)

One CSV row is one conversation: its last turn in `prompt`/`answer`, the earlier turns in `history` as a
JSON list of [prompt, answer] pairs (`[]` for a single turn), the --corpus name in `source`. Every field
is quoted, so newlines, quotes, commas and emoji round-trip; read it back exactly with

    pd.read_csv(path, keep_default_na=False, dtype=str)

(without keep_default_na=False pandas turns an empty field or the text "NA" / "null" into NaN).

Filters, the seed's defaults as flags: the opening prompt needs --min_prompt_chars (10) and every answer
--min_answer_chars (5) characters; any prompt or answer over --max_chars (256; 0 = no limit) drops the
conversation. Later prompts of a dialogue may be short ("好的，谢谢"), so only the opening one is checked.
Exact duplicates (same history, prompt and answer, across all sources) are written once. Input is
streamed and rows are written as they come; memory grows only by an 8-byte digest per kept row (with
Python's set overhead ~90 bytes: 105 MB peak RSS measured for 1M Belle-style records, 720k rows kept). Malformed records are skipped, counted and
the first few printed as `file:line: reason` (--strict stops at the first); a table per source ends the
run. The CSV appears only when complete (written to OUT.tmp, then renamed).
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
from functools import partial
from typing import Any, Callable, Iterator, NamedTuple, TextIO

from tqdm import tqdm

from corpus_io import READ_ERRORS, BadRecord, CorpusError, SkipLog, expand_paths, iter_records, json_type, str_field

COLUMNS = ("prompt", "answer", "history", "source")
DEFAULT_OUT = os.path.join("sft_data", "sft_data.csv")
# The bundled sample lives beside this script, so the bare command works from any working directory.
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_data", "sample")
DEFAULT_CORPORA = (
    f"alpaca_zh={os.path.join(SAMPLE_DIR, 'alpaca_zh_sample.json')}",
    f"sharegpt={os.path.join(SAMPLE_DIR, 'sharegpt_sample.jsonl')}",
    f"chatmed={os.path.join(SAMPLE_DIR, 'chatmed_sample.jsonl')}",
)
# json.loads accepts "\ud83d" escapes that are not characters; they cannot be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
HUATUO_PREFIXES = (("问：", "问:"), ("答：", "答:"))   # full-width colon in the data; ASCII tolerated
DISC_ROLES = {"user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Dialogue(NamedTuple):
    """A record's (prompt, answer) turns, oldest first; `unanswered`: a trailing question was dropped."""
    turns: list[tuple[str, str]]
    unanswered: bool = False


# ---------------------------------------------------------------- record → dialogue

def _clean(text: str, label: str) -> str:
    """`text` stripped; BadRecord when it holds a lone surrogate (not valid Unicode, cannot be written)."""
    if _SURROGATE.search(text):
        raise BadRecord(f"invalid Unicode (field '{label}' holds a lone surrogate escape)")
    return text.strip()


def _text(record: Any, field: str, label: str | None = None) -> str:
    """A string field, stripped; BadRecord naming the field when absent, not a string or not valid Unicode."""
    return _clean(str_field(record, field, label), label or field)


def _list_field(record: Any, field: str) -> list:
    if not isinstance(record, dict):
        raise BadRecord(f"not a JSON object (got {json_type(record)})")
    if field not in record:
        raise BadRecord(f"missing field '{field}'")
    if not isinstance(record[field], list):
        raise BadRecord(f"field '{field}' is not an array (got {json_type(record[field])})")
    return record[field]


def _pair_up(texts: list[str], field: str) -> Dialogue:
    """Alternating question/answer texts (question first) → turns; a trailing question is dropped,
    since the model can learn nothing from a question nobody answered."""
    unanswered = len(texts) % 2 == 1
    if unanswered:
        texts = texts[:-1]
    if not texts:
        raise BadRecord(f"no answered turn (field '{field}' holds no question followed by an answer)")
    return Dialogue(list(zip(texts[0::2], texts[1::2])), unanswered)


def instruction_dialogue(record: Any) -> Dialogue:
    """alpaca_zh, belle, medical_sft: prompt = instruction, a newline, then input when present
    (shibing624/medical's zh files ask in `instruction`, its en files in `input`); answer = output."""
    instruction = _text(record, "instruction")
    extra = _text(record, "input") if record.get("input") is not None else ""
    prompt = "\n".join(part for part in (instruction, extra) if part)
    return Dialogue([(prompt, _text(record, "output"))])


def fields_dialogue(record: Any, prompt_field: str, answer_field: str) -> Dialogue:
    """One question and one answer in two named fields (chatmed: query/response; jsonl:P,A)."""
    return Dialogue([(_text(record, prompt_field), _text(record, answer_field))])


def huatuo_dialogue(record: Any) -> Dialogue:
    """HuatuoGPT: {"data": ["问：…", "答：…", …]}; prefixes stripped, turns paired."""
    texts = []
    for i, item in enumerate(_list_field(record, "data")):
        label = f"data[{i}]"
        if not isinstance(item, str):
            raise BadRecord(f"field '{label}' is not a string (got {json_type(item)})")
        prefixes = HUATUO_PREFIXES[i % 2]
        if not item.startswith(prefixes):
            raise BadRecord(f"bad turn prefix (field '{label}' should start with {prefixes[0]})")
        texts.append(_clean(item[len(prefixes[0]):], label))
    return _pair_up(texts, "data")


def role_dialogue(record: Any, field: str, role_key: str, text_key: str, roles: dict[str, str]) -> Dialogue:
    """A list of {role, text} turns alternating user/assistant, user first (disc_med, sharegpt)."""
    texts = []
    for i, turn in enumerate(_list_field(record, field)):
        label = f"{field}[{i}]"
        role = str_field(turn, role_key, f"{label}.{role_key}")
        expected = "user" if i % 2 == 0 else "assistant"
        if roles.get(role) != expected:
            accepted = "/".join(name for name, kind in roles.items() if kind == expected)
            raise BadRecord(f"bad turn role (field '{label}.{role_key}' is {role!r}; expected {accepted})")
        texts.append(_text(turn, text_key, f"{label}.{text_key}"))
    return _pair_up(texts, field)


# ---------------------------------------------------------------- the reader registry

@dataclass(frozen=True)
class Reader:
    """A named SFT corpus format: its file layout (corpus_io) and how one record becomes a Dialogue."""
    name: str
    layout: str
    parse: Callable[[Any], Dialogue]
    about: str


SFT_READERS: dict[str, Reader] = {r.name: r for r in [
    Reader("alpaca_zh", "json_array", instruction_dialogue,
           "shibing624/alpaca-zh alpaca_gpt4_data_zh.json: one JSON array of {\"instruction\", \"input\", "
           "\"output\"}; prompt = instruction + newline + input (when non-empty)"),
    Reader("belle", "jsonl", instruction_dialogue,
           "BelleGroup Belle_open_source_1M.json: JSON Lines {\"instruction\", \"input\", \"output\"}"),
    Reader("medical_sft", "jsonl", instruction_dialogue,
           "shibing624/medical finetune/*.json: JSON Lines {\"instruction\", \"input\", \"output\"} "
           "(zh: question in instruction; en: question in input, joined after the instruction)"),
    Reader("huatuo", "jsonl", huatuo_dialogue,
           "HuatuoGPT_sft_data_v1.jsonl: JSON Lines {\"data\": [\"问：…\", \"答：…\", …]}; prefixes "
           "stripped, multi-turn, a trailing unanswered question dropped"),
    Reader("disc_med", "jsonl", partial(role_dialogue, field="conversation", role_key="role",
                                        text_key="content", roles=DISC_ROLES),
           "DISC-Med-SFT_released.jsonl: JSON Lines {\"conversation\": [{\"role\": user/assistant, "
           "\"content\"}]}; multi-turn, a trailing user turn dropped"),
    Reader("chatmed", "jsonl", partial(fields_dialogue, prompt_field="query", answer_field="response"),
           "ChatMed_Consult-v0.3.json: JSON Lines {\"query\", \"response\"}"),
    Reader("sharegpt", "jsonl", partial(role_dialogue, field="conversations", role_key="from",
                                        text_key="value", roles=SHAREGPT_ROLES),
           "ShareGPT layout (e.g. medical_sft_1K_format.jsonl): JSON Lines {\"conversations\": "
           "[{\"from\": human/gpt, \"value\"}]}; multi-turn, a trailing human turn dropped"),
]}

GENERIC_READERS = {
    "jsonl:PROMPT_FIELD,ANSWER_FIELD": "JSON Lines of objects; one turn from two string fields",
    "json:PROMPT_FIELD,ANSWER_FIELD": "one whole-file JSON array of objects (streamed); one turn from two fields",
}


def get_reader(name: str) -> Reader:
    """The reader for a corpus name (`belle`, `jsonl:question,answer`, ...); CorpusError when unknown."""
    if name in SFT_READERS:
        return SFT_READERS[name]
    kind, _, arg = name.partition(":")
    prompt_field, comma, answer_field = arg.partition(",")
    if kind in ("jsonl", "json") and prompt_field and comma and answer_field:
        parse = partial(fields_dialogue, prompt_field=prompt_field, answer_field=answer_field)
        about = GENERIC_READERS[f"{kind}:PROMPT_FIELD,ANSWER_FIELD"]
        return Reader(name, "jsonl" if kind == "jsonl" else "json_array", parse, about)
    known = ", ".join(list(SFT_READERS) + list(GENERIC_READERS))
    raise CorpusError(f"unknown SFT corpus '{name}'; known: {known} "
                      f"(see python sft_data_process.py --list-corpora)")


def describe_readers() -> str:
    """The registry as text, one reader a paragraph (for --list-corpora)."""
    entries = [(r.name, r.about) for r in SFT_READERS.values()] + list(GENERIC_READERS.items())
    lines = [f"{name}\n    {about}" for name, about in entries]
    lines.append("compressed files (.gz .bz2 .xz .zst) are read transparently; use --corpus NAME=PATH_OR_GLOB")
    return "\n".join(lines)


class SFTSource(NamedTuple):
    """One --corpus argument resolved: the name written to `source`, its reader, and its files."""
    name: str
    reader: Reader
    paths: list[str]


def parse_source(spec: str) -> SFTSource:
    """`NAME=PATH_OR_GLOB` → SFTSource; CorpusError for a bad spec, an unknown name or a path matching nothing."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise CorpusError(f"--corpus {spec!r}: expected NAME=PATH_OR_GLOB (NAME one of --list-corpora)")
    return SFTSource(name, get_reader(name), expand_paths(path))


# ---------------------------------------------------------------- filtering, dedup, writing

@dataclass(frozen=True)
class LengthFilter:
    """The seed's length filters (characters, as Python's len); see the module docstring for which turns."""
    min_prompt_chars: int = 10
    min_answer_chars: int = 5
    max_chars: int = 256   # 0: no upper bound

    def verdict(self, turns: list[tuple[str, str]]) -> str | None:
        """'too_short', 'too_long' or None (keep)."""
        if len(turns[0][0]) < self.min_prompt_chars or any(len(a) < self.min_answer_chars for _, a in turns):
            return "too_short"
        if self.max_chars and any(max(len(p), len(a)) > self.max_chars for p, a in turns):
            return "too_long"
        return None


@dataclass
class SourceStats:
    """Records of one source: read = kept + too_short + too_long + duplicate + malformed."""
    read: int = 0
    kept: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicate: int = 0
    malformed: int = 0
    unanswered: int = 0   # well-formed records whose trailing unanswered question was dropped


class RowWriter:
    """Writes conversations as CSV rows, each exact duplicate only once."""

    def __init__(self, stream: TextIO):
        # QUOTE_ALL: every field quoted, so no reader has to guess whether an empty field is text
        self.writer = csv.writer(stream, quoting=csv.QUOTE_ALL, lineterminator="\n")
        self.writer.writerow(COLUMNS)
        self.seen: set[int] = set()

    def write(self, turns: list[tuple[str, str]], source: str) -> bool:
        """Write one conversation; False (nothing written) when the same turns were written before."""
        history = json.dumps([list(turn) for turn in turns[:-1]], ensure_ascii=False)
        prompt, answer = turns[-1]
        # 8 bytes of blake2b: collisions stay negligible (~1e-7 at 2M rows) while memory stays small
        key = json.dumps([history, prompt, answer], ensure_ascii=False).encode("utf-8")
        digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        if digest in self.seen:
            return False
        self.seen.add(digest)
        self.writer.writerow((prompt, answer, history, source))
        return True


def iter_dialogues(path: str, source: str, reader: Reader, skiplog: SkipLog,
                   stats: SourceStats) -> Iterator[Dialogue]:
    """Well-formed dialogues of one file; malformed records go to `skiplog` (which raises in strict mode)."""
    records = tqdm(iter_records(path, reader.layout), desc=f"{source} {os.path.basename(path)}",
                   unit=" rec", mininterval=1.0)
    try:
        for record in records:
            stats.read += 1
            try:
                if record.error is not None:
                    raise BadRecord(record.error)
                dialogue = reader.parse(record.value)
            except BadRecord as exc:
                stats.malformed += 1
                skiplog.skip(source, record.where, str(exc))
                continue
            stats.unanswered += dialogue.unanswered
            yield dialogue
    except READ_ERRORS as exc:
        # an unreadable or corrupt (compressed) file: stop, rather than keep a silently partial corpus
        raise CorpusError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None


def convert(sources: list[SFTSource], writer: RowWriter, length_filter: LengthFilter,
            skiplog: SkipLog) -> dict[str, SourceStats]:
    """Stream every source through parsing, the length filter and dedup into `writer`; stats per source."""
    stats: dict[str, SourceStats] = {}
    for source in sources:
        counts = stats.setdefault(source.name, SourceStats())
        for path in source.paths:
            for dialogue in iter_dialogues(path, source.name, source.reader, skiplog, counts):
                verdict = length_filter.verdict(dialogue.turns)
                if verdict is not None:
                    setattr(counts, verdict, getattr(counts, verdict) + 1)
                elif writer.write(dialogue.turns, source.name):
                    counts.kept += 1
                else:
                    counts.duplicate += 1
    return stats


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


def write_sft_csv(sources: list[SFTSource], out: str, length_filter: LengthFilter,
                  skiplog: SkipLog) -> dict[str, SourceStats]:
    """Convert `sources` into the CSV `out`, atomically: OUT.tmp, fsync, rename; removed on any failure."""
    tmp = out + ".tmp"
    stream = _open_tmp(out)
    try:
        with stream:
            stats = convert(sources, RowWriter(stream), length_filter, skiplog)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise CorpusError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return stats


# ---------------------------------------------------------------- report and command line

def summary_table(stats: dict[str, SourceStats], skiplog: SkipLog) -> str:
    """One line per source plus a total; then the malformed records of each source by reason."""
    names = [f.name for f in fields(SourceStats)]
    width = max([len("source"), len("total")] + [len(s) for s in stats])
    total = SourceStats(**{n: sum(getattr(s, n) for s in stats.values()) for n in names})
    lines = [f"{'source':<{width}} " + " ".join(f"{n:>10}" for n in names)]
    for source, counts in [*stats.items(), ("total", total)]:
        lines.append(f"{source:<{width}} " + " ".join(f"{getattr(counts, n):>10,}" for n in names))
    lines.append("unanswered: records whose trailing unanswered question was dropped (earlier turns kept)")
    for source in stats:
        for kind, count in skiplog.counts(source).items():
            lines.append(f"{source}: malformed, {kind}: {count:,}")
    return "\n".join(lines)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", metavar="NAME=PATH_OR_GLOB",
                        help="a corpus to read (repeatable); NAME from --list-corpora. "
                             "Default: the bundled sample in sft_data/sample/")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output CSV (default {DEFAULT_OUT})")
    parser.add_argument("--min_prompt_chars", "--min-prompt-chars", type=_count, default=10,
                        help="drop a conversation whose opening prompt is shorter (default 10)")
    parser.add_argument("--min_answer_chars", "--min-answer-chars", type=_count, default=5,
                        help="drop a conversation with any answer shorter (default 5)")
    parser.add_argument("--max_chars", "--max-chars", type=_count, default=256,
                        help="drop a conversation with any prompt or answer longer, each checked on its own "
                             "(the seed's bound on prompt and answer; default 256; 0 = no limit)")
    parser.add_argument("--strict", action="store_true",
                        help="stop with an error at the first malformed record instead of skipping it")
    parser.add_argument("--list-corpora", "--list_corpora", action="store_true",
                        help="print the corpus readers and their layouts, then exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_corpora:
        print(describe_readers())
        return 0
    length_filter = LengthFilter(args.min_prompt_chars, args.min_answer_chars, args.max_chars)
    skiplog = SkipLog(strict=args.strict)
    started = time.perf_counter()
    try:
        sources = [parse_source(spec) for spec in args.corpus or DEFAULT_CORPORA]
        stats = write_sft_csv(sources, args.out, length_filter, skiplog)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; {args.out} left as it was", file=sys.stderr)
        return 130
    print(summary_table(stats, skiplog))
    kept = sum(s.kept for s in stats.values())
    print(f"wrote {kept:,} rows to {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) "
          f"in {time.perf_counter() - started:.1f}s")
    if kept == 0:
        print("warning: no row passed the filters; the CSV holds only its header", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
