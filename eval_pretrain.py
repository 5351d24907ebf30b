"""Look at a pretrained model: continue prompts, and measure perplexity and bits per byte on held-out text.

    python eval_pretrain.py --ckpt=out/pretrain/ckpt.pt                       # built-in prompts + data/pretrain_val.bin
    python eval_pretrain.py --ckpt=out/pretrain/ckpt.pt --prompt=床前明月光， --temperature=0
    python eval_pretrain.py --ckpt=out/pretrain/ckpt.pt --prompts=prompts.txt --samples_only
    python eval_pretrain.py --ckpt=out/pretrain/ckpt.pt --data=notes.txt --ppl_only   # raw text, one document a line
    python eval_pretrain.py --ckpt=out/pretrain/ckpt.pt --data=held_out.jsonl --text_field=text --stride=256

How the numbers are defined (the same for every --data kind):
- The token stream is the documents, each followed by `<eos>` (data_process.py's layout; a .bin already is
  that, .txt/.jsonl/.json are tokenized here). One `<eos>` is put in front as the start of the first document,
  so EVERY token of the stream is predicted exactly once, `<eos>` tokens included.
- The stream is cut into windows of max_seq_len inputs. --stride=max_seq_len (default): windows do not
  overlap, so a token sees 0..max_seq_len-1 tokens of context. A smaller stride slides the window and
  scores only the tokens a window adds, so each token sees at least max_seq_len - stride tokens (slower,
  slightly lower perplexity).
- loss = total nats / tokens predicted; perplexity = exp(loss).
- bits per byte = total nats / ln 2 / UTF-8 bytes of the text the tokens decode to, each document decoded
  on its own; an `<eos>` adds its loss but no bytes. Unlike perplexity it does not depend on the
  tokenizer, so models with different vocabularies compare on the same text.
- chance = a uniform guess over the vocabulary (loss ln V); unigram = the entropy of this text's own
  token frequencies, what a model that learned nothing but token counts would score (an optimistic one:
  the counts come from the evaluated text itself).
- Per source: a .bin whose manifest records its sources (data_process.py --corpus=NAME=...) is scored source
  by source, each one's tokens as a stream of their own, and the numbers are printed per source beside the
  total, which is then their token-weighted sum (a window never spans two sources).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from chatglm_tokenizer import ChatGLMTokenizer
from corpus_io import SkipLog, field_text, file_layout, iter_records, write_atomic_text
from inference import (InferenceError, add_model_args, add_prompt_args, add_sampling_args, autocast_for,
                       describe_model, document_prompt_ids, load_for_inference, pick_device, read_prompts,
                       run_main, sampling_kwargs, special_ids, stream_text)
from model import Transformer
from tokenfile import read_bin, source_layout

DEFAULT_DATA = "data/pretrain_val.bin"
BUILTIN_PROMPTS = [
    "床前明月光，疑是地上霜。举头望明月，",
    "高血压患者在日常饮食中应该注意",
    "感冒和流行性感冒的区别在于",
    "中国的首都是",
    "人工智能是",
]
ENCODE_CHUNK_DOCS = 4096   # documents per native batch-encode call: fast, with bounded memory


@dataclass
class PerplexityReport:
    data: str
    tokens: int             # tokens predicted (every token of the stream, <eos> included)
    utf8_bytes: int         # bytes of the text the tokens decode to
    total_nats: float
    loss: float             # nats per token
    perplexity: float
    bits_per_byte: float
    seq_len: int
    stride: int
    vocab_size: int
    chance_loss: float      # ln(vocab_size)
    unigram_loss: float     # entropy of the stream's own token frequencies
    unigram_bits_per_byte: float


# ---------------------------------------------------------------- reading the held-out tokens

def _iter_documents(path: str, text_field: str, skiplog: SkipLog) -> Iterator[str]:
    layout = file_layout(path)
    for record in iter_records(path, layout):
        if record.error is None:
            try:
                text = record.value if layout == "txt" else field_text(record.value, text_field)
            except ValueError as exc:
                skiplog.skip(path, record.where, str(exc))
                continue
            if text:
                yield text
        else:
            skiplog.skip(path, record.where, record.error)


def tokenize_text_file(path: str, tokenizer: ChatGLMTokenizer, text_field: str = "text",
                       max_tokens: int | None = None) -> np.ndarray:
    """Tokens of a .txt (each non-blank line a document) or .jsonl/.json (`text_field` of each record), laid out
    as data_process.py does: each document followed by <eos>; reading stops once max_tokens are there.
    Bad lines are skipped, counted, reported."""
    eos = special_ids(tokenizer)[1]
    skiplog, parts, chunk = SkipLog(), [], []
    limit, n_tokens = max_tokens or math.inf, 0

    def flush() -> int:
        """Tokenize the pending documents; the number of tokens so far."""
        nonlocal n_tokens
        for ids in tokenizer.encode_batch(chunk, num_threads=os.cpu_count() or 1):
            parts.append(np.array(ids + [eos], dtype=np.uint16))
            n_tokens += len(ids) + 1
        chunk.clear()
        return n_tokens

    for text in tqdm(_iter_documents(path, text_field, skiplog), desc="tokenizing", unit=" docs", leave=False):
        chunk.append(text)
        if len(chunk) == ENCODE_CHUNK_DOCS and flush() >= limit:
            break
    flush()
    if skiplog.total(path):
        print(f"{path}: skipped {skiplog.total(path)} unreadable line(s): {skiplog.counts(path)}", file=sys.stderr)
    if not parts:
        raise InferenceError(f"{path}: no documents to evaluate")
    return np.concatenate(parts)


def load_eval_tokens(path: str, tokenizer: ChatGLMTokenizer, max_tokens: int | None, text_field: str = "text",
                     vocab_size: int | None = None) -> np.ndarray:
    """The held-out token stream of --data (its first max_tokens), checked to fit the model's vocabulary."""
    if not os.path.isfile(path):
        raise InferenceError(f"--data {path}: no such file")
    if path.endswith(".bin"):
        tokens = read_bin(path, os.path.dirname(tokenizer.vocab_file))
    else:
        tokens = tokenize_text_file(path, tokenizer, text_field, max_tokens)
    tokens = tokens[:max_tokens] if max_tokens else tokens
    if len(tokens) == 0:
        raise InferenceError(f"--data {path}: holds no tokens")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise InferenceError(f"--data {path}: holds token id {int(tokens.max())} but the model has {vocab_size} "
                             f"ids (made with another tokenizer?)")
    return tokens


# ---------------------------------------------------------------- the numbers

def utf8_bytes(tokens: np.ndarray, tokenizer: ChatGLMTokenizer, eos_id: int) -> int:
    """UTF-8 bytes of the text `tokens` decode to: each document (the tokens between two <eos>) decoded on
    its own, <eos> itself 0 bytes; a last document without its <eos> counts too."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    total, start = 0, 0
    for end in list(ends) + [len(tokens)]:
        if end > start:
            total += len(tokenizer.decode_ids(tokens[start:end].tolist()).encode("utf-8"))
        start = end + 1
    return total


def window_plan(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over the stream s = [<eos>] + tokens (n_tokens + 1 ids): (begin, end, first_new) means
    inputs s[begin:end], targets s[begin+1:end+1], of which only targets at index >= first_new are scored,
    so that each of s[1..n_tokens] is scored by exactly one window."""
    if not 0 < stride <= seq_len:
        raise InferenceError(f"--stride must be in 1..max_seq_len ({seq_len}), got {stride}")
    windows, scored_to, begin = [], 0, 0
    while scored_to < n_tokens:
        end = min(begin + seq_len, n_tokens)
        windows.append((begin, end, scored_to + 1))
        scored_to = end
        begin += stride
    return windows


def _stream_slice(tokens: np.ndarray, start: int, stop: int, eos_id: int) -> np.ndarray:
    """s[start:stop] of the stream s = [<eos>] + tokens, without copying the whole (memory-mapped) file."""
    body = np.asarray(tokens[max(start - 1, 0):stop - 1], dtype=np.int64)
    return np.concatenate([[eos_id], body]) if start == 0 else body


def _window_batch(tokens: np.ndarray, windows: list[tuple[int, int, int]], seq_len: int,
                  eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, seq_len]; padding and already-scored targets are -100 (ignored)."""
    x = torch.zeros(len(windows), seq_len, dtype=torch.long)
    y = torch.full((len(windows), seq_len), -100, dtype=torch.long)
    for row, (begin, end, first_new) in enumerate(windows):
        inputs = _stream_slice(tokens, begin, end, eos_id)
        targets = _stream_slice(tokens, begin + 1, end + 1, eos_id)
        targets[:max(first_new - begin - 1, 0)] = -100     # target j is stream index begin + 1 + j
        x[row, :len(inputs)] = torch.from_numpy(inputs)
        y[row, :len(targets)] = torch.from_numpy(targets)
    return x, y


@torch.inference_mode()
def total_loss(model: Transformer, tokens: np.ndarray, eos_id: int, stride: int | None = None,
               batch_size: int = 8, device: str = "cpu",
               autocast: contextlib.AbstractContextManager | None = None) -> tuple[float, int]:
    """(summed nats, tokens scored) of every token of [<eos>] + tokens after the first (see window_plan)."""
    seq_len = model.args.max_seq_len
    windows = window_plan(len(tokens), seq_len, stride or seq_len)
    total, scored = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit=" batches", leave=False):
        x, y = _window_batch(tokens, windows[i:i + batch_size], seq_len, eos_id)
        with autocast or contextlib.nullcontext():
            _, loss = model(x.to(device), targets=y.to(device), reduction="sum")
        total += float(loss)
        scored += int((y != -100).sum())
    return total, scored


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies of `tokens` (a model that knows only these counts)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    probs = counts[counts > 0] / len(tokens)
    return float(-(probs * np.log(probs)).sum())


def perplexity_report(model: Transformer, tokenizer: ChatGLMTokenizer, tokens: np.ndarray, data: str,
                      stride: int | None, batch_size: int, device: str,
                      autocast: contextlib.AbstractContextManager | None) -> PerplexityReport:
    eos = special_ids(tokenizer)[1]
    seq_len, vocab = model.args.max_seq_len, model.args.vocab_size
    nats, scored = total_loss(model, tokens, eos, stride, batch_size, device, autocast)
    n_bytes = utf8_bytes(tokens, tokenizer, eos)
    loss, unigram = nats / scored, unigram_entropy(tokens, vocab)
    return PerplexityReport(
        data=data, tokens=scored, utf8_bytes=n_bytes, total_nats=nats, loss=loss, perplexity=math.exp(loss),
        bits_per_byte=nats / math.log(2) / max(n_bytes, 1), seq_len=seq_len, stride=stride or seq_len,
        vocab_size=vocab, chance_loss=math.log(vocab), unigram_loss=unigram,
        unigram_bits_per_byte=unigram * scored / math.log(2) / max(n_bytes, 1))


def source_reports(model: Transformer, tokenizer: ChatGLMTokenizer, tokens: np.ndarray, data: str,
                   layout: list[tuple[str, int, int]], stride: int | None, batch_size: int, device: str,
                   autocast_for_source) -> dict[str, PerplexityReport]:
    """A report per source of the stream (`layout`: the sources the --max_tokens cut leaves), each scored alone."""
    return {name: perplexity_report(model, tokenizer, tokens[start:min(end, len(tokens))], f"{data} [{name}]", stride,
                                    batch_size, device, autocast_for_source())
            for name, start, end in layout}


def combined_report(parts: list[PerplexityReport], tokens: np.ndarray, data: str) -> PerplexityReport:
    """The whole stream's report from its sources' reports: their nats, tokens and bytes added up."""
    first = parts[0]
    nats, scored, n_bytes = (sum(getattr(r, k) for r in parts) for k in ("total_nats", "tokens", "utf8_bytes"))
    loss, unigram = nats / scored, unigram_entropy(tokens, first.vocab_size)
    return PerplexityReport(
        data=data, tokens=scored, utf8_bytes=n_bytes, total_nats=nats, loss=loss, perplexity=math.exp(loss),
        bits_per_byte=nats / math.log(2) / max(n_bytes, 1), seq_len=first.seq_len, stride=first.stride,
        vocab_size=first.vocab_size, chance_loss=first.chance_loss, unigram_loss=unigram,
        unigram_bits_per_byte=unigram * scored / math.log(2) / max(n_bytes, 1))


def format_sources(reports: dict[str, PerplexityReport]) -> str:
    width = max(len(name) for name in reports)
    lines = [f"{'source':<{width}}  {'tokens':>12}  {'loss':>7}  {'perplexity':>12}  {'bits/byte':>9}"]
    lines += [f"{name:<{width}}  {r.tokens:>12,}  {r.loss:>7.4f}  {r.perplexity:>12,.2f}  {r.bits_per_byte:>9.4f}"
              for name, r in reports.items()]
    return "\n".join(lines)


def format_report(r: PerplexityReport) -> str:
    return "\n".join([
        f"data {r.data}: {r.tokens:,} tokens scored ({r.utf8_bytes:,} UTF-8 bytes), windows of {r.seq_len}, "
        f"stride {r.stride}",
        f"model   loss {r.loss:.4f} nats/token   perplexity {r.perplexity:,.2f}   bits/byte {r.bits_per_byte:.4f}",
        f"unigram loss {r.unigram_loss:.4f} nats/token   perplexity {math.exp(r.unigram_loss):,.2f}   "
        f"bits/byte {r.unigram_bits_per_byte:.4f}   (token frequencies of this text only)",
        f"chance  loss {r.chance_loss:.4f} nats/token   perplexity {r.vocab_size:,}   (uniform over the vocabulary)",
        "guide: near chance = untrained; near unigram = learned word frequencies only; well below unigram = "
        "uses context. Compare runs on the same --data, and models with other tokenizers by bits/byte.",
    ])


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_ckpt="out/pretrain/ckpt.pt")
    add_prompt_args(parser)
    add_sampling_args(parser, max_new_tokens=100)
    parser.add_argument("--data", default=None,
                        help=f".bin, .txt, .jsonl or .json held-out data (default {DEFAULT_DATA})")
    parser.add_argument("--text_field", default="text", help="field of a .jsonl or .json --data holding the text")
    parser.add_argument("--stride", type=int, default=None, help="window stride in tokens (default max_seq_len)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens of --data")
    parser.add_argument("--out", default=None, help="also write the perplexity report as JSON here")
    parser.add_argument("--samples_only", action="store_true", help="skip perplexity")
    parser.add_argument("--ppl_only", action="store_true", help="skip the prompt continuations")
    return parser.parse_args(argv)


def print_samples(model: Transformer, tokenizer: ChatGLMTokenizer, args: argparse.Namespace, device: str) -> None:
    options = sampling_kwargs(args, eos_id=special_ids(tokenizer)[1])
    for prompt in read_prompts(args.prompts, args.prompt, BUILTIN_PROMPTS):
        print(f"--- {prompt}", end="", flush=True)
        with autocast_for(device, args.dtype):
            for piece in stream_text(model, tokenizer, document_prompt_ids(tokenizer, prompt), options, device):
                print(piece, end="", flush=True)
        print()


def measure(model: Transformer, tokenizer: ChatGLMTokenizer, data: str, args: argparse.Namespace,
            device: str) -> tuple[PerplexityReport, dict[str, PerplexityReport]]:
    """The report of `data`, and one per source when it is a .bin whose manifest records several."""
    tokens = load_eval_tokens(data, tokenizer, args.max_tokens, args.text_field, model.args.vocab_size)
    layout = source_layout(data, os.path.getsize(data) // 2) if data.endswith(".bin") else []
    layout = [(name, start, end) for name, start, end in layout if min(end, len(tokens)) > start]  # --max_tokens cut
    if len(layout) > 1:
        per_source = source_reports(model, tokenizer, tokens, data, layout, args.stride, args.batch_size, device,
                                    lambda: autocast_for(device, args.dtype))
        return combined_report(list(per_source.values()), tokens, data), per_source
    return perplexity_report(model, tokenizer, tokens, data, args.stride, args.batch_size, device,
                             autocast_for(device, args.dtype)), {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, tokenizer, meta = load_for_inference(args.ckpt, args.tokenizer, device, args.n_heads)
    print(describe_model(args.ckpt, model, meta))
    torch.manual_seed(args.seed)
    if not args.ppl_only:
        print_samples(model, tokenizer, args, device)
    if args.samples_only:
        return 0
    data = args.data or DEFAULT_DATA
    if args.data is None and not os.path.isfile(data):
        print(f"perplexity skipped: {data} not found (make it with data_process.py, or pass --data=FILE)")
        return 0
    report, per_source = measure(model, tokenizer, data, args, device)
    print(format_report(report))
    if per_source:
        print(format_sources(per_source))
    if args.out:
        result = asdict(report) | ({"sources": {k: asdict(r) for k, r in per_source.items()}} if per_source else {})
        write_atomic_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
