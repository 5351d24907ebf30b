"""Direct Preference Optimization of fine-tuned weights on sft_data/dpo_data.csv (the loop lives in trainer.py).

    python dpo_data_process.py                                    # bundled sample -> sft_data/dpo_data.csv
    python dpo.py --init_from=out/sft/ckpt.pt                     # full DPO: a frozen copy is the reference
    python dpo.py --init_from=out/sft/ckpt.pt --lora_rank=16 --lr=5e-5   # LoRA: reference = adapters off
    torchrun --standalone --nproc_per_node=4 dpo.py --init_from=out/sft/ckpt.pt
    python dpo.py --resume                                        # continue out/dpo after a stop or crash
    python dpo.py --init_from=out/sft/ckpt.pt --beta=0.1 --label_smoothing=0.1   # conservative DPO
    python dpo.py --init_from=out/sft/ckpt.pt --loss=ipo
    python dpo.py --help                                          # every flag, with its meaning

Each CSV row is a pair of answers to one conversation, laid out as SFT samples (dataset_dpo.py); the loss
(dpo_loss.py) is the mean over the step's pairs, all micro batches and ranks together. --micro_batch_size
counts pairs: a micro batch is twice as many sequences (the start-of-run token budget counts pairs too). Progress line and
metrics.jsonl carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected (val_… for the validation split). Writes out/dpo/ as sft.py writes out/sft/.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from chatglm_tokenizer import DEFAULT_TOKENIZER, load_tokenizer, tokenizer_identity
from dataset_dpo import DPODataset, build_dpo_datasets
from dataset_sft import SFTDataError, train_and_val
from dpo_loss import LOSS_KINDS, DPOLoss, FrozenReference, adapters_off_reference
from train_config import ConfigError, SFTConfig
from trainer import configure, recorded_tokenizer, resolve_model_args, run_cli, train


@dataclass
class DPOConfig(SFTConfig):
    """SFTConfig plus the preference-optimisation options."""

    beta: float = 0.1
    """DPO temperature β: how far the policy may move from the reference (smaller = further)."""
    label_smoothing: float = 0.0
    """Probability that a pair's preference label is wrong (conservative DPO); 0 = plain DPO."""
    loss: str = "sigmoid"
    """sigmoid (DPO) | ipo (squared loss on the log-ratio margin of per-token average log-probabilities)."""
    ref_model: str = ""
    """Reference weights without LoRA; '' = the --init_from weights (recorded, so --resume keeps them)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.loss not in LOSS_KINDS:
            raise ConfigError(f"--beta={self.beta} --label_smoothing={self.label_smoothing} --loss={self.loss}: need "
                              f"beta > 0, 0 <= label_smoothing < 0.5, loss one of {', '.join(LOSS_KINDS)}")


# TRL's DPO defaults where they fit: beta 0.1, a small learning rate, one epoch.
DEFAULTS = DPOConfig(data="sft_data/dpo_data.csv", out_dir="out/dpo", preset="92m", lr=5e-6, min_lr=5e-7,
                     weight_decay=0.0, micro_batch_size=8, grad_accum_steps=2, epochs=1.0,
                     eval_interval=100, eval_iters=25, save_interval=500)


def build_datasets(cfg: DPOConfig, tokenizer, max_seq_len: int, rank: int,
                   world_size: int) -> tuple[DPODataset, DPODataset | None]:
    def build(path: str, val_fraction: float):
        return build_dpo_datasets(path, tokenizer, max_seq_len, cfg.micro_batch_size, rank, world_size,
                                  cfg.seed, val_fraction, cfg.bucket_batches, progress=rank == 0)
    return train_and_val(cfg.data, cfg.val_data, cfg.val_fraction, build, rank)


def make_loss(cfg: DPOConfig, n_heads: int) -> DPOLoss:
    """The DPO objective with its reference: the base under the adapters with LoRA, else a frozen copy."""
    if cfg.lora_rank and cfg.ref_model != cfg.init_from and not cfg.resume:
        raise ConfigError(f"--ref_model={cfg.ref_model}: with --lora_rank the reference is the --init_from "
                          f"weights (the adapters switched off)")
    reference = adapters_off_reference if cfg.lora_rank else FrozenReference(cfg.ref_model, n_heads)
    return DPOLoss(cfg.beta, cfg.label_smoothing, cfg.loss, reference)


def main(argv: list[str]) -> dict:
    cfg, ctx = configure(argv, DEFAULTS)
    if not (cfg.init_from or cfg.resume):
        raise ConfigError("dpo.py optimises fine-tuned weights: pass --init_from=out/sft/ckpt.pt, or --resume to "
                          "continue the run in --out_dir")
    if not cfg.resume:   # saved in the checkpoint's config, so a resumed run scores against the same reference
        cfg = dataclasses.replace(cfg, ref_model=cfg.ref_model or cfg.init_from)
    recorded = None if cfg.tokenizer else recorded_tokenizer(cfg, ctx)
    tokenizer_path = cfg.tokenizer or (recorded or {}).get("path") or DEFAULT_TOKENIZER
    tokenizer = load_tokenizer(tokenizer_path)
    identity = tokenizer_identity(tokenizer_path)
    model_args = resolve_model_args(cfg, ctx, identity)
    loss = make_loss(cfg, model_args.n_heads)
    train_ds, val_ds = build_datasets(cfg, tokenizer, model_args.max_seq_len, ctx.rank, ctx.world_size)
    return train(cfg, ctx, model_args, train_ds, val_ds, identity, loss_fn=loss)


if __name__ == "__main__":
    sys.exit(run_cli(main, errors=(SFTDataError,)))
