"""Export weights to a Hugging Face `LlamaForCausalLM` folder, tokenizer included.

    python export_hf.py --ckpt out/sft/ckpt.pt --out out/hf
    python export_hf.py --ckpt llama2_chinese_92m.pth --out out/hf_seed --n_heads=8   # a seed state dict
    python export_hf.py --ckpt out/sft/ckpt.pt --out out/hf_bf16 --dtype=bfloat16
    python export_hf.py --ckpt out/sft_lora/ckpt.pt --out out/hf                  # LoRA: adapters merged
    python export_hf.py --ckpt out/sft_lora/ckpt.pt --out out/hf --lora=separate  # base + PEFT adapter folder

The folder (config.json, model.safetensors, generation_config.json, tokenizer.model, tokenizer_config.json,
tokenization_chatglm.py) loads offline with

    AutoModelForCausalLM.from_pretrained("out/hf")
    AutoTokenizer.from_pretrained("out/hf", trust_remote_code=True)

and from there vLLM or llama.cpp's convert_hf_to_gguf.py. Our rotary embedding rotates interleaved pairs
(llama2.c); HF's rotates halves, so wq/wk rows are permuted on the way out (model.to_hf_state_dict) and
back on the way in (model.load_model reads these folders too). The folder is written under a temporary
name and renamed into place, so a crash never leaves a half-written export at --out.

A LoRA checkpoint (sft.py/dpo.py --lora_rank) is exported with its adapters merged into the weights. With
--lora=separate, --out gets the base model instead and OUT_lora/ a PEFT adapter folder (adapter_config.json,
adapter_model.safetensors; wq/wk rows of lora_B permuted like the weights), loadable offline with

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/hf"), "out/hf_lora")
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
from lora import TARGETS as TARGET_MODULES
from model import (HF_LAYER_NAMES, CheckpointError, ModelArgs, Transformer, load_model, lora_base_path,
                   rope_pairs_to_halves, to_hf_state_dict)

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


def peft_adapter_state(adapters: dict, args: ModelArgs) -> dict:
    """Our adapter tensors (layers.N.attention.wq.lora_A, …) as PEFT saves them for LlamaForCausalLM
    (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, …). A permutation of W's rows is one of
    B's rows (delta W = B A), so lora_B of wq/wk goes to HF's rotate-half order as the weights do."""
    state = {}
    for key, tensor in adapters.items():
        _, index, sublayer, linear, part = key.split(".")   # layers N attention wq lora_A
        suffix = f"{sublayer}.{linear}"
        if part == "lora_B" and suffix in ("attention.wq", "attention.wk"):
            tensor = rope_pairs_to_halves(tensor, args.n_heads if suffix.endswith("wq") else args.kv_heads)
        hf_module = HF_LAYER_NAMES[f"{suffix}.weight"].removesuffix(".weight")
        state[f"base_model.model.model.layers.{index}.{hf_module}.{part}.weight"] = tensor.contiguous()
    return state


def _write_peft_adapter(lora: dict, adapters: dict, args: ModelArgs, base_out: str, dest: str, dtype: str) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file
    targets = sorted({HF_LAYER_NAMES[f"{TARGET_MODULES[t]}.weight"].split(".")[1] for t in lora["targets"].split(",")})
    LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_out).save_pretrained(dest)
    state = {k: v.to(DTYPES[dtype]) for k, v in peft_adapter_state(adapters, args).items()}
    save_file(state, os.path.join(dest, "adapter_model.safetensors"), metadata={"format": "pt"})


def _export_folder(out: str, write) -> str:
    """Run write(tmp) into a fresh temporary folder beside `out`, then move it to `out` (atomically)."""
    out = os.path.abspath(out)
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; give a folder path")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        write(tmp)
        replace_folder(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out


def export_hf(ckpt: str, out: str, n_heads: int = 8, dtype: str = "float32", tokenizer: str | None = None,
              lora: str = "merge") -> str:
    """Write the HF folder for `ckpt` (any kind load_model reads) at `out`; returns the tokenizer folder used.
    lora="separate" (a LoRA checkpoint only): the base model at `out`, the PEFT adapter at OUT_lora."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if lora not in ("merge", "separate"):
        raise ValueError(f"--lora must be merge or separate, got {lora!r}")
    model, meta = load_model(ckpt, n_heads=n_heads)
    tokenizer_folder = _tokenizer_source(meta, tokenizer, ckpt)
    if lora == "separate":
        if not meta.get("lora"):
            raise ValueError(f"--lora=separate: {ckpt} is not a LoRA checkpoint (it holds full weights)")
        model, _ = load_model(lora_base_path(ckpt, meta["lora"]), n_heads=n_heads)
        adapters = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
        base_out = os.path.abspath(out)
        _export_folder(out.rstrip(os.sep) + "_lora", lambda tmp: _write_peft_adapter(
            meta["lora"], adapters, model.args, base_out, tmp, dtype))
    _export_folder(out, lambda tmp: _write_folder(model, dtype, tokenizer_folder, tmp))
    return tokenizer_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face LlamaForCausalLM folder.")
    parser.add_argument("--ckpt", required=True, help="ckpt.pt, a seed state dict .pth, or an exported HF folder")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype in the export")
    parser.add_argument("--n_heads", type=int, default=8, help="heads of a seed state dict (not in its shapes)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the one the checkpoint records, else chatglm_tokenizer)")
    parser.add_argument("--lora", default="merge", choices=("merge", "separate"),
                        help="a LoRA checkpoint: merge its adapters into the weights (default), or write the base "
                             "model at --out and a PEFT adapter folder at OUT_lora")
    opts = parser.parse_args(argv)
    try:
        tokenizer_folder = export_hf(opts.ckpt, opts.out, opts.n_heads, opts.dtype, opts.tokenizer, opts.lora)
    except (CheckpointError, TokenizerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {opts.out}: LlamaForCausalLM ({opts.dtype}) from {opts.ckpt}, tokenizer from {tokenizer_folder}"
          + (f"; PEFT adapter in {opts.out.rstrip(os.sep)}_lora" if opts.lora == "separate" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
