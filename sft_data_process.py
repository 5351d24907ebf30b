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
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, NamedTuple

from corpus_io import BadRecord, SkipLog, json_type, str_field
from sft_corpus import (SAMPLE_DIR, SHAREGPT_ROLES, DedupWriter, Reader, Source, clean_text, convert_corpora, count_arg,
                        describe_registry, find_reader, history_json, iter_parsed, list_field, text_field,
                        write_csv_atomic)

COLUMNS = ("prompt", "answer", "history", "source")
DEFAULT_OUT = os.path.join("sft_data", "sft_data.csv")
DEFAULT_CORPORA = (
    f"alpaca_zh={os.path.join(SAMPLE_DIR, 'alpaca_zh_sample.json')}",
    f"sharegpt={os.path.join(SAMPLE_DIR, 'sharegpt_sample.jsonl')}",
    f"chatmed={os.path.join(SAMPLE_DIR, 'chatmed_sample.jsonl')}",
)
HUATUO_PREFIXES = (("问：", "问:"), ("答：", "答:"))   # full-width colon in the data; ASCII tolerated
DISC_ROLES = {"user": "user", "assistant": "assistant"}


class Dialogue(NamedTuple):
    """A record's (prompt, answer) turns, oldest first; `unanswered`: a trailing question was dropped."""
    turns: list[tuple[str, str]]
    unanswered: bool = False


# ---------------------------------------------------------------- record → dialogue

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
    instruction = text_field(record, "instruction")
    extra = text_field(record, "input") if record.get("input") is not None else ""
    prompt = "\n".join(part for part in (instruction, extra) if part)
    return Dialogue([(prompt, text_field(record, "output"))])


def fields_dialogue(record: Any, prompt_field: str, answer_field: str) -> Dialogue:
    """One question and one answer in two named fields (chatmed: query/response; jsonl:P,A)."""
    return Dialogue([(text_field(record, prompt_field), text_field(record, answer_field))])


def huatuo_dialogue(record: Any) -> Dialogue:
    """HuatuoGPT: {"data": ["问：…", "答：…", …]}; prefixes stripped, turns paired."""
    texts = []
    for i, item in enumerate(list_field(record, "data")):
        label = f"data[{i}]"
        if not isinstance(item, str):
            raise BadRecord(f"field '{label}' is not a string (got {json_type(item)})")
        prefixes = HUATUO_PREFIXES[i % 2]
        if not item.startswith(prefixes):
            raise BadRecord(f"bad turn prefix (field '{label}' should start with {prefixes[0]})")
        texts.append(clean_text(item[len(prefixes[0]):], label))
    return _pair_up(texts, "data")


def role_dialogue(record: Any, field: str, role_key: str, text_key: str, roles: dict[str, str]) -> Dialogue:
    """A list of {role, text} turns alternating user/assistant, user first (disc_med, sharegpt)."""
    texts = []
    for i, turn in enumerate(list_field(record, field)):
        label = f"{field}[{i}]"
        role = str_field(turn, role_key, f"{label}.{role_key}")
        expected = "user" if i % 2 == 0 else "assistant"
        if roles.get(role) != expected:
            accepted = "/".join(name for name, kind in roles.items() if kind == expected)
            raise BadRecord(f"bad turn role (field '{label}.{role_key}' is {role!r}; expected {accepted})")
        texts.append(text_field(turn, text_key, f"{label}.{text_key}"))
    return _pair_up(texts, field)


# ---------------------------------------------------------------- the reader registry

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
    return find_reader(name, SFT_READERS, GENERIC_READERS,
                       lambda prompt, answer: partial(fields_dialogue, prompt_field=prompt, answer_field=answer),
                       "SFT", "sft_data_process.py")


def describe_readers() -> str:
    """The registry as text, one reader a paragraph (for --list-corpora)."""
    return describe_registry([(r.name, r.about) for r in SFT_READERS.values()] + list(GENERIC_READERS.items()))


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


def write_dialogue(writer: DedupWriter, turns: list[tuple[str, str]], source: str) -> bool:
    """One conversation as a row; False (nothing written) when the same turns were written before."""
    history = history_json(turns[:-1])
    prompt, answer = turns[-1]
    return writer.write((prompt, answer, history, source), key=(history, prompt, answer))


def iter_dialogues(path: str, source: str, reader: Reader, skiplog: SkipLog,
                   stats: SourceStats) -> Iterator[Dialogue]:
    """Well-formed dialogues of one file; malformed records go to `skiplog` (which raises in strict mode)."""
    for dialogue in iter_parsed(path, source, reader, skiplog, stats):
        stats.unanswered += dialogue.unanswered
        yield dialogue


def convert(sources: list[Source], writer: DedupWriter, length_filter: LengthFilter,
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
                elif write_dialogue(writer, dialogue.turns, source.name):
                    counts.kept += 1
                else:
                    counts.duplicate += 1
    return stats


def write_sft_csv(sources: list[Source], out: str, length_filter: LengthFilter,
                  skiplog: SkipLog) -> dict[str, SourceStats]:
    """Convert `sources` into the CSV `out`, atomically: OUT.tmp, fsync, rename; removed on any failure."""
    return write_csv_atomic(out, COLUMNS, lambda writer: convert(sources, writer, length_filter, skiplog))


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", metavar="NAME=PATH_OR_GLOB",
                        help="a corpus to read (repeatable); NAME from --list-corpora. "
                             "Default: the bundled sample in sft_data/sample/")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output CSV (default {DEFAULT_OUT})")
    parser.add_argument("--min_prompt_chars", "--min-prompt-chars", type=count_arg, default=10,
                        help="drop a conversation whose opening prompt is shorter (default 10)")
    parser.add_argument("--min_answer_chars", "--min-answer-chars", type=count_arg, default=5,
                        help="drop a conversation with any answer shorter (default 5)")
    parser.add_argument("--max_chars", "--max-chars", type=count_arg, default=256,
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
    return convert_corpora(args.corpus or DEFAULT_CORPORA, args.out, get_reader,
                           lambda sources: write_sft_csv(sources, args.out, length_filter, skiplog), skiplog,
                           "unanswered: records whose trailing unanswered question was dropped (earlier turns kept)",
                           "rows")


if __name__ == "__main__":
    sys.exit(main())
