"""Preference corpora → sft_data/dpo_data.csv (columns prompt, chosen, rejected, history, source), the input of dpo.py.

    python dpo_data_process.py                         # bundled sample (sft_data/sample/dpo_*) → sft_data/dpo_data.csv
    python dpo_data_process.py --corpus medicalgpt_reward=/d/dpo_zh_500.jsonl \
      --corpus dpo_en_zh=/d/DPO-En-Zh-20k/dpo_zh.json --corpus hh_rlhf='/d/hh-rlhf-zh/*.jsonl' \
      --out sft_data/dpo_data.csv
    python dpo_data_process.py --corpus ultrafeedback='/d/ultrafeedback_binarized/train_prefs*.jsonl'
    python dpo_data_process.py --corpus jsonl:question,good,bad='my_prefs/*.jsonl'   # any preference JSON Lines
    python dpo_data_process.py --list-corpora          # every reader and the layout it expects

One CSV row is one preference pair laid out like an SFT row (sft_data.csv): the last question in `prompt`, the
earlier turns in `history` (JSON list of [prompt, answer]; `[]` for none), the preferred and the dispreferred
answer to that question in `chosen` and `rejected`, the --corpus name in `source`. dpo.py scores both answers
after the same `history… prompt <bos>` context. A system message (medicalgpt_reward, dpo_en_zh, ultrafeedback)
has no place in that layout: it is put before the first question, on its own line.

Exact duplicates (same history, prompt, chosen and rejected) are written once; pairs whose two answers are equal
teach nothing and are dropped and counted (`identical`). Malformed records are skipped, counted and the first
few printed as `file:line: reason` (--strict stops at the first); a table per source ends the run; the CSV
appears only when complete (OUT.tmp, then renamed). Read it back exactly with
`pd.read_csv(path, keep_default_na=False, dtype=str)`. The machinery is sft_data_process.py's (sft_corpus.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from corpus_io import BadRecord, SkipLog, json_type, str_field
from sft_corpus import (SAMPLE_DIR, SHAREGPT_ROLES, DedupWriter, Reader, Source, clean_text, convert_corpora,
                        describe_registry, find_reader, history_json, iter_parsed, list_field, text_field,
                        write_csv_atomic)

COLUMNS = ("prompt", "chosen", "rejected", "history", "source")
DEFAULT_OUT = os.path.join("sft_data", "dpo_data.csv")
DEFAULT_CORPORA = (
    f"medicalgpt_reward={os.path.join(SAMPLE_DIR, 'dpo_medicalgpt_reward_sample.jsonl')}",
    f"dpo_en_zh={os.path.join(SAMPLE_DIR, 'dpo_en_zh_sample.json')}",
    f"hh_rlhf={os.path.join(SAMPLE_DIR, 'dpo_hh_rlhf_sample.jsonl')}",
    f"ultrafeedback={os.path.join(SAMPLE_DIR, 'dpo_ultrafeedback_sample.jsonl')}",
)
CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
MEDICALGPT_ROLES = SHAREGPT_ROLES | {"system": "system"}
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class Preference(NamedTuple):
    """A question after earlier turns, and a preferred and a dispreferred answer to it."""
    history: list[tuple[str, str]]
    prompt: str
    chosen: str
    rejected: str


# ---------------------------------------------------------------- record → preference

def _with_system(system: str, turns: list[tuple[str, str]], prompt: str) -> tuple[list[tuple[str, str]], str]:
    """The system message put before the first question, on its own line (the SFT layout has no system slot)."""
    if not system:
        return turns, prompt
    if turns:
        return [(f"{system}\n{turns[0][0]}", turns[0][1])] + turns[1:], prompt
    return turns, f"{system}\n{prompt}"


def _nonempty(text: str, field: str) -> str:
    if not text:
        raise BadRecord(f"empty answer (field '{field}')")
    return text


def _answer(record: Any, field: str) -> str:
    return _nonempty(text_field(record, field), field)


def _context(texts: list[str], field: str, system: str = "") -> tuple[list[tuple[str, str]], str]:
    """Alternating question/answer texts ending with the question to answer → (history, prompt)."""
    if len(texts) % 2 == 0:
        raise BadRecord(f"the dialogue does not end with a question (field '{field}')")
    if not texts[-1]:
        raise BadRecord(f"empty question (field '{field}')")
    return _with_system(system, list(zip(texts[0:-1:2], texts[1:-1:2])), texts[-1])


def _role_texts(messages: list, field: str, role_key: str, text_key: str,
                roles: dict[str, str]) -> tuple[str, list[str]]:
    """(system text or '', the texts of a user/assistant alternation starting with the user)."""
    system, texts = "", []
    for i, message in enumerate(messages):
        label = f"{field}[{i}]"
        role = roles.get(str_field(message, role_key, f"{label}.{role_key}"))
        text = text_field(message, text_key, f"{label}.{text_key}")
        if role == "system" and i == 0:
            system = text
            continue
        expected = "user" if len(texts) % 2 == 0 else "assistant"
        if role != expected:
            accepted = "/".join(name for name, kind in roles.items() if kind == expected)
            raise BadRecord(f"bad turn role (field '{label}.{role_key}' is {message.get(role_key)!r}; "
                            f"expected {accepted})")
        texts.append(text)
    return system, texts


def medicalgpt_preference(record: Any) -> Preference:
    """MedicalGPT reward/DPO data: `conversations` (ShareGPT roles, optional leading system, ending with a human
    turn) + `chosen` and `rejected` answer strings."""
    system, texts = _role_texts(list_field(record, "conversations"), "conversations", "from", "value",
                                MEDICALGPT_ROLES)
    history, prompt = _context(texts, "conversations", system)
    return Preference(history, prompt, _answer(record, "chosen"), _answer(record, "rejected"))


def dpo_en_zh_preference(record: Any) -> Preference:
    """DPO-En-Zh-20k: `system`, `history` ([[prompt, answer], …]), `question`, `response_chosen/rejected`."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object (got {json_type(record)})")
    system = text_field(record, "system") if record.get("system") is not None else ""
    turns = []
    for i, turn in enumerate(list_field(record, "history") if record.get("history") is not None else []):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise BadRecord(f"field 'history[{i}]' is not a [prompt, answer] pair (got {json_type(turn)})")
        for j, text in enumerate(turn):
            if not isinstance(text, str):
                raise BadRecord(f"field 'history[{i}][{j}]' is not a string (got {json_type(text)})")
        turns.append((clean_text(turn[0], f"history[{i}][0]"), clean_text(turn[1], f"history[{i}][1]")))
    question = text_field(record, "question")
    if not question:
        raise BadRecord("empty question (field 'question')")
    history, prompt = _with_system(system, turns, question)
    return Preference(history, prompt, _answer(record, "response_chosen"), _answer(record, "response_rejected"))


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF's two whole dialogues → (shared text up to and including the last `\\n\\nAssistant:`, chosen
    answer, rejected answer). BadRecord when the two do not share that prefix exactly."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRecord("no '\\n\\nAssistant:' turn (field 'chosen')")
    prefix = chosen[:cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prefix) or rejected.rfind(HH_ASSISTANT) != cut:
        raise BadRecord("chosen and rejected do not share the dialogue before their last Assistant turn")
    answers = chosen[len(prefix):], rejected[len(prefix):]
    for field, answer in zip(("chosen", "rejected"), answers):
        if HH_HUMAN in answer:
            raise BadRecord(f"the dialogue ends with a Human turn (field '{field}')")
    return prefix, *answers


def _hh_turns(prefix: str) -> list[str]:
    """The texts of `\\n\\nHuman: … \\n\\nAssistant: … \\n\\nHuman: … \\n\\nAssistant:` in order (last one empty)."""
    texts, rest, marker = [], prefix, HH_HUMAN
    if not rest.startswith(HH_HUMAN):
        raise BadRecord("the dialogue does not start with '\\n\\nHuman:' (field 'chosen')")
    while rest:
        rest = rest[len(marker):]
        marker = HH_ASSISTANT if marker == HH_HUMAN else HH_HUMAN
        end = rest.find(marker)
        end = len(rest) if end < 0 else end
        texts.append(rest[:end].strip())
        rest = rest[end:]
    return texts


def hh_rlhf_preference(record: Any) -> Preference:
    """Anthropic HH-RLHF layout: `chosen` and `rejected` whole dialogues sharing all but the last answer."""
    chosen, rejected = text_field(record, "chosen"), text_field(record, "rejected")
    # .strip() above removed the leading blank lines of the first turn marker
    chosen, rejected = ("\n\n" + text if text.startswith(("Human:", "Assistant:")) else text
                        for text in (chosen, rejected))
    prefix, chosen_answer, rejected_answer = split_hh(chosen, rejected)
    texts = _hh_turns(prefix)
    if any(HH_ASSISTANT in t or HH_HUMAN in t for t in texts) or len(texts) % 2:
        raise BadRecord("the turns do not alternate Human/Assistant (field 'chosen')")
    history, prompt = _context(texts[:-1], "chosen")
    return Preference(history, prompt, _nonempty(chosen_answer.strip(), "chosen"),
                      _nonempty(rejected_answer.strip(), "rejected"))


def ultrafeedback_preference(record: Any) -> Preference:
    """UltraFeedback binarized: `chosen` and `rejected` message lists {role, content} sharing all but the last
    (assistant) message; the last user message is the prompt."""
    sides = {}
    for field in ("chosen", "rejected"):
        system, texts = _role_texts(list_field(record, field), field, "role", "content", CHAT_ROLES)
        if len(texts) % 2:
            raise BadRecord(f"the messages do not end with an assistant answer (field '{field}')")
        sides[field] = (system, texts[:-1], texts[-1])
    if sides["chosen"][:2] != sides["rejected"][:2]:
        raise BadRecord("chosen and rejected do not share the messages before their last answer")
    system, context, _ = sides["chosen"]
    history, prompt = _context(context, "chosen", system)
    return Preference(history, prompt, _nonempty(sides["chosen"][2], "chosen"),
                      _nonempty(sides["rejected"][2], "rejected"))


def fields_preference(record: Any, prompt_field: str, chosen_field: str, rejected_field: str) -> Preference:
    """One question and two answers in three named fields (jsonl:PROMPT,CHOSEN,REJECTED)."""
    prompt = text_field(record, prompt_field)
    if not prompt:
        raise BadRecord(f"empty question (field '{prompt_field}')")
    return Preference([], prompt, _answer(record, chosen_field), _answer(record, rejected_field))


# ---------------------------------------------------------------- the reader registry

DPO_READERS: dict[str, Reader] = {r.name: r for r in [
    Reader("medicalgpt_reward", "jsonl", medicalgpt_preference,
           "MedicalGPT reward/DPO data (e.g. dpo_zh_500.jsonl): JSON Lines {\"conversations\": [{\"from\": "
           "system/human/gpt, \"value\"}] ending with a human turn, \"chosen\", \"rejected\"}; multi-turn"),
    Reader("dpo_en_zh", "auto", dpo_en_zh_preference,
           "shibing624/DPO-En-Zh-20k (dpo_zh.json): JSON array or JSON Lines of {\"system\", \"history\": "
           "[[prompt, answer]], \"question\", \"response_chosen\", \"response_rejected\"}"),
    Reader("hh_rlhf", "jsonl", hh_rlhf_preference,
           "Anthropic HH-RLHF layout and its Chinese translations: JSON Lines {\"chosen\", \"rejected\"}, two whole "
           "dialogues \"\\n\\nHuman: …\\n\\nAssistant: …\" sharing all but the last answer; split at that prefix"),
    Reader("ultrafeedback", "auto", ultrafeedback_preference,
           "UltraFeedback binarized: {\"prompt\", \"chosen\": [{\"role\", \"content\"}], \"rejected\": [...]}; "
           "the message lists share all but the last (assistant) message"),
]}

GENERIC_READERS = {
    "jsonl:PROMPT,CHOSEN,REJECTED": "JSON Lines of objects; one question and two answers from three string fields",
    "json:PROMPT,CHOSEN,REJECTED": "one whole-file JSON array of objects (streamed); three string fields",
}


def get_reader(name: str) -> Reader:
    """The reader for a corpus name (`hh_rlhf`, `jsonl:q,good,bad`, ...); CorpusError when unknown."""
    return find_reader(name, DPO_READERS, GENERIC_READERS,
                       lambda prompt, chosen, rejected: partial(fields_preference, prompt_field=prompt,
                                                                chosen_field=chosen, rejected_field=rejected),
                       "preference", "dpo_data_process.py")


def describe_readers() -> str:
    return describe_registry([(r.name, r.about) for r in DPO_READERS.values()] + list(GENERIC_READERS.items()))


# ---------------------------------------------------------------- converting

@dataclass
class PairStats:
    """Records of one source: read = kept + identical + duplicate + malformed."""
    read: int = 0
    kept: int = 0
    identical: int = 0    # chosen == rejected: nothing to prefer
    duplicate: int = 0
    malformed: int = 0


def write_preference(writer: DedupWriter, pair: Preference, source: str) -> bool:
    history = history_json(pair.history)
    key = (history, pair.prompt, pair.chosen, pair.rejected)
    return writer.write((pair.prompt, pair.chosen, pair.rejected, history, source), key=key)


def convert(sources: list[Source], writer: DedupWriter, skiplog: SkipLog) -> dict[str, PairStats]:
    """Stream every source through parsing, the identical-answer filter and dedup into `writer`."""
    stats: dict[str, PairStats] = {}
    for source in sources:
        counts = stats.setdefault(source.name, PairStats())
        for path in source.paths:
            for pair in iter_parsed(path, source.name, source.reader, skiplog, counts):
                if pair.chosen == pair.rejected:
                    counts.identical += 1
                elif write_preference(writer, pair, source.name):
                    counts.kept += 1
                else:
                    counts.duplicate += 1
    return stats


def write_dpo_csv(sources: list[Source], out: str, skiplog: SkipLog) -> dict[str, PairStats]:
    """Convert `sources` into the CSV `out`, atomically."""
    return write_csv_atomic(out, COLUMNS, lambda writer: convert(sources, writer, skiplog))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", metavar="NAME=PATH_OR_GLOB",
                        help="a preference corpus to read (repeatable); NAME from --list-corpora. "
                             "Default: the bundled sample in sft_data/sample/dpo_*")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output CSV (default {DEFAULT_OUT})")
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
    skiplog = SkipLog(strict=args.strict)
    return convert_corpora(args.corpus or DEFAULT_CORPORA, args.out, get_reader,
                           lambda sources: write_dpo_csv(sources, args.out, skiplog), skiplog,
                           "identical: pairs whose chosen and rejected answers are the same (dropped)", "pairs")


if __name__ == "__main__":
    sys.exit(main())
