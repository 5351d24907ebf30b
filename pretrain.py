"""Pretrain the Llama-style model on token .bin files (the loop itself lives in trainer.py).

    python data_process.py                                       # data/pretrain_data.bin + pretrain_val.bin
    python pretrain.py --preset=tiny --max_iters=200             # CPU demo scale
    python pretrain.py --preset=92m                              # one GPU
    torchrun --standalone --nproc_per_node=4 pretrain.py --preset=92m
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        pretrain.py --preset=218m --fsdp
    python pretrain.py --resume                                  # continue out/pretrain after a stop or crash
    python pretrain.py --data="data/part_*.bin" --val_data=data/pretrain_val.bin --batch_tokens=131072
    python pretrain.py --help                                    # every flag, with its meaning

Writes out/pretrain/: ckpt.pt (newest, resumable), ckpt_NNNNNNN.pt (the last --keep_last), best.pt (lowest
validation loss), metrics.jsonl, loss.png. Validation reads the split data_process.py wrote beside the first
data file (pretrain_data.bin -> pretrain_val.bin) when it exists, or --val_data.
"""
from __future__ import annotations

import os
import sys

from chatglm_tokenizer import tokenizer_identity
from dataset import PretrainDataset
from train_config import TrainConfig
from trainer import configure, resolve_model_args, run_cli, train
from tokenfile import DataError, data_tokenizer, default_val_path, resolve_bin_paths

DEFAULTS = TrainConfig(data="data/pretrain_data.bin", out_dir="out/pretrain", preset="92m", lr=3e-4, min_lr=3e-5,
                       micro_batch_size=16, grad_accum_steps=2, epochs=1.0)


def val_paths(cfg: TrainConfig, train_paths: list[str]) -> list[str] | None:
    """--val_data's files; by default data_process.py's split beside the first training file, when present."""
    if cfg.val_data.lower() == "none":
        return None
    if cfg.val_data:
        return resolve_bin_paths(cfg.val_data)
    default = default_val_path(train_paths[0])
    return [default] if os.path.isfile(default) else None


def check_held_out(cfg: TrainConfig, train_paths: list[str], validation: list[str] | None) -> None:
    """Refuse validation files that are also training files (e.g. --data="data/*.bin" matches pretrain_val.bin):
    the val loss would then measure memorisation, not generalisation."""
    trained = {os.path.realpath(p) for p in train_paths}
    shared = [p for p in validation or [] if os.path.realpath(p) in trained]
    if shared:
        raise DataError(f"{shared[0]} is validation data but --data={cfg.data} also trains on it: narrow --data "
                        f"to leave it out, or pass another --val_data (or --val_data=none)")


def main(argv: list[str]) -> dict:
    cfg, ctx = configure(argv, DEFAULTS)
    expected = tokenizer_identity(cfg.tokenizer) if cfg.tokenizer else None
    train_paths = resolve_bin_paths(cfg.data)
    tokenizer = data_tokenizer(train_paths, expected, log=False)
    model_args = resolve_model_args(cfg, ctx, tokenizer)

    def dataset(paths: list[str]) -> PretrainDataset:
        return PretrainDataset(paths, model_args.max_seq_len, cfg.micro_batch_size, ctx.rank, ctx.world_size,
                               cfg.seed, tokenizer)
    validation = val_paths(cfg, train_paths)
    check_held_out(cfg, train_paths, validation)
    train_ds = dataset(train_paths)
    val_ds = dataset(validation) if validation else None
    if val_ds is None and ctx.is_master and cfg.val_data.lower() != "none":
        print(f"note: no validation data (no {default_val_path(train_paths[0])}, no --val_data): "
              f"no val loss, no best.pt", file=sys.stderr)
    return train(cfg, ctx, model_args, train_ds, val_ds, tokenizer)


def cli(argv: list[str] | None = None) -> int:
    """main with user errors turned into one `error: ...` line and an exit code."""
    return run_cli(main, argv, errors=(DataError,))


if __name__ == "__main__":
    sys.exit(cli())
