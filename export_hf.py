"""Export weights to a Hugging Face `LlamaForCausalLM` folder, tokenizer included.

    python export_hf.py --ckpt out/sft/ckpt.pt --out out/hf
    python export_hf.py --ckpt llama2_chinese_92m.pth --out out/hf_seed --n_heads=8   # a seed state dict
    python export_hf.py --ckpt out/sft/ckpt.pt --out out/hf_bf16 --dtype=bfloat16

The folder (config.json, model.safetensors, generation_config.json, tokenizer.model, tokenizer_config.json,
tokenization_chatglm.py) loads offline with

    AutoModelForCausalLM.from_pretrained("out/hf")
    AutoTokenizer.from_pretrained("out/hf", trust_remote_code=True)

and from there vLLM or llama.cpp's convert_hf_to_gguf.py. Our rotary embedding rotates interleaved pairs
(llama2.c); HF's rotates halves, so wq/wk rows are permuted on the way out (model.to_hf_state_dict) and
back on the way in (model.load_model reads these folders too). The folder is written under a temporary
name and renamed into place, so a crash never leaves a half-written export at --out.
"""
from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile

import torch

from chatglm_tokenizer import (DEFAULT_TOKENIZER, TokenizerError, check_same_tokenizer, resolve_tokenizer_dir,
                               tokenizer_identity)
from corpus_io import replace_folder
from model import CheckpointError, ModelArgs, Transformer, load_model, to_hf_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py")
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0


def hf_config(args: ModelArgs, dtype: str):
    """transformers.LlamaConfig describing the same network as `args`."""
    from transformers import LlamaConfig
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:   # transformers 5
        version_specific = {"rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
                            "dtype": dtype}
    else:   # transformers 4 would keep unknown keys as inert attributes: rope_theta would silently be 10000
        version_specific = {"rope_theta": args.rope_theta, "torch_dtype": dtype}
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, hidden_act="silu", max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, tie_word_embeddings=args.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **version_specific)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _tokenizer_source(meta: dict, tokenizer: str | None, ckpt: str) -> str:
    """The tokenizer folder the weights were trained with, checked against the checkpoint's identity."""
    trained_with = meta.get("tokenizer")
    folder = resolve_tokenizer_dir(tokenizer or (trained_with or {}).get("path") or DEFAULT_TOKENIZER)
    actual = tokenizer_identity(folder)
    if trained_with:
        check_same_tokenizer(trained_with, actual, f"checkpoint {ckpt}", f"tokenizer folder {folder}")
    return folder


def _copy_tokenizer(folder: str, dest: str) -> None:
    """tokenizer.model from `folder`; the wrapper code and config from it too, else from chatglm_tokenizer/
    (a folder made by train_tokenizer.py may hold only its tokenizer.model)."""
    fallback = resolve_tokenizer_dir(DEFAULT_TOKENIZER)
    for name in TOKENIZER_FILES:
        source = os.path.join(folder, name)
        if not os.path.isfile(source):
            source = os.path.join(fallback, name)
        shutil.copyfile(source, os.path.join(dest, name))


def _write_folder(model: Transformer, dtype: str, tokenizer_folder: str, dest: str) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    hf_config(model.args, dtype).save_pretrained(dest)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(dest)
    state = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state_dict(model.state_dict(), model.args).items()}
    save_file(state, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(tokenizer_folder, dest)


def export_hf(ckpt: str, out: str, n_heads: int = 8, dtype: str = "float32", tokenizer: str | None = None) -> str:
    """Write the HF folder for `ckpt` (any kind load_model reads) at `out`; returns the tokenizer folder used."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, meta = load_model(ckpt, n_heads=n_heads)
    tokenizer_folder = _tokenizer_source(meta, tokenizer, ckpt)
    out = os.path.abspath(out)
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; give a folder path")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        _write_folder(model, dtype, tokenizer_folder, tmp)
        replace_folder(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return tokenizer_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face LlamaForCausalLM folder.")
    parser.add_argument("--ckpt", required=True, help="ckpt.pt, a seed state dict .pth, or an exported HF folder")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype in the export")
    parser.add_argument("--n_heads", type=int, default=8, help="heads of a seed state dict (not in its shapes)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the one the checkpoint records, else chatglm_tokenizer)")
    opts = parser.parse_args(argv)
    try:
        tokenizer_folder = export_hf(opts.ckpt, opts.out, opts.n_heads, opts.dtype, opts.tokenizer)
    except (CheckpointError, TokenizerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {opts.out}: LlamaForCausalLM ({opts.dtype}) from {opts.ckpt}, tokenizer from {tokenizer_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
