"""Supervised fine-tuning of pretrained weights on sft_data/sft_data.csv (the loop itself lives in trainer.py).

    python sft_data_process.py                                    # bundled sample -> sft_data/sft_data.csv
    python sft.py --init_from=out/pretrain/ckpt.pt                # one GPU (or CPU)
    torchrun --standalone --nproc_per_node=4 sft.py --init_from=out/pretrain/ckpt.pt
    python sft.py --init_from=Llama2-Chinese-92M-epoch-1.pth      # a seed project .pth (92m shape assumed)
    python sft.py --resume                                        # continue out/sft after a stop or crash
    python sft.py --init_from=out/pretrain/ckpt.pt --val_data=my_val.csv --epochs=3 --lr=5e-5
    python sft.py --init_from=out/pretrain/ckpt.pt --pack=false   # one padded sample per row (the old batches)
    python sft.py --init_from=out/sft/ckpt.pt --lora_rank=16 --data=medical.csv --out_dir=out/sft_med --lr=2e-4
    python sft.py --help                                          # every flag, with its meaning

--init_from (weights only: this repo's checkpoints, a seed-style .pth or an exported HF folder) or --resume
is required. The model's shape, and with it the sequence length samples are truncated to, comes from those
weights. Writes out/sft/: ckpt.pt, ckpt_NNNNNNN.pt, best.pt, metrics.jsonl, loss.png, as pretraining does.
With --lora_rank only LoRA adapters train (lora.py), and the checkpoints hold just them and the base's sha256.

Each CSV row is one conversation laid out as `prompt <bos> answer <eos>` per turn (dataset_sft.py); the loss
is the mean over the answer tokens (and their <eos>) of a whole optimizer step, all micro batches and ranks
together. By default a micro batch is micro_batch_size rows of max_seq_len positions, each packing several
conversations that never attend to each other (--pack=false: one conversation per row, padded).
Validation: a deterministic `--val_fraction` of the rows (chosen by a hash of their text, so duplicates
share a split), or all of --val_data's rows; --val_data=none turns it off.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from chatglm_tokenizer import DEFAULT_TOKENIZER, load_tokenizer, tokenizer_identity
from dataset_sft import SFTDataError, SFTDataset, build_sft_datasets, train_and_val
from train_config import ConfigError, SFTConfig
from trainer import configure, recorded_tokenizer, resolve_model_args, run_cli, train


@dataclass
class SFTStageConfig(SFTConfig):
    """SFTConfig plus sft.py's batch layout."""

    pack: bool = True
    """Pack several samples into each micro-batch row of max_seq_len positions (attention and positions restart
    at every sample, so each is trained exactly as alone, without padding); false = one padded sample per row."""


# The seed project's fine-tuning settings: 2 epochs at lr 2e-5 (cosine to a tenth), light weight decay.
DEFAULTS = SFTStageConfig(data="sft_data/sft_data.csv", out_dir="out/sft", preset="92m", lr=2e-5, min_lr=2e-6,
                          weight_decay=1e-4, micro_batch_size=16, grad_accum_steps=2, epochs=2.0,
                          eval_interval=200, eval_iters=50, save_interval=500)


def build_datasets(cfg: SFTStageConfig, tokenizer, max_seq_len: int, rank: int,
                   world_size: int) -> tuple[SFTDataset, SFTDataset | None]:
    """Train split of --data, and validation from --val_data (all rows) or a held-out share of --data."""
    def build(path: str, val_fraction: float):
        return build_sft_datasets(path, tokenizer, max_seq_len, cfg.micro_batch_size, rank, world_size,
                                  cfg.seed, val_fraction, cfg.bucket_batches, progress=rank == 0, pack=cfg.pack)
    return train_and_val(cfg.data, cfg.val_data, cfg.val_fraction, build, rank)


def main(argv: list[str]) -> dict:
    cfg, ctx = configure(argv, DEFAULTS)
    if not (cfg.init_from or cfg.resume):
        raise ConfigError("sft.py fine-tunes pretrained weights: pass --init_from=out/pretrain/ckpt.pt (or a "
                          "seed .pth / HF folder), or --resume to continue the run in --out_dir")
    if cfg.bucket_batches < 1 or not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"--bucket_batches={cfg.bucket_batches} --val_fraction={cfg.val_fraction}: need "
                          f"bucket_batches >= 1 and 0 <= val_fraction < 1")
    recorded = None if cfg.tokenizer else recorded_tokenizer(cfg, ctx)
    tokenizer_path = cfg.tokenizer or (recorded or {}).get("path") or DEFAULT_TOKENIZER
    tokenizer = load_tokenizer(tokenizer_path)
    identity = tokenizer_identity(tokenizer_path)
    model_args = resolve_model_args(cfg, ctx, identity)
    train_ds, val_ds = build_datasets(cfg, tokenizer, model_args.max_seq_len, ctx.rank, ctx.world_size)
    return train(cfg, ctx, model_args, train_ds, val_ds, identity)


if __name__ == "__main__":
    sys.exit(run_cli(main, errors=(SFTDataError,)))
