"""Tokenizer loading and identity, shared by every stage.

    from chatglm_tokenizer import load_tokenizer, tokenizer_identity
    tok = load_tokenizer()                      # chatglm_tokenizer/ (downloads tokenizer.model if missing)
    ident = tokenizer_identity("chatglm_tokenizer")   # {"path", "sha256", "vocab_size"}

A tokenizer's identity (sha256 of its `tokenizer.model` plus its vocabulary size) travels with the
.bin manifest and every checkpoint, so stages can refuse data or weights made with another tokenizer.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys

from .tokenization_chatglm import ChatGLMTokenizer

__all__ = ["ChatGLMTokenizer", "load_tokenizer", "tokenizer_identity", "resolve_tokenizer_dir",
           "check_same_tokenizer", "TokenizerError", "CHATGLM2_SHA256", "DEFAULT_TOKENIZER"]

DEFAULT_TOKENIZER = "chatglm_tokenizer"
CHATGLM2_REPO = "THUDM/chatglm2-6b"
CHATGLM2_SHA256 = "e7dc4c393423b76e4373e5157ddc34803a0189ba96b21ddbb40269d31468a6f2"
MODEL_FILE = "tokenizer.model"
UINT16_LIMIT = 65536
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TokenizerError(RuntimeError):
    """A tokenizer that is missing, corrupt, too large for uint16, or not the one expected."""


def resolve_tokenizer_dir(path: str = DEFAULT_TOKENIZER) -> str:
    """`path` as given when it exists, else relative to the repository (so scripts run from anywhere)."""
    if os.path.isdir(path) or os.path.isabs(path):
        return path
    candidate = os.path.join(_REPO_ROOT, path)
    return candidate if os.path.isdir(candidate) else path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing_message(model_path: str, why: str) -> str:
    return (f"{why}. Put THUDM/chatglm2-6b's tokenizer.model (sha256 {CHATGLM2_SHA256}) at {model_path}: "
            f"download https://huggingface.co/{CHATGLM2_REPO}/resolve/main/tokenizer.model, "
            f"or train your own with train_tokenizer.py and pass --tokenizer=PATH")


def _download_chatglm2(model_path: str) -> None:
    """Fetch tokenizer.model from the Hugging Face hub, check its sha256, move it into place."""
    try:
        from huggingface_hub import hf_hub_download
        downloaded = hf_hub_download(CHATGLM2_REPO, MODEL_FILE)
    except Exception as exc:  # offline, hub unreachable, or huggingface_hub missing
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(first_line) > 200:
            first_line = first_line[:200] + "…"
        raise TokenizerError(_missing_message(model_path, f"{model_path} is missing and the download "
                                                          f"failed ({first_line})")) from None
    if _sha256(downloaded) != CHATGLM2_SHA256:
        raise TokenizerError(_missing_message(model_path, f"downloaded {MODEL_FILE} has the wrong sha256"))
    tmp = model_path + ".tmp"
    shutil.copyfile(downloaded, tmp)
    os.replace(tmp, model_path)


def _ensure_model_file(tokenizer_dir: str) -> str:
    model_path = os.path.join(tokenizer_dir, MODEL_FILE)
    if os.path.isfile(model_path):
        return model_path
    if not os.path.isdir(tokenizer_dir):
        raise TokenizerError(f"tokenizer folder {tokenizer_dir} does not exist")
    is_chatglm = os.path.abspath(tokenizer_dir) == os.path.join(_REPO_ROOT, DEFAULT_TOKENIZER)
    if not is_chatglm:
        raise TokenizerError(f"{model_path} is missing: a tokenizer folder must hold its {MODEL_FILE}")
    print(f"{model_path} is missing; downloading it from the Hugging Face repo {CHATGLM2_REPO} ...",
          file=sys.stderr)
    _download_chatglm2(model_path)
    return model_path


def load_tokenizer(path: str = DEFAULT_TOKENIZER) -> ChatGLMTokenizer:
    """Load the tokenizer in folder `path` (its `tokenizer.model`). For the default ChatGLM2 folder a
    missing file is downloaded and checked; any failure is one TokenizerError saying what to do."""
    tokenizer_dir = resolve_tokenizer_dir(path)
    model_path = _ensure_model_file(tokenizer_dir)
    is_chatglm = os.path.abspath(tokenizer_dir) == os.path.join(_REPO_ROOT, DEFAULT_TOKENIZER)
    if is_chatglm and _sha256(model_path) != CHATGLM2_SHA256:
        raise TokenizerError(_missing_message(model_path, f"{model_path} has the wrong sha256 "
                                                          f"(corrupt or not ChatGLM2's)"))
    try:
        tokenizer = ChatGLMTokenizer(vocab_file=model_path)
    except Exception as exc:
        raise TokenizerError(f"{model_path} is not a SentencePiece model ({exc})") from None
    if tokenizer.vocab_size > UINT16_LIMIT:
        raise TokenizerError(f"{model_path} has {tokenizer.vocab_size} ids; token ids are stored as uint16, "
                             f"so at most {UINT16_LIMIT} are supported")
    return tokenizer


def tokenizer_identity(path: str = DEFAULT_TOKENIZER) -> dict:
    """{"path", "sha256", "vocab_size"} of the tokenizer in folder `path`: what manifests and
    checkpoints record so that stages can refuse data or weights made with another tokenizer."""
    tokenizer = load_tokenizer(path)
    return {"path": path, "sha256": _sha256(tokenizer.vocab_file), "vocab_size": tokenizer.vocab_size}


def check_same_tokenizer(expected: dict, actual: dict, expected_what: str, actual_what: str) -> None:
    """Raise one TokenizerError naming both sides when two tokenizer identities differ."""
    if expected.get("sha256") != actual.get("sha256") or expected.get("vocab_size") != actual.get("vocab_size"):
        raise TokenizerError(
            f"tokenizer mismatch: {expected_what} was made with {expected.get('path')} "
            f"(sha256 {str(expected.get('sha256'))[:12]}…, vocab {expected.get('vocab_size')}) but "
            f"{actual_what} uses {actual.get('path')} (sha256 {str(actual.get('sha256'))[:12]}…, "
            f"vocab {actual.get('vocab_size')})")
