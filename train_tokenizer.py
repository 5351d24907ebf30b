"""Train your own SentencePiece tokenizer, usable in place of ChatGLM2's by every stage.

    python train_tokenizer.py                                   # bundled sample (data/sample/) → tokenizers/my_tok
    python train_tokenizer.py \\
      --corpus medical='/d/shibing624_medical/pretrain/*.json' \\
      --corpus wiki=/d/wikipedia-cn-20230720-filtered.json \\
      --vocab_size=32000 --sample_docs=200000 --out=tokenizers/my_tok
    python data_process.py --tokenizer=tokenizers/my_tok         # then every stage takes the same flag
    python pretrain.py --preset=tiny --tokenizer=tokenizers/my_tok
    options: --model_type=bpe|unigram --character_coverage=0.9995 --holdout_fraction=0.1
             --holdout_docs=1000 --compare_with=chatglm_tokenizer --num_threads=N --overwrite

`--corpus` takes the same NAME=PATH_OR_GLOB specs as data_process.py (`python data_process.py
--list-corpora`). `--vocab_size` is the tokenizer's whole vocabulary, the number the model's embedding is
sized to: SentencePiece pieces (<unk>=0, <s>=1 as <bos>, </s>=2 as <eos>, 256 byte pieces, the learnt
pieces) plus the 5 GLM specials ChatGLMTokenizer appends, as in ChatGLM2 (64,789 + 5 = 64,794). It is
capped at 65,535 so every id fits the uint16 .bin files. A sample too small for the size asked gives a
smaller vocabulary, with a note saying so.

The output folder loads exactly like chatglm_tokenizer/: tokenizer.model, tokenizer_config.json (with
auto_map, for AutoTokenizer) and a copy of tokenization_chatglm.py, plus train_tokenizer.json recording
how it was made. Byte fallback means no text is ever unrepresentable: decode(encode(x)) == x for any
string, with digits split one per token and whitespace (runs of spaces, newlines) kept as written.

Sampling reads at most --sample_docs documents, shared out evenly over the sources and, inside a source,
over its files, so memory is bounded by the sample and never by the corpus. Each file's share is its first
documents (a head sample, so a 16 GB file is not read to the end): a file sorted by topic or title gives a
skewed sample, so shuffle or split such a file first. Documents whose text hash
falls in the first --holdout_fraction of the hash space (the same hash data_process.py splits on, so its
val documents are held out here too when --val-fraction ≤ --holdout_fraction) are never trained on: up
to --holdout_docs of them measure tokens per character and the byte-fallback rate, for the new tokenizer
and for ChatGLM2's when present.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from chatglm_tokenizer import DEFAULT_TOKENIZER, TokenizerError, resolve_tokenizer_dir, tokenizer_identity
from chatglm_tokenizer.tokenization_chatglm import GLM_SPECIALS
from corpus_io import (CorpusError, CorpusSource, SkipLog, ensure_output_folder, iter_source_texts, parse_corpus_spec,
                       sample_corpus_specs, source_labels, text_keys, write_atomic_text)

MAX_VOCAB = 65535            # ids 0..65534: every one fits a uint16 token file
MIN_VOCAB = 300              # 3 specials + 256 byte pieces + 5 GLM specials, and a few characters
META_PIECES = 3 + 256        # <unk> <s> </s> and the byte-fallback pieces, before any learnt piece
MAX_CHUNK_CHARS = 2048       # ≤ 8,192 UTF-8 bytes: SentencePiece silently drops longer sentences
CARRIED_FILES = ("tokenization_chatglm.py", "tokenizer_config.json")


class TrainTokenizerError(Exception):
    """One-line user-facing error: a bad flag, a corpus too small for the vocabulary, an existing output."""


# ---------------------------------------------------------------- sampling the corpora

def is_held_out(text: str, fraction: float) -> bool:
    """True for the documents data_process.py would send to its val split at --val-fraction=`fraction`."""
    split_key = int.from_bytes(text_keys(text)[8:16], "little")
    return split_key < fraction * 2.0 ** 64


def training_sentences(text: str) -> Iterator[str]:
    """A document as SentencePiece sentences: its lines, long ones cut into MAX_CHUNK_CHARS pieces.
    Newlines themselves are left to byte fallback (<0x0A>), exactly as in ChatGLM2's vocabulary."""
    for line in text.split("\n"):
        for start in range(0, len(line), MAX_CHUNK_CHARS):
            yield line[start:start + MAX_CHUNK_CHARS]


@dataclass
class Sample:
    """The documents drawn from the corpora: training ones stream out of `sentences()`, held-out ones are
    kept in `held_out`. Counts are per source label (its corpus name, numbered when a name repeats)."""
    sources: list[CorpusSource]
    sample_docs: int
    holdout_fraction: float
    holdout_docs: int
    held_out: list[str] = field(default_factory=list)
    trained: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    skiplog: SkipLog = field(default_factory=SkipLog)
    error: Exception | None = None

    def sentences(self) -> Iterator[str]:
        """Every training sentence. SentencePiece turns an exception raised here into a bare RuntimeError,
        so a corpus error (or Ctrl-C) is also kept in `self.error` for the caller to raise again."""
        try:
            with tqdm(total=self.sample_docs, desc="sampling", unit="doc", dynamic_ncols=True) as bar:
                for text in self._documents():
                    bar.update(1)
                    yield from training_sentences(text)
                bar.total = bar.n  # the corpora ran out before the budget: end the bar at 100%
        except (CorpusError, OSError, KeyboardInterrupt) as exc:
            self.error = exc
            raise

    def _documents(self) -> Iterator[str]:
        """Training documents. The budget left is shared evenly by the sources (and, inside a source, the
        files) still to read, so one that runs short hands its share on to those after it."""
        left = self.sample_docs
        for s, source in enumerate(self.sources):
            label = source_labels(self.sources)[s]
            labelled = source._replace(corpus=replace(source.corpus, name=label))
            source_left = math.ceil(left / (len(self.sources) - s))
            self.trained[label], self.held[label] = 0, 0
            for f, path in enumerate(source.paths):
                quota = math.ceil(source_left / (len(source.paths) - f))
                taken = yield from self._take(labelled._replace(paths=[path]), quota)
                source_left -= taken
                left -= taken

    def _take(self, source: CorpusSource, quota: int) -> Iterator[str]:
        """Up to `quota` training documents from the start of `source`; returns how many it gave."""
        label, taken = source.corpus.name, 0
        texts = iter_source_texts(source, self.skiplog) if quota > 0 else iter(())
        for text in texts:
            if is_held_out(text, self.holdout_fraction):
                if len(self.held_out) < self.holdout_docs:
                    self.held_out.append(text)
                    self.held[label] += 1
                continue
            yield text
            taken += 1
            self.trained[label] += 1
            if taken >= quota:
                break
        return taken


# ---------------------------------------------------------------- training

def train_sentencepiece(sentences: Iterator[str], vocab_size: int, model_type: str,
                        character_coverage: float, num_threads: int) -> bytes:
    """Train on `sentences` and return the serialized SentencePiece model. `vocab_size` counts the GLM
    specials too (see the module docstring), so SentencePiece is asked for 5 pieces fewer."""
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # same sample, same model
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, model_type=model_type,
        vocab_size=vocab_size - len(GLM_SPECIALS), character_coverage=character_coverage,
        # ChatGLM2's ids: <unk>=0 (also used as <pad>), <s>=1 (<bos>), </s>=2 (<eos>); no separate pad piece
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # never an unknown: characters outside the vocabulary become their UTF-8 bytes
        byte_fallback=True, split_digits=True,
        # the text comes back exactly as written: no NFKC folding, runs of spaces kept (and learnable)
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        # a small sample gives the vocabulary it can rather than failing; the caller says so
        hard_vocab_limit=False, max_sentence_length=4 * MAX_CHUNK_CHARS,
        num_threads=num_threads, minloglevel=2)
    return model.getvalue()


def explain_trainer_error(exc: RuntimeError, args: argparse.Namespace) -> str:
    """SentencePiece's assertion text as one line a user can act on."""
    message = str(exc)
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        needed = int(too_small.group(2)) + len(GLM_SPECIALS)
        return (f"--vocab_size={args.vocab_size} is too small for this sample: its characters at "
                f"--character_coverage={args.character_coverage} need {needed:,} ids "
                f"(characters + {META_PIECES} special and byte pieces + {len(GLM_SPECIALS)} GLM specials); "
                f"raise --vocab_size or lower --character_coverage")
    if "sentences_.empty()" in message:
        return "the corpora gave no training text (every document was held out, skipped or empty)"
    return f"SentencePiece training failed: {message.strip().splitlines()[0]}"


# ---------------------------------------------------------------- measuring on held-out text

def measure(sp: spm.SentencePieceProcessor, texts: list[str], num_threads: int) -> dict:
    """Tokens per character, the share of tokens that are <unk> or byte-fallback pieces, and how many
    texts decode back exactly, for one SentencePiece model on `texts`."""
    encoded = sp.encode(texts, num_threads=num_threads)
    ids = np.fromiter((i for doc in encoded for i in doc), dtype=np.int64)
    is_byte = np.array([sp.is_byte(i) for i in range(sp.vocab_size())], dtype=bool)
    chars = sum(len(t) for t in texts)
    tokens = len(ids)
    exact = sum(sp.decode(doc) == text for doc, text in zip(encoded, texts))
    return {"documents": len(texts), "characters": chars, "tokens": tokens,
            "tokens_per_char": tokens / chars if chars else float("nan"),
            "unk_rate": float(np.mean(ids == sp.unk_id())) if tokens else 0.0,
            "byte_fallback_rate": float(np.mean(is_byte[ids])) if tokens else 0.0,
            "round_trip_exact": exact}


def comparison_table(results: dict[str, dict]) -> str:
    """The closing comparison, one row per tokenizer."""
    header = f"{'tokenizer':<22} {'vocab':>7} {'tokens/char':>11} {'unk':>7} {'byte fallback':>13} {'exact':>9}"
    lines = [header]
    for name, r in results.items():
        lines.append(f"{name:<22} {r['vocab_size']:>7,} {r['tokens_per_char']:>11.3f} {r['unk_rate']:>7.2%} "
                     f"{r['byte_fallback_rate']:>13.2%} {r['round_trip_exact']:>4}/{r['documents']:<4}")
    return "\n".join(lines)


def compare(model_proto: bytes, held_out: list[str], new_name: str, compare_with: str | None,
            num_threads: int) -> dict:
    """Measure the new model (row `new_name`), and the reference tokenizer folder when its
    tokenizer.model is present (row `compare_with`), on the held-out documents."""
    new = spm.SentencePieceProcessor(model_proto=model_proto)
    results = {new_name: {**measure(new, held_out, num_threads), "vocab_size": new.vocab_size() + len(GLM_SPECIALS)}}
    reference = reference_model(compare_with)
    if reference is not None:
        ref = spm.SentencePieceProcessor(model_file=reference)
        results[compare_with] = {**measure(ref, held_out, num_threads),
                                 "vocab_size": ref.vocab_size() + len(GLM_SPECIALS)}
    return results


def reference_model(compare_with: str | None) -> str | None:
    """The tokenizer.model to compare against, or None (not asked for, or not present: never downloaded)."""
    if not compare_with:
        return None
    path = os.path.join(resolve_tokenizer_dir(compare_with), "tokenizer.model")
    return path if os.path.isfile(path) else None


# ---------------------------------------------------------------- the output folder

def write_tokenizer_folder(model_proto: bytes, out: str, info: dict, overwrite: bool) -> dict:
    """Write the folder under a temporary name, load it back with load_tokenizer (the way every stage
    will), then rename it into place; return its identity. An existing `out` is replaced only with
    `overwrite`, and even then never left half-written."""
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model_proto)
        reference = resolve_tokenizer_dir(DEFAULT_TOKENIZER)
        for name in CARRIED_FILES:
            shutil.copyfile(os.path.join(reference, name), os.path.join(tmp, name))
        identity = tokenizer_identity(tmp)
        identity["path"] = out
        write_atomic_text(os.path.join(tmp, "train_tokenizer.json"),
                          json.dumps({**info, "tokenizer": identity}, ensure_ascii=False, indent=2))
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return identity


def _move_into_place(tmp: str, out: str, overwrite: bool) -> None:
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    check_output(out, overwrite)
    # a directory cannot be renamed over a non-empty one: move the old aside first, drop it last
    old = tmp + "-old"
    os.replace(out, old)
    os.replace(tmp, out)
    if os.path.isdir(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


def check_output(out: str, overwrite: bool) -> None:
    """Before any work: the output's folder must be writable, and an existing tokenizer is replaced only
    with --overwrite (.bin files and checkpoints made with it would no longer match it)."""
    if os.path.exists(out) and not overwrite:
        raise TrainTokenizerError(f"{out} already exists; pass --overwrite to replace it (data and checkpoints "
                                  f"made with the old tokenizer will then be refused as a mismatch)")
    ensure_output_folder(out)


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH_OR_GLOB",
                        help="a corpus to sample (repeatable; as data_process.py); default: the bundled sample")
    parser.add_argument("--vocab_size", type=int, default=32000,
                        help=f"ids in all, GLM specials included; at most {MAX_VOCAB:,} (default %(default)s)")
    parser.add_argument("--out", default=os.path.join("tokenizers", "my_tok"), help="output tokenizer folder")
    parser.add_argument("--sample_docs", type=int, default=200_000, help="documents to train on, at most")
    parser.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character_coverage", type=float, default=0.9995,
                        help="share of characters the vocabulary covers; the rest fall back to bytes")
    parser.add_argument("--holdout_fraction", type=float, default=0.1,
                        help="documents never trained on, chosen by data_process.py's text hash")
    parser.add_argument("--holdout_docs", type=int, default=1000, help="held-out documents measured, at most")
    parser.add_argument("--compare_with", default=DEFAULT_TOKENIZER,
                        help="tokenizer folder to compare against when present ('' for none)")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[CorpusSource]:
    """Check every flag before any reading; resolve the corpora (TrainTokenizerError / CorpusError)."""
    if args.vocab_size > MAX_VOCAB:
        raise TrainTokenizerError(f"--vocab_size={args.vocab_size:,} is too large: token ids are stored as "
                                  f"uint16, so the vocabulary is capped at {MAX_VOCAB:,}")
    if args.vocab_size < MIN_VOCAB:
        raise TrainTokenizerError(f"--vocab_size={args.vocab_size} is too small: at least {MIN_VOCAB} "
                                  f"({META_PIECES} special and byte pieces, {len(GLM_SPECIALS)} GLM specials, "
                                  f"and characters)")
    if not 0 < args.character_coverage <= 1:
        raise TrainTokenizerError(f"--character_coverage must be in (0, 1], got {args.character_coverage}")
    if not 0 <= args.holdout_fraction < 1:
        raise TrainTokenizerError(f"--holdout_fraction must be in [0, 1), got {args.holdout_fraction}")
    for flag in ("sample_docs", "num_threads"):
        if getattr(args, flag) < 1:
            raise TrainTokenizerError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.holdout_docs < 0:
        raise TrainTokenizerError(f"--holdout_docs must be at least 0, got {args.holdout_docs}")
    check_output(args.out, args.overwrite)
    specs = args.corpus or sample_corpus_specs()
    return [parse_corpus_spec(spec) for spec in specs]


def train(args: argparse.Namespace, sources: list[CorpusSource]) -> tuple[bytes, Sample]:
    """Sample the corpora and train. A failure while reading is raised as itself; SentencePiece's own
    failures as one TrainTokenizerError."""
    sample = Sample(sources, args.sample_docs, args.holdout_fraction, args.holdout_docs)
    print(f"training a {args.model_type} SentencePiece model of {args.vocab_size:,} ids on up to "
          f"{args.sample_docs:,} documents of {len(sources)} source(s)", file=sys.stderr)
    try:
        model_proto = train_sentencepiece(sample.sentences(), args.vocab_size, args.model_type,
                                          args.character_coverage, args.num_threads)
    except RuntimeError as exc:
        if sample.error is not None:
            raise sample.error from None
        raise TrainTokenizerError(explain_trainer_error(exc, args)) from None
    return model_proto, sample


def report(args: argparse.Namespace, sample: Sample, results: dict, identity: dict, seconds: float) -> None:
    """What was trained on, the size obtained, and the comparison on held-out text."""
    for label, trained in sample.trained.items():
        skipped = sample.skiplog.counts(label)
        bad = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"
        print(f"  {label}: {trained:,} documents trained on, {sample.held[label]:,} held out, skipped: {bad}")
    print(f"wrote {args.out}: {identity['vocab_size']:,} ids, sha256 {identity['sha256'][:12]}…, "
          f"sampled and trained in {seconds:.1f} s")
    if identity["vocab_size"] < args.vocab_size:
        print(f"note: the sample only supports {identity['vocab_size']:,} ids, fewer than the "
              f"{args.vocab_size:,} asked for; give more text (--corpus, --sample_docs) for a larger vocabulary")
    if not sample.held_out:
        print("no held-out documents to compare on (raise --holdout_fraction or give more text)")
        return
    print(f"on {len(sample.held_out):,} held-out documents (lower tokens/char = shorter sequences):")
    print(comparison_table(results))
    if len(results) == 2:
        (new_name, new), (ref_name, ref) = results.items()
        print(f"{new_name} needs {new['tokens'] / ref['tokens'] - 1:+.1%} tokens for the same text compared "
              f"with {ref_name}, with {new['vocab_size'] / ref['vocab_size']:.0%} of its vocabulary "
              f"(embedding rows)")
    elif args.compare_with:
        print(f"({args.compare_with}/tokenizer.model is not present: no comparison row)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sources = check_args(args)
        started = time.time()
        model_proto, sample = train(args, sources)
        seconds = time.time() - started
        results = compare(model_proto, sample.held_out, args.out, args.compare_with, args.num_threads) \
            if sample.held_out else {}
        info = {"args": vars(args), "sources": [s.spec for s in sources], "trained_documents": sample.trained,
                "held_out_documents": sample.held, "skipped": {k: sample.skiplog.counts(k) for k in sample.trained},
                "held_out_comparison": results}
        identity = write_tokenizer_folder(model_proto, args.out, info, args.overwrite)
    except (TrainTokenizerError, CorpusError, TokenizerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    report(args, sample, results, identity, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
