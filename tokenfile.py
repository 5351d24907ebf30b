"""The token-file format every stage shares (DESIGN.md): `x/foo.bin` holds little-endian uint16 token ids,
documents each followed by `<eos>`, no header, so `np.memmap(path, dtype=np.uint16)` reads it; `x/foo.json`
beside it is the manifest data_process.py writes (tokenizer sha256 and vocabulary size, dtype, counts per
source). This module owns the paths, reading, and the tokenizer identity a .bin carries; data_process.py
writes the files, dataset.py, pretrain.py, eval_pretrain.py and eval.py read them through it.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

from chatglm_tokenizer import TokenizerError, check_same_tokenizer, tokenizer_identity

TOKEN_DTYPE = np.uint16
MAKE_BIN_HINT = "run python data_process.py first"
_SCAN_CHUNK_TOKENS = 1 << 26   # token-id range check of a manifest-less .bin, 128 MB at a time


class DataError(RuntimeError):
    """Missing, malformed or mismatched pretraining data; the message is one line naming the file."""


def resolve_bin_paths(spec: str) -> list[str]:
    """The .bin files named by `spec`: comma-separated paths or glob patterns, each glob sorted."""
    paths: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else ([item] if os.path.exists(item) else [])
        if not matches:
            raise DataError(f"{item}: no such file; {MAKE_BIN_HINT} (it writes data/pretrain_data.bin)")
        paths += matches
    if not paths:
        raise DataError(f"--data={spec!r} names no .bin file; {MAKE_BIN_HINT}")
    return paths


def read_manifest(bin_path: str) -> dict | None:
    """The manifest beside `bin_path` as a dict, or None when there is none."""
    path = manifest_path(bin_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); {MAKE_BIN_HINT} to rewrite it") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: manifest is not a JSON object; {MAKE_BIN_HINT} to rewrite it")
    return manifest


def manifest_tokenizer(manifest: dict, path: str) -> dict:
    """The tokenizer identity {"path", "sha256", "vocab_size"} a manifest records."""
    ident = manifest.get("tokenizer")
    if not isinstance(ident, dict):
        ident = {"path": ident, "sha256": manifest.get("tokenizer_sha256"), "vocab_size": manifest.get("vocab_size")}
    if not ident.get("sha256") or not isinstance(ident.get("vocab_size"), int):
        raise DataError(f"{manifest_path(path)}: manifest lacks the tokenizer sha256 / vocab_size; "
                        f"{MAKE_BIN_HINT} to rewrite it")
    return {"path": ident.get("path"), "sha256": ident["sha256"], "vocab_size": ident["vocab_size"]}


def bin_tokenizer(bin_path: str) -> dict | None:
    """The tokenizer identity the manifest beside `bin_path` records, or None when there is no manifest."""
    manifest = read_manifest(bin_path)
    return None if manifest is None else manifest_tokenizer(manifest, bin_path)


def open_tokens(path: str, manifest: dict | None) -> np.memmap | np.ndarray:
    """Memory-map a .bin as uint16 after checking its size against the format and the manifest."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; {MAKE_BIN_HINT}")
    size = os.path.getsize(path)
    if size % 2:
        raise DataError(f"{path}: {size} bytes is not a whole number of uint16 tokens (truncated or not a .bin)")
    if manifest is not None:
        if manifest.get("dtype", "uint16") != "uint16":
            raise DataError(f"{manifest_path(path)}: dtype {manifest.get('dtype')!r}, expected uint16")
        expected = manifest.get("tokens")
        if isinstance(expected, int) and expected != size // 2:
            raise DataError(f"{path}: holds {size // 2} tokens but its manifest says {expected} "
                            f"(truncated or rewritten); {MAKE_BIN_HINT}")
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def max_token(tokens: np.ndarray) -> int:
    highest = 0
    for start in range(0, len(tokens), _SCAN_CHUNK_TOKENS):
        highest = max(highest, int(tokens[start:start + _SCAN_CHUNK_TOKENS].max()))
    return highest


def data_tokenizer(paths: list[str], expected: dict | None, log: bool = True) -> dict:
    """The tokenizer identity of these .bin files, checked against `expected` (the run's, or None).

    Every manifest must name the same tokenizer, and `expected` when given; a manifest-less file is
    accepted with a warning only when `expected` is given (see the module docstring)."""
    found, found_in = expected, "this run's --tokenizer"
    for path in paths:
        manifest = read_manifest(path)
        if manifest is None:
            if expected is None:
                raise DataError(f"{path} has no manifest {manifest_path(path)}, so nothing says which tokenizer "
                                f"made it: {MAKE_BIN_HINT}, or pass --tokenizer=DIR naming that tokenizer")
            if log:
                print(f"warning: {path} has no manifest; assuming it was made with {expected.get('path')} "
                      f"(vocab {expected['vocab_size']}) and checking its token ids", file=sys.stderr)
            continue
        ident = manifest_tokenizer(manifest, path)
        try:
            if found is not None:
                check_same_tokenizer(ident, found, path, found_in)
        except TokenizerError as exc:
            raise DataError(str(exc)) from None
        if found is None:
            found, found_in = ident, path
    if found is None:
        raise DataError(f"no tokenizer identity for {', '.join(paths)}")
    return found


def manifest_path(bin_path: str) -> str:
    """`x/foo.bin` → `x/foo.json`."""
    return os.path.splitext(bin_path)[0] + ".json"


def default_val_path(out: str) -> str:
    """pretrain_data.bin → pretrain_val.bin; any other foo.bin → foo_val.bin."""
    folder, name = os.path.split(out)
    stem, ext = os.path.splitext(name)
    stem = stem[:-len("_data")] + "_val" if stem.endswith("_data") else stem + "_val"
    return os.path.join(folder, stem + (ext or ".bin"))


def read_bin(path: str, tokenizer_folder: str) -> np.ndarray:
    """Tokens of a data_process.py .bin (uint16, documents + <eos>); refuses one whose manifest (the .json
    beside it) names another tokenizer."""
    recorded = bin_tokenizer(path)
    if recorded is not None:
        check_same_tokenizer(recorded, tokenizer_identity(tokenizer_folder), f"data {path}",
                             f"tokenizer folder {tokenizer_folder}")
    if os.path.getsize(path) % 2:
        raise DataError(f"{path}: {os.path.getsize(path)} bytes is not a whole number of uint16 tokens")
    return np.memmap(path, dtype=np.uint16, mode="r")


def with_token_offsets(sources: list[dict]) -> list[dict]:
    """Per-source manifest entries (in file order, each with its `tokens`) plus where each source's tokens sit
    in the .bin: token_start and token_end (exclusive). data_process.py writes sources one after another."""
    start, placed = 0, []
    for source in sources:
        placed.append(dict(source, token_start=start, token_end=start + source["tokens"]))
        start += source["tokens"]
    return placed


def source_layout(bin_path: str, n_tokens: int) -> list[tuple[str, int, int]]:
    """(source name, first token, end token) of each non-empty source of a .bin, in file order, from its
    manifest; one source named after the file when the manifest records none (or no manifest)."""
    manifest = read_manifest(bin_path) or {}
    sources = manifest.get("sources")
    whole = [(os.path.splitext(os.path.basename(bin_path))[0], 0, n_tokens)]
    if not isinstance(sources, list) or not sources or \
            not all(isinstance(s, dict) and isinstance(s.get("tokens"), int) for s in sources):
        return whole
    if not all("token_start" in s for s in sources):   # a manifest from before offsets: sources lie in order
        sources = with_token_offsets(sources)
    layout = [(str(s["name"]), int(s["token_start"]), int(s["token_end"])) for s in sources
              if s.get("token_end", 0) > s.get("token_start", 0)]
    if not layout or layout[-1][2] != n_tokens:
        raise DataError(f"{manifest_path(bin_path)}: its sources end at token {layout[-1][2] if layout else 0:,} "
                        f"but {bin_path} holds {n_tokens:,}; {MAKE_BIN_HINT} to rewrite it")
    return layout
