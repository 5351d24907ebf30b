"""ChatGLM2-6B's SentencePiece tokenizer as a `transformers` tokenizer.

The vocabulary is THUDM/chatglm2-6b's `tokenizer.model`: 64,789 SentencePiece pieces plus the five
GLM specials `[MASK] [gMASK] [sMASK] sop eop` (ids 64789..64793), 64,794 ids in all, so every id fits
in a uint16. Mini-Chinese-GPT uses `<pad>`=0 (SentencePiece's `<unk>`), `<bos>`=1 and `<eos>`=2.

This file is self-contained (no imports from the rest of the repo) because `AutoTokenizer` with
`trust_remote_code=True` loads it on its own, e.g. from an exported `out/hf/` folder.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Iterable

import sentencepiece as spm
from transformers import PreTrainedTokenizer

GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


class SPTokenizer:
    """Plain SentencePiece plus the GLM specials appended after its pieces."""

    def __init__(self, model_path: str):
        self.sp_model = spm.SentencePieceProcessor(model_file=model_path)
        self.n_sp = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.unk_id()
        self.special_to_id = {tok: self.n_sp + i for i, tok in enumerate(GLM_SPECIALS)}
        self.id_to_special = {i: tok for tok, i in self.special_to_id.items()}
        self.n_words = self.n_sp + len(GLM_SPECIALS)

    def encode(self, text: str) -> list[int]:
        return self.sp_model.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp_model.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        # GLM specials are not SentencePiece pieces: drop them rather than crash on them.
        return self.sp_model.decode([int(i) for i in ids if int(i) < self.n_sp])

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_to_id:
            return self.special_to_id[piece]
        return self.sp_model.piece_to_id(piece)

    def id_to_piece(self, index: int) -> str:
        if index in self.id_to_special:
            return self.id_to_special[index]
        if 0 <= index < self.n_sp:
            return self.sp_model.id_to_piece(index)
        return ""


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, padding_side: str = "left", **kwargs: Any):
        self.vocab_file = vocab_file
        self.tokenizer = SPTokenizer(vocab_file)
        # Mini-Chinese-GPT's layout: `prompt <bos> answer <eos>`, padding with <pad>=0.
        self.special_tokens = {"<bos>": self.tokenizer.bos_id, "<eos>": self.tokenizer.eos_id,
                               "<pad>": self.tokenizer.pad_id}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "clean_up_tokenization_spaces"):
            kwargs.pop(key, None)
        # Text is always plain text: a literal "</s>" inside a document must not become <eos>.
        kwargs["split_special_tokens"] = True
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=False,
                         bos_token="<s>", eos_token="</s>", pad_token="<unk>", unk_token="<unk>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_words

    def __len__(self) -> int:
        return self.tokenizer.n_words

    def get_vocab(self) -> dict[str, int]:
        return {self.tokenizer.id_to_piece(i): i for i in range(self.tokenizer.n_words)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenizer.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.tokenizer.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokenizer.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.tokenizer.sp_model.decode_pieces([t for t in tokens if t not in self.tokenizer.special_to_id])

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once on SentencePiece's native multi-threaded encoder (no specials
        added). About ten times faster than per-text `encode` through the Python wrapper."""
        return self.tokenizer.encode_batch(texts, num_threads=num_threads)

    def decode_ids(self, ids: Iterable[int]) -> str:
        """Decode straight through SentencePiece, skipping GLM specials; the fast path for generation."""
        return self.tokenizer.decode(ids)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        # Mini-Chinese-GPT adds <bos>/<eos> explicitly where its layouts need them.
        return token_ids_0 + (token_ids_1 or [])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        target = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
