"""What eval_pretrain.py, eval.py and chat.py share: loading a model with its tokenizer, the two prompt
layouts, sampling options, prompt lists and streaming decode.

    from inference import add_model_args, load_for_inference, sft_prompt_ids, StreamDecoder
    model, tok, meta = load_for_inference("out/sft/ckpt.pt")
    ids, dropped = sft_prompt_ids(tok, "头痛怎么办？", history=[], max_prompt_tokens=256)
    decoder = StreamDecoder(tok)
    for token_id in model.generate_stream(torch.tensor([ids]), max_new_tokens=128, eos_id=EOS):
        print(decoder.push(token_id), end="", flush=True)

Layouts (the ones the data stages train on):
- pretraining: documents each followed by `<eos>`, so a new document starts right after an `<eos>`;
  continuations and plain benchmark prompts begin with one `<eos>` for that reason.
- SFT: `prompt <bos> answer <eos>` per turn, in order (dataset_sft.layout_sample); a question to answer
  is the earlier turns then `prompt <bos>`, and the answer is generated until `<eos>`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable, Iterator

import torch

from chatglm_tokenizer import (DEFAULT_TOKENIZER, ChatGLMTokenizer, TokenizerError, check_same_tokenizer,
                               load_tokenizer, resolve_tokenizer_dir, tokenizer_identity)
from corpus_io import CorpusError
from dataset_sft import Turn
from model import CheckpointError, Transformer, load_model
from precision import native_bf16
from tokenfile import DataError

REPLACEMENT_CHAR = "\ufffd"   # what SentencePiece decodes an incomplete UTF-8 byte sequence to


class InferenceError(ValueError):
    """A bad prompt file, option or input; the message is one line naming the file, line or flag."""


# errors a script's main turns into one `error: ...` line on stderr
USER_ERRORS = (CheckpointError, TokenizerError, InferenceError, CorpusError, DataError, OSError, ValueError)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's main; a known user error becomes `error: <one line>` and exit status 1."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr)
        return 1


# ---------------------------------------------------------------- model + tokenizer

def add_model_args(parser: argparse.ArgumentParser, default_ckpt: str) -> None:
    parser.add_argument("--ckpt", default=default_ckpt,
                        help="ckpt.pt from pretrain.py/sft.py, a seed-style .pth state dict, or an HF folder")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the one the checkpoint records, else chatglm_tokenizer)")
    parser.add_argument("--n_heads", type=int, default=8, help="attention heads of a seed .pth (not in its shapes)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="compute dtype via autocast; auto = bfloat16 on a GPU that has it, float32 on cpu")


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(device: str, dtype: str) -> str:
    """--dtype auto -> bfloat16 on a GPU with native bf16, else float32; any other value as given."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") and native_bf16(torch.device(device)) else "float32"
    return dtype


def autocast_for(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast context for forward passes: weights stay fp32, matmuls run in the chosen dtype."""
    dtype = resolve_dtype(device, dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def _tokenizer_folder(ckpt: str, meta: dict, override: str | None) -> str:
    """--tokenizer, else the folder the checkpoint records (when it exists here), else an HF export's own
    folder (it ships tokenizer.model), else chatglm_tokenizer."""
    if override:
        return resolve_tokenizer_dir(override)
    recorded = (meta.get("tokenizer") or {}).get("path")
    if recorded and os.path.isfile(os.path.join(resolve_tokenizer_dir(recorded), "tokenizer.model")):
        return resolve_tokenizer_dir(recorded)
    if meta["kind"] == "hf" and os.path.isfile(os.path.join(ckpt, "tokenizer.model")):
        return ckpt
    return resolve_tokenizer_dir(DEFAULT_TOKENIZER)


def load_for_inference(ckpt: str, tokenizer: str | None = None, device: str = "cpu",
                       n_heads: int = 8) -> tuple[Transformer, ChatGLMTokenizer, dict]:
    """(model in eval mode, tokenizer, meta) for any checkpoint kind model.load_model reads. Refuses a
    tokenizer whose identity differs from the one the checkpoint records, and a vocabulary the model's
    embedding cannot index."""
    model, meta = load_model(ckpt, device=device, n_heads=n_heads)
    folder = _tokenizer_folder(ckpt, meta, tokenizer)
    tok = load_tokenizer(folder)
    if meta.get("tokenizer"):
        check_same_tokenizer(meta["tokenizer"], tokenizer_identity(folder), f"checkpoint {ckpt}",
                             f"tokenizer folder {folder}")
    text_ids = tok.tokenizer.sp_model.vocab_size()   # ids encode() can produce (GLM specials excluded)
    if model.args.vocab_size < text_ids:
        raise TokenizerError(f"checkpoint {ckpt} has {model.args.vocab_size} embedding rows but tokenizer "
                             f"{folder} produces ids up to {text_ids - 1}; pass the tokenizer it was trained with")
    return model, tok, meta


def describe_model(ckpt: str, model: Transformer, meta: dict) -> str:
    args = model.args
    return (f"{ckpt}: {meta['kind']}, {model.num_params() / 1e6:.2f}M params, dim {args.dim}, "
            f"{args.n_layers} layers, context {args.max_seq_len} tokens, vocab {args.vocab_size}")


# ---------------------------------------------------------------- layouts

def special_ids(tokenizer: ChatGLMTokenizer) -> tuple[int, int]:
    """(<bos>, <eos>) ids of the project's layouts."""
    return tokenizer.special_tokens["<bos>"], tokenizer.special_tokens["<eos>"]


def document_prompt_ids(tokenizer: ChatGLMTokenizer, text: str) -> list[int]:
    """Pretraining layout: a document start (the `<eos>` that ends the previous document) then the text."""
    return [special_ids(tokenizer)[1]] + tokenizer.encode(text)


def sft_turn(tokenizer: ChatGLMTokenizer, prompt: str, answer: str | list[int]) -> Turn:
    """One finished turn; `answer` as text, or as the token ids the model generated (kept exactly)."""
    answer_ids = tokenizer.encode(answer) if isinstance(answer, str) else list(answer)
    return Turn(tokenizer.encode(prompt), answer_ids)


def history_ids(turns: list[Turn], bos: int, eos: int, cut: list[bool] | None = None) -> list[int]:
    """`prompt <bos> answer <eos>` per turn, oldest first (dataset_sft.layout_sample's ids); a turn whose
    answer was cut at max_new_tokens (cut[i]) keeps no `<eos>`: the model never produced one."""
    ids: list[int] = []
    for i, (prompt, answer) in enumerate(turns):
        ids += prompt + [bos] + answer + ([] if cut and cut[i] else [eos])
    return ids


def sft_prompt_ids(tokenizer: ChatGLMTokenizer, question: str, history: list[Turn], max_prompt_tokens: int,
                   cut: list[bool] | None = None) -> tuple[list[int], int]:
    """(ids, turns dropped): the earlier turns (history_ids) oldest first, then `question <bos>`, dropping the
    oldest turns until it fits max_prompt_tokens. A question alone too long keeps its end (the part next to
    the answer)."""
    bos, eos = special_ids(tokenizer)
    question_ids = tokenizer.encode(question) + [bos]
    if len(question_ids) > max_prompt_tokens:
        return question_ids[-max_prompt_tokens:], len(history)
    dropped = 0
    earlier = history_ids(history, bos, eos, cut)
    while dropped < len(history) and len(earlier) + len(question_ids) > max_prompt_tokens:
        dropped += 1
        earlier = history_ids(history[dropped:], bos, eos, cut[dropped:] if cut else None)
    return earlier + question_ids, dropped


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take so that max_new_tokens still fit the context (the answer gets at most half
    of it; longer generations slide the window, see model.generate_stream)."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


# ---------------------------------------------------------------- sampling

def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition_penalty", type=float, default=1.1, help="CTRL-style penalty, 1 = off")
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--seed", type=int, default=1337, help="torch seed, so a run can be repeated exactly")


def sampling_kwargs(args: argparse.Namespace, eos_id: int) -> dict:
    """Keyword arguments of Transformer.generate / generate_stream from the parsed sampling flags."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "eos_id": eos_id}


class StreamDecoder:
    """Token ids in, text out, as they arrive, never splitting a multi-byte character: the ids so far are
    decoded together and text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0   # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode_ids(self.ids)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """Whatever is still held back (an answer that really ends in an invalid byte sequence)."""
        return self._take(self.tokenizer.decode_ids(self.ids))

    def _take(self, text: str) -> str:
        new = text[self.emitted:]
        self.emitted = len(text)
        return new


def stream_text(model: Transformer, tokenizer: ChatGLMTokenizer, prompt_ids: list[int], options: dict,
                device: str, token_ids: list[int] | None = None) -> Iterator[str]:
    """Text pieces of a generated continuation as they are produced; the new token ids are appended to
    `token_ids` when given (so a caller keeps exactly what was generated, even when stopped early)."""
    decoder = StreamDecoder(tokenizer)
    for token_id in model.generate_stream(torch.tensor([prompt_ids], device=device), **options):
        if token_ids is not None:
            token_ids.append(token_id)
        piece = decoder.push(token_id)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


# ---------------------------------------------------------------- prompt lists

def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=[],
                        help="a prompt (repeat the flag for several); default: built-in examples")
    parser.add_argument("--prompts", default=None,
                        help="file of prompts: .txt one per line, or .jsonl with a 'prompt' field per line")


def read_prompts(path: str | None, given: list[str], builtin: list[str]) -> list[str]:
    """Prompts from --prompts FILE and --prompt flags (in that order), or the built-in ones when neither."""
    prompts = _read_prompt_file(path) if path else []
    prompts += given
    return prompts or list(builtin)


def _read_prompt_file(path: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InferenceError(f"{path}:{line_no}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise InferenceError(f"{path}:{line_no}: field prompt: expected a string")
                prompts.append(record["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise InferenceError(f"{path}: no prompts (blank lines are skipped)")
    return prompts
