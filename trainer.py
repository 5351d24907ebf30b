"""The one training loop, shared by pretrain.py, sft.py and dpo.py: distributed setup, the run plan, the loop, logging.
The config lives in train_config.py, precision in precision.py, checkpoint files in checkpoint.py.

    python pretrain.py --preset=tiny --max_iters=200                       # CPU demo
    torchrun --standalone --nproc_per_node=4 pretrain.py --preset=92m      # 4 GPUs, DDP
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        pretrain.py --preset=218m --fsdp                                   # FSDP2 over 16 GPUs
    python pretrain.py --help                                              # every TrainConfig field

    from train_config import TrainConfig
    from trainer import configure, resolve_model_args, train, run_cli
    cfg, ctx = configure(sys.argv[1:], TrainConfig(out_dir="out/sft", lr=2e-5))   # flags over the defaults
    # (over the checkpoint's saved config with --resume); ctx: rank, world_size, device, with or without torchrun
    model_args = resolve_model_args(cfg, ctx, tokenizer_identity)
    summary = train(cfg, ctx, model_args, train_ds, val_ds, tokenizer_identity)   # loss_fn=DPOLoss(...) for DPO

A stage script builds its BatchSources (dataset.PretrainDataset, dataset_sft.SFTDataset) after
setup_distributed() and hands them to train(), which owns everything else: the model, resume / init_from,
DDP or FSDP, mixed precision, the optimizer and LR schedule, evaluation, checkpoints and logs. The run's
plan (steps, tokens per step, schedule; run_plan.py) is fixed at the first start and continued by every
resume, on any world size, and by an extension.

One optimizer step = grad_accum_steps micro batches per rank. Its loss is the sum of token losses over all
micro batches of all ranks divided by the number of target tokens among them (all-reduced before the
forward passes), so SFT's loss is the mean over answer tokens of the step, not a mean of batch means, and
one process with 2x accumulation computes exactly what two processes compute. A stage whose loss is not
per token passes its StageLoss (dpo_loss.DPOLoss: summed over pairs, divided by the step's pairs).
With --lora_rank the model gets LoRA adapters (lora.py) before any weights load; only they train and only
they are checkpointed, beside the sha256 of the frozen --init_from weights that a resume reloads. On CUDA
(bf16/fp32, per-token loss, DDP or one GPU) a step reads nothing back to the host: its numbers stay on the
device until a log, eval or checkpoint step reads them all at once (_train_step_on_device, read_back), so the
host prepares the next batches while the GPU works.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

from checkpoint import (CKPT_BEST, CKPT_LATEST, atomic_save, find_checkpoint, link_or_copy, rng_state,
                        set_rng_state, step_checkpoints)
from chatglm_tokenizer import TokenizerError, check_same_tokenizer
from chatglm_tokenizer.tokenization_chatglm import GLM_SPECIALS
from lora import ADAPTER_SUFFIXES, adapter_state, apply_lora, count_parameters, weights_sha256
from model import (CheckpointError, ModelArgs, Transformer, lora_base_path, load_model, load_state_dict_file,
                   model_args_from_preset)
from precision import Precision, choose_precision, peak_flops
from run_plan import Plan, resolve_plan
from train_config import ConfigError, TrainConfig, TrainError, format_config, parse_config, given_flags

# how a run was started, not how it trains: a resumed run never takes these from its checkpoint's config
_START_FLAGS = ("resume", "init_from", "overwrite")
_TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__)


# -------------------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    """Where this process runs: its rank among world_size processes and its device."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed() -> DistContext:
    """Join the torchrun process group when launched by torchrun (nccl with CUDA, gloo otherwise), else run
    as the only process. The GPU is cuda:LOCAL_RANK; CUDA_VISIBLE_DEVICES is never touched."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise TrainError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                             f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistContext(rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    """Destroy the process group and free what still holds it, so gloo's worker threads stop now.

    destroy_process_group() only unregisters the group; its threads live on while the DDP wrapper (kept by
    reference cycles) holds it. Left to the interpreter's shutdown, a worker thread that drops the last
    broadcast's tensors there needs the GIL of a dying interpreter and aborts the process (SIGABRT, about
    one run in 30 here); collecting the cycles first joins the threads while Python is still whole."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def _on_rank0(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 only; every rank gets its (small, picklable) result or raises its error, so a
    failure on rank 0 (a corrupt checkpoint, a full disk) stops all ranks instead of hanging them."""
    result, error = None, None
    if ctx.is_master:
        try:
            result = fn()
        except (ConfigError, TrainError, TokenizerError, CheckpointError, OSError) as exc:
            error = f"{exc}" if not isinstance(exc, OSError) else f"{exc.filename or ''}: {exc.strerror or exc}"
    if ctx.distributed:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise TrainError(error)
    return result


ConfigT = TypeVar("ConfigT", bound=TrainConfig)


def configure(argv: list[str], defaults: ConfigT) -> tuple[ConfigT, DistContext]:
    """A stage's config and where it runs. The flags are checked (and --help answered) before the process group
    is joined. With --resume the run keeps the settings its checkpoint saved (rank 0 reads them and shares them)
    and only the flags given change them, so a bare `--resume` continues the run as it was started, not with the
    stage's defaults. out_dir, which finds the checkpoint, is the command line's (or the default)."""
    cfg = parse_config(argv, defaults)
    ctx = setup_distributed()
    if not cfg.resume:
        return cfg, ctx
    saved = _on_rank0(ctx, lambda: find_checkpoint(cfg.out_dir, report=False)[0]["config"])
    names = {f.name for f in fields(cfg)} - {"out_dir", *_START_FLAGS}   # other keys: fields this version lacks
    carried = {k: v for k, v in saved.items() if k in names}
    return dataclasses.replace(cfg, **(carried | given_flags(argv, type(defaults)))), ctx


def _all_reduce(ctx: DistContext, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


# ------------------------------------------------------------------------------------- batch sources
class BatchSource(Protocol):
    """What train() reads; dataset.PretrainDataset and dataset_sft.SFTDataset implement it. state_dict must
    be the same on every rank (train() saves rank 0's and every rank loads it) and must not depend on the
    world size, so a run resumed on another number of ranks continues the same pass over the data."""
    epoch: int
    num_samples: int     # windows / conversations per epoch, all ranks together (the plan counts epochs in them)
    pad_id: int | None   # the id padding x (excluded from tokens/s); None or absent when batches are never padded

    def __len__(self) -> int: ...                                      # micro batches per epoch per rank
    # x, y [B, T] int64, y -100 = no loss; optionally segment_ids [B, T] (packed rows: model.forward's segment_ids,
    # -1 = padding)
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    # (source, x, y[, segment_ids]) of this rank's share of about n_samples validation samples chosen the same for
    # any world size; every rank yields the same sources in the same order and as many batches
    def eval_batches(self, n_samples: int) -> Iterator[tuple]: ...


class StageLoss(Protocol):
    """What a stage minimises (train() defaults to TokenLoss). A step's loss is the sum of __call__ over its micro
    batches, all ranks, divided by the global sum of count(y): the units the loss is a mean over (target tokens
    for language modelling, preference pairs for DPO). Named metrics are summed the same way (take_metrics) and
    logged as means over those units. Optional labels, TokenLoss's where missing: unit, batch_item, plot_label."""

    def count(self, y: torch.Tensor) -> int: ...
    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
    def take_metrics(self) -> dict[str, torch.Tensor]: ...   # sums since the last call, then reset


class TokenLoss:
    """Pretraining and SFT: summed cross-entropy over the target tokens (y != -100); the step averages per token."""
    unit = "per target token"          # what the step's loss is a mean over (the final summary line)
    batch_item = "seqs"                # what --micro_batch_size counts (the run description)
    plot_label = "cross-entropy loss (nats/token)"   # loss.png's y axis

    def count(self, y: torch.Tensor) -> int:
        return int((y != -100).sum())

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        packed = {"segment_ids": segment_ids} if segment_ids is not None else {}
        return model(x, y, reduction="sum", **packed)[1]   # the fused loss: no logits are made

    def take_metrics(self) -> dict[str, torch.Tensor]:
        return {}


# ------------------------------------------------------------------------------------ model shape
def resolve_model_args(cfg: TrainConfig, ctx: DistContext, tokenizer: dict) -> ModelArgs:
    """The network's shape: the checkpoint's with --resume, the weights' with --init_from, else the preset with
    the tokenizer's vocabulary; --seq_len sets max_seq_len. Refuses weights made for another tokenizer."""
    def pick() -> dict:
        if cfg.resume:
            ckpt, path = find_checkpoint(cfg.out_dir, report=False)
            args = ckpt["model_args"]
            if cfg.seq_len and cfg.seq_len != args["max_seq_len"]:
                raise ConfigError(f"--seq_len={cfg.seq_len}: the run in {cfg.out_dir} trains at seq_len "
                                  f"{args['max_seq_len']}; resume with the same, or --init_from={path} for a new run")
            check_same_tokenizer(ckpt["tokenizer"], tokenizer, f"the checkpoint {path}", "this run's data")
            return args
        if cfg.init_from:
            return _init_model_args(cfg, tokenizer)
        overrides = {"max_seq_len": cfg.seq_len} if cfg.seq_len else {}
        return asdict(model_args_from_preset(cfg.preset, vocab_size=tokenizer["vocab_size"], **overrides))
    return ModelArgs(**_on_rank0(ctx, pick))


def recorded_tokenizer(cfg: TrainConfig, ctx: DistContext) -> dict | None:
    """The tokenizer identity that --resume's checkpoint or the --init_from weights record (None when there are
    none, or they record none, like a seed .pth): a stage can default --tokenizer to it. Rank 0 reads the
    checkpoint and tells the others (one load of the weights per run, not one per rank)."""
    def read() -> dict | None:
        if cfg.resume:
            return find_checkpoint(cfg.out_dir, report=False)[0]["tokenizer"]
        if cfg.init_from:
            return load_model(cfg.init_from, n_heads=model_args_from_preset(cfg.preset).n_heads)[1]["tokenizer"]
        return None
    return _on_rank0(ctx, read)


def _init_model_args(cfg: TrainConfig, tokenizer: dict) -> dict:
    """Shape of the --init_from weights (a seed .pth has no head count: the preset's n_heads is assumed)."""
    n_heads = model_args_from_preset(cfg.preset).n_heads
    _, meta = load_model(cfg.init_from, n_heads=n_heads, max_seq_len=cfg.seq_len or None)
    args = meta["model_args"]
    # The seed's .pth files have 64,793 rows, one fewer than ChatGLM2's 64,794 ids: the missing ones are GLM
    # specials that encode() never produces, so any size covering the text ids is the same vocabulary.
    text_ids = tokenizer["vocab_size"] - len(GLM_SPECIALS)
    if not text_ids <= args["vocab_size"] <= tokenizer["vocab_size"]:
        raise TrainError(f"--init_from={cfg.init_from} has a {args['vocab_size']}-token vocabulary but this run's "
                         f"data uses {tokenizer.get('path')} with {tokenizer['vocab_size']}: the weights belong to "
                         f"another tokenizer")
    if meta["tokenizer"] is not None:
        check_same_tokenizer(meta["tokenizer"], tokenizer, f"--init_from={cfg.init_from}", "this run's data")
    else:
        print(f"note: {cfg.init_from} records no tokenizer; its vocabulary size matches, so it is assumed to be "
              f"{tokenizer.get('path')}", file=sys.stderr)
    return args


# ------------------------------------------------------------------------- model, wrapping, optimizer
def _use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")


def wrap_model(model: Transformer, cfg: TrainConfig, ctx: DistContext) -> torch.nn.Module:
    """Compile (in place, so parameter names keep no _orig_mod. prefix) and wrap for DDP or FSDP2."""
    compile_model = _use_compile(cfg, ctx.device)
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in model.layers:   # one FSDP unit per block: all-gather one block's weights at a time
            if compile_model:
                block.compile()
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)   # the root unit holds the (tied) embedding and the final norm
        return model
    if compile_model:
        model.compile()
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # the rotary tables are buffers computed from ModelArgs: nothing to broadcast each forward
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                   broadcast_buffers=False)
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D: embeddings, linear weights) only; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=True if device.type == "cuda" else None)


# -------------------------------------------------------------------------------------- checkpoints
def _gather_objects(ctx: DistContext, obj: Any) -> list:
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------ logging
def _check_logging_deps(cfg: TrainConfig) -> None:
    import importlib.util
    for wanted, package, flag in ((cfg.tensorboard, "tensorboard", "--tensorboard"),
                                  (bool(cfg.wandb_project), "wandb", "--wandb_project")):
        if wanted and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{flag} needs the {package} package, which is not installed (pip install {package})")


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, png_path: str, ylabel: str = TokenLoss.plot_label) -> None:
    """loss.png: train and validation loss against tokens seen, from metrics.jsonl; a dashed curve per source."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(8, 5))
    sources = sorted({k for r in rows for k in r if k.startswith("val/")})
    curves = [("loss", "train", "-"), ("val_loss", "validation", "-")] + [(k, k, "--") for k in sources]
    for key, label, style in curves:
        points = [(r["tokens"], r[key]) for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), style, label=label, marker=None if key == "loss" else "o", markersize=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


class MetricsLogger:
    """Rank 0's records: metrics.jsonl (one JSON object per line), TensorBoard / wandb when asked, loss.png."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, resume_step: int | None):
        self.active = ctx.is_master
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.png = os.path.join(cfg.out_dir, "loss.png")
        self.tb = self.wandb = None
        if not self.active:
            return
        # a resumed run drops the rows logged after its checkpoint (they are about to be redone)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
        if cfg.wandb_project:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=asdict(cfg))

    def log(self, row: dict) -> None:
        if not self.active:
            return
        # non-finite values (a skipped step's loss) become null: strict JSON readers reject NaN
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])

    def plot(self, ylabel: str) -> None:
        if self.active:
            plot_losses(self.path, self.png, ylabel)

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------ the run state
@dataclass
class Run:
    """Everything one training run holds; the functions below read and advance it."""
    cfg: TrainConfig
    ctx: DistContext
    plan: Plan
    precision: Precision
    model_args: ModelArgs
    tokenizer: dict
    train_ds: BatchSource
    val_ds: BatchSource | None
    raw: Transformer                  # the plain module (parameters are DTensors under FSDP)
    model: torch.nn.Module            # what the step calls: DDP-wrapped, FSDP-sharded, or raw
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    flops_per_token: float
    peak_flops: float | None
    logger: MetricsLogger | None = None
    step: int = 0                     # optimizer steps done (skipped ones included)
    tokens_seen: int = 0              # positions trained on, all ranks
    progress_tokens: int = 0          # the plan's clock: positions of the steps done, padding included
    best_val_loss: float = math.inf
    last_val_loss: float | None = None
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    metrics: dict = field(default_factory=dict)
    loss_fn: StageLoss = field(default_factory=TokenLoss)
    lora: dict | None = None          # LoRA: rank, alpha, dropout, targets and the base weights' identity
    val_metrics: dict = field(default_factory=dict)
    defer_sync: bool = False          # steps read nothing back until a log step (CUDA; see _train_step_on_device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _batch_to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """x, y (and segment_ids) on the device: from pinned memory without blocking the host on CUDA."""
    return tuple(_to_device(t, device) for t in batch)


def _summed_loss(loss_fn: "StageLoss", model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The stage loss of one batch (x, y[, segment_ids]); packed rows pass their segment ids along."""
    x, y, *segments = batch
    return loss_fn(model, x, y, **({"segment_ids": segments[0]} if segments else {}))


def _full_model_state(run: Run) -> dict:
    """fp32 weights as a full state dict on rank 0's CPU (a collective under FSDP: every rank calls it)."""
    state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.lora:   # the base weights are frozen and identified by their sha256: the adapters are the run
        return adapter_state(state)
    if state and run.model_args.tie_embeddings:   # store the tied matrix once
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def _checkpoint_meta(run: Run) -> dict:
    return {"model_args": asdict(run.model_args), "config": asdict(run.cfg), "tokenizer": run.tokenizer,
            "step": run.step, "tokens_seen": run.tokens_seen, "best_val_loss": run.best_val_loss,
            "world_size": run.ctx.world_size, "plan": run.plan.saved(), "progress_tokens": run.progress_tokens,
            **({"lora": run.lora} if run.lora else {})}


def save_checkpoint(run: Run) -> None:
    """out_dir/ckpt_{step}.pt (everything resuming needs), ckpt.pt = it, the oldest beyond keep_last removed."""
    model_state = _full_model_state(run)
    optim_state = get_optimizer_state_dict(run.model, run.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = _gather_objects(run.ctx, rng_state(run.ctx.device))
    data_state = run.train_ds.state_dict()

    def write() -> None:
        path = os.path.join(run.cfg.out_dir, f"ckpt_{run.step:07d}.pt")
        atomic_save({"model": model_state, "optimizer": optim_state, "scaler": run.scaler.state_dict(),
                     "data_state": data_state, "rng": rngs, "skipped_steps": run.skipped_steps,
                     **_checkpoint_meta(run)}, path)
        link_or_copy(path, os.path.join(run.cfg.out_dir, CKPT_LATEST))
        # ckpt_N.pt of a later step than this one are what a resume skipped as unreadable: left for a look,
        # never counted among the keep_last newest (counting them would prune the checkpoint just written)
        written = [old for step, old in step_checkpoints(run.cfg.out_dir) if step <= run.step]
        for old in written[run.cfg.keep_last:]:
            os.remove(old)
    _on_rank0(run.ctx, write)
    if run.logger is not None:
        # at every checkpoint: a run stopped later still has a recent loss.png
        run.logger.plot(getattr(run.loss_fn, "plot_label", TokenLoss.plot_label))


def save_best(run: Run, val_loss: float) -> None:
    """out_dir/best.pt: the weights with the lowest validation loss so far (no optimizer state)."""
    model_state = _full_model_state(run)
    _on_rank0(run.ctx, lambda: atomic_save({"model": model_state, "val_loss": val_loss, **_checkpoint_meta(run)},
                                           os.path.join(run.cfg.out_dir, CKPT_BEST)))


# ------------------------------------------------------------------------------- evaluate and step
@torch.no_grad()
def evaluate(run: Run) -> dict[str, float] | None:
    """Validation loss per target token over the plan's eval_samples, all ranks' tokens together: "val_loss"
    over every source (token-weighted; best.pt follows it) and "val/<source>" for each source when there are
    several. None without validation data."""
    device = run.ctx.device
    batches = list(run.val_ds.eval_batches(run.plan.eval_samples)) if run.val_ds is not None else []
    # FSDP needs every rank in every forward: all ranks evaluate the same number of batches
    count = _all_reduce(run.ctx, torch.tensor([len(batches)], device=device), dist.ReduceOp.MIN)
    names = list(dict.fromkeys(batch[0] for batch in batches))   # the same order on every rank
    model = run.model if run.cfg.fsdp else run.raw
    model.eval()
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device)   # [source, (loss sum, targets)]
    for name, *batch in batches[:int(count.item())]:
        n_targets = run.loss_fn.count(batch[1])   # on the host batch: no device sync per micro batch
        batch = _batch_to_device(tuple(batch), device)
        with run.precision.autocast(device):
            loss = _summed_loss(run.loss_fn, model, batch)
        count_y = torch.tensor(float(n_targets), dtype=torch.float64, device=device)
        totals[names.index(name)] += torch.stack([loss.double(), count_y])
    model.train()
    _all_reduce(run.ctx, totals)
    overall = totals.sum(dim=0)
    run.val_metrics = _mean_metrics(run, overall[1].item())   # a collective: before any rank may return
    if overall[1] == 0:
        return None
    losses = {"val_loss": (overall[0] / overall[1]).item()}
    if len(names) > 1:
        losses |= {f"val/{name}": (t[0] / t[1]).item() for name, t in zip(names, totals) if t[1] > 0}
    return losses


@dataclass
class StepResult:
    loss: float            # mean loss over the step's target tokens, all ranks
    grad_norm: float
    positions: int         # real (unpadded) token positions processed, all ranks
    skipped: bool          # no update: non-finite loss/gradient, or no target tokens
    no_targets: bool = False   # skipped because the step had no target tokens (not a numerical problem)
    flops: float = 0.0         # training FLOPs of the step's real samples, all ranks (Transformer.training_flops)
    metrics: dict = field(default_factory=dict)   # the stage's named metrics (StageLoss), means over the step
    # a step run with run.defer_sync: [loss, grad_norm, positions, squared lengths, skipped, no targets] still on
    # the device; read_back() fills the fields above from it
    on_device: torch.Tensor | None = None


def _accumulate_gradients(run: Run, batches: list, n_targets: int | torch.Tensor) -> torch.Tensor:
    """Backward over the micro batches; grads end as d(sum of token losses)/d(w) / n_targets (global count,
    a number or a tensor on the device). DDP and FSDP average gradients over ranks, hence the factor world_size."""
    scale = run.ctx.world_size / n_targets
    loss_sum = torch.zeros((), device=run.ctx.device)
    batches = [_batch_to_device(batch, run.ctx.device) for batch in batches]   # all copies queued up front
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # DDP: all-reduce once, on the last micro batch. FSDP reduce-scatters every micro batch instead, so
        # unsharded gradients never pile up (saving memory is why one uses FSDP); the sum is the same.
        no_sync = run.model.no_sync() if hasattr(run.model, "no_sync") and not last else contextlib.nullcontext()
        with no_sync:
            with run.precision.autocast(run.ctx.device):
                loss = _summed_loss(run.loss_fn, run.model, batch)
            run.scaler.scale(loss * scale).backward()
        loss_sum += loss.detach().float()
    return loss_sum


def _sample_lengths(x: torch.Tensor, source: BatchSource, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Length of each sample in a micro batch, padding excluded (a source that pads says so with `pad_id`), so
    that tokens/s and MFU count only real work. In packed rows (segment_ids) each segment is a sample: its
    attention cost grows with its own length, not the row's."""
    if segment_ids is not None:
        rows = torch.arange(x.shape[0])[:, None] * (x.shape[1] + 1)            # [B, 1]: a key per (row, segment)
        return torch.unique((rows + segment_ids)[segment_ids >= 0], return_counts=True)[1].double()
    pad_id = getattr(source, "pad_id", None)
    if pad_id is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.float64)
    return (x != pad_id).sum(dim=1, dtype=torch.float64)


def train_step(run: Run, lr: float) -> StepResult:
    """One optimizer step over grad_accum_steps micro batches per rank; skipped when not finite."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = [run.train_ds.next_batch() for _ in range(run.plan.grad_accum_steps)]
    # counted on the CPU; only a distributed run moves them to the device for the all-reduce
    lengths = torch.cat([_sample_lengths(b[0], run.train_ds, *b[2:]) for b in batches])
    local_counts = [sum(run.loss_fn.count(b[1]) for b in batches), lengths.sum().item(),
                    lengths.square().sum().item()]
    if run.defer_sync and isinstance(run.loss_fn, TokenLoss):   # a stage loss with metrics reads them each step
        return _train_step_on_device(run, batches, local_counts)
    counts = torch.tensor(local_counts, dtype=torch.float64, device=run.ctx.device if run.ctx.distributed else "cpu")
    n_targets, positions, squared_lengths = (int(c) for c in _all_reduce(run.ctx, counts).tolist())
    if n_targets == 0:   # every rank sees the same global count, so all skip together
        return StepResult(math.nan, math.nan, positions, skipped=True, no_targets=True)   # no compute ran
    loss_sum = _accumulate_gradients(run, batches, n_targets)
    totals = _all_reduce(run.ctx, torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float()]))
    run.scaler.unscale_(run.optimizer)
    norm = _clip_gradients(run)
    loss, bad_loss, grad_norm = torch.stack([totals[0] / n_targets, totals[1], norm.float()]).tolist()
    metrics = _mean_metrics(run, n_targets)
    finite = bad_loss == 0 and math.isfinite(grad_norm)
    if finite:
        run.scaler.step(run.optimizer)
    run.scaler.update()   # with fp16, a non-finite gradient also lowers the loss scale
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, positions, skipped=not finite,
                      flops=run.raw.training_flops(positions, squared_lengths), metrics=metrics)


def _mean_metrics(run: Run, count: float) -> dict[str, float]:
    """The stage's metric sums since the last call, all ranks together, divided by the global count."""
    sums = run.loss_fn.take_metrics()
    if not sums:
        return {}
    names = sorted(sums)
    totals = _all_reduce(run.ctx, torch.stack([sums[n].detach().double() for n in names]).to(run.ctx.device))
    return {n: v / count if count else math.nan for n, v in zip(names, totals.tolist())}


def _clip_gradients(run: Run) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # a DTensor under FSDP


def _train_step_on_device(run: Run, batches: list, local_counts: list) -> StepResult:
    """train_step without a single read back to the host, so the CPU runs ahead and queues the next step while
    the GPU works: the counts stay on the device, and a step to skip (no targets, a non-finite loss or
    gradient) is skipped by the fused AdamW itself (its found_inf input, as GradScaler uses it: no update, no
    step count). A step without targets runs its (all-ignored, zero) compute instead of returning early. The
    numbers are read back by read_back() on log, eval and checkpoint steps only."""
    counts = _all_reduce(run.ctx, _to_device(torch.tensor(local_counts, dtype=torch.float64), run.ctx.device))
    n_targets = counts[0]
    loss_sum = _accumulate_gradients(run, batches, n_targets.clamp(min=1).float())
    totals = _all_reduce(run.ctx, torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float()]))
    norm = _clip_gradients(run).float()
    no_targets = n_targets == 0
    skip = no_targets | (totals[1] > 0) | ~torch.isfinite(norm)
    run.optimizer.found_inf = skip.float()
    try:
        run.optimizer.step()
    finally:
        del run.optimizer.found_inf
    run.optimizer.zero_grad(set_to_none=True)
    on_device = torch.stack([totals[0].double() / n_targets, norm.double(), counts[1], counts[2], skip.double(),
                             no_targets.double()])
    return StepResult(math.nan, math.nan, 0, skipped=True, on_device=on_device)


def read_back(run: Run, results: list[StepResult]) -> list[StepResult]:
    """The results with every on-device number read into its field: one host sync for all of them."""
    waiting = [r for r in results if r.on_device is not None]
    if waiting:
        for result, values in zip(waiting, torch.stack([r.on_device for r in waiting]).tolist()):
            loss, grad_norm, positions, squared_lengths, skipped, no_targets = values
            result.loss, result.grad_norm = loss, math.nan if no_targets else grad_norm
            result.positions, result.skipped, result.no_targets = int(positions), bool(skipped), bool(no_targets)
            result.flops, result.on_device = run.raw.training_flops(int(positions), int(squared_lengths)), None
    return results


# ----------------------------------------------------------------------------------------- the loop
def _prepare_out_dir(cfg: TrainConfig, ctx: DistContext) -> None:
    """Rank 0 checks out_dir is writable, clears half-written *.tmp files of a killed run, and refuses to
    start a new run over an existing one (unless --overwrite: then its checkpoints are deleted)."""
    def check() -> None:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            probe = os.path.join(cfg.out_dir, ".write_test.tmp")
            with open(probe, "w"):
                pass
            for name in os.listdir(cfg.out_dir):
                if name.endswith(".tmp"):
                    os.remove(os.path.join(cfg.out_dir, name))
        except OSError as exc:
            raise TrainError(f"--out_dir={cfg.out_dir} is not writable ({exc.strerror or exc})") from None
        old_run = [p for _, p in step_checkpoints(cfg.out_dir)] + \
            [p for p in (os.path.join(cfg.out_dir, n) for n in (CKPT_LATEST, CKPT_BEST)) if os.path.exists(p)]
        if old_run and cfg.overwrite:
            _refuse_deleting_init_weights(cfg, old_run)
            for path in old_run:
                os.remove(path)
        elif old_run and not cfg.resume:
            raise TrainError(f"{cfg.out_dir} already holds a run ({os.path.basename(old_run[0])}): pass --resume to "
                             f"continue it, --overwrite to replace it, or choose another --out_dir")
    _on_rank0(ctx, check)


def _refuse_deleting_init_weights(cfg: TrainConfig, old_run: list[str]) -> None:
    """--overwrite deletes out_dir's checkpoints: refuse when --init_from is one of them (ckpt.pt is a hard link to
    the newest ckpt_N.pt, so compare files, not names), before the weights to start from are gone."""
    if cfg.init_from and os.path.isfile(cfg.init_from) and any(os.path.samefile(cfg.init_from, p) for p in old_run):
        raise TrainError(f"--init_from={cfg.init_from} is a checkpoint of the run in {cfg.out_dir}, which --overwrite "
                         f"would delete: copy it out of {cfg.out_dir} first, or choose another --out_dir")


def _load_start(cfg: TrainConfig, ctx: DistContext, model: Transformer,
                tokenizer: dict) -> tuple[dict | None, dict, dict | None]:
    """Rank 0 loads the resume checkpoint or the --init_from weights into `model`; the weights are then
    broadcast. Returns (checkpoint minus weights and optimizer, or None; rank 0's full optimizer state; the
    LoRA record (settings + base identity) when the run trains adapters)."""
    optimizer_state: dict = {}

    def read() -> tuple[dict | None, dict | None]:
        if cfg.resume:
            ckpt, path = find_checkpoint(cfg.out_dir)
            check_same_tokenizer(ckpt["tokenizer"], tokenizer, f"the checkpoint {path}", "this run's data")
            if ckpt["model_args"] != asdict(model.args):
                raise TrainError(f"{path} holds a model of shape {ckpt['model_args']}, not {asdict(model.args)}")
            lora = ckpt.get("lora")
            _check_same_lora(cfg, lora, path)
            if lora:   # the frozen base first, then the trained adapters
                _load_weights(model, load_state_dict_file(lora_base_path(path, lora), n_heads=model.args.n_heads),
                              f"{path}'s base {lora['base']['path']}", adapters=False)
                _load_weights(model, ckpt["model"], path, adapters=True)
            else:
                model.load_state_dict(ckpt["model"])
            optimizer_state.update(ckpt["optimizer"])
            return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")} | {"path": path}, lora
        if cfg.init_from:
            weights = load_state_dict_file(cfg.init_from, n_heads=model.args.n_heads)
            _load_weights(model, weights, f"--init_from={cfg.init_from}", adapters=False)
            return None, _lora_record(cfg) if cfg.lora_rank else None
        return None, None
    meta, lora = _on_rank0(ctx, read)
    if ctx.distributed and (cfg.resume or cfg.init_from):
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    return meta, optimizer_state, lora


def _load_weights(model: Transformer, weights: dict, what: str, adapters: bool) -> None:
    """Load base weights (adapters=False: every weight but LoRA adapters) or a LoRA checkpoint's adapters
    (adapters=True: exactly the model's adapters); TrainError naming `what` when they do not fit."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise TrainError(f"{what}: weights do not fit the model ({str(exc).strip().splitlines()[0][:200]})") from None
    missing = [k for k in missing if k.endswith(ADAPTER_SUFFIXES) == adapters]
    if missing or unexpected:
        raise TrainError(f"{what}: weights do not fit the model (missing {', '.join(missing[:3]) or 'none'}; "
                         f"unexpected {', '.join(unexpected[:3]) or 'none'})")


def _lora_record(cfg: TrainConfig) -> dict:
    """What a LoRA checkpoint records: the adapter settings and the identity of the frozen base weights."""
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": cfg.lora_targets,
            "base": {"path": cfg.init_from, "abspath": os.path.abspath(cfg.init_from),
                     "sha256": weights_sha256(cfg.init_from)}}


def _check_same_lora(cfg: TrainConfig, lora: dict | None, path: str) -> None:
    saved = (lora["rank"], lora["alpha"], lora["targets"]) if lora else (0,)
    wanted = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else (0,)
    if saved != wanted:
        how = f"with LoRA rank {saved[0]}, alpha {saved[1]} on {saved[2]}" if lora else "without LoRA"
        raise TrainError(f"{path} was trained {how}: resume with the same --lora_rank, --lora_alpha and "
                         f"--lora_targets, or start a new run with --init_from={path}")


def _restore(run: Run, meta: dict, optimizer_state: dict) -> None:
    """Optimizer, loss scale, data position, RNGs and counters of a resumed run."""
    if optimizer_state:   # the current run's optimizer settings win over the saved ones (e.g. fused on CUDA)
        for saved, current in zip(optimizer_state["param_groups"], run.optimizer.param_groups):
            saved.update({k: v for k, v in current.items() if k != "params"})
    set_optimizer_state_dict(run.model, run.optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=run.ctx.distributed))
    if run.scaler.is_enabled() and meta.get("scaler"):
        run.scaler.load_state_dict(meta["scaler"])
    run.train_ds.load_state_dict(meta["data_state"])
    run.step, run.tokens_seen, run.progress_tokens = meta["step"], meta["tokens_seen"], meta["progress_tokens"]
    run.best_val_loss, run.skipped_steps = meta["best_val_loss"], meta.get("skipped_steps", 0)
    if len(meta["rng"]) == run.ctx.world_size:
        set_rng_state(meta["rng"][run.ctx.rank], run.ctx.device)
    else:
        torch.manual_seed(run.cfg.seed + run.ctx.rank + run.step)
    if run.ctx.is_master:
        changed = {k: (v, getattr(run.cfg, k)) for k, v in meta["config"].items()
                   if hasattr(run.cfg, k) and getattr(run.cfg, k) != v and k not in _START_FLAGS}
        print(f"resuming {meta['path']} at step {run.step:,} ({run.tokens_seen:,} tokens)"
              + "".join(f"; {k}: {old} -> {new}" for k, (old, new) in changed.items()))


def describe_run(run: Run) -> str:
    """The config and the token budget, printed at start."""
    p, cfg, ctx = run.plan, run.cfg, run.ctx
    params, non_emb = run.raw.num_params(), run.raw.num_params(non_embedding=True)
    total_tokens = p.total_tokens
    epochs = total_tokens // p.seq_len / max(1, run.train_ds.num_samples)
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
    parallel = "FSDP2" if cfg.fsdp else ("DDP" if ctx.distributed else "single process")
    describe = getattr(run.train_ds, "describe", None)
    val_describe = getattr(run.val_ds, "describe", None)
    # a padded source (SFT) fills only part of each micro_batch_size x seq_len block: the plan is an upper bound
    up_to = "at most " if getattr(run.train_ds, "pad_id", None) is not None else ""
    lines = [format_config(cfg),
             f"model: {params / 1e6:.2f}M parameters ({non_emb / 1e6:.2f}M without the embedding), "
             f"{run.flops_per_token / 1e9:.3f} GFLOP/token at seq {p.seq_len}",
             *([_describe_lora(run)] if run.lora else []),
             f"batch: {cfg.micro_batch_size} {getattr(run.loss_fn, 'batch_item', TokenLoss.batch_item)} x "
             f"{p.seq_len} tokens x {p.grad_accum_steps} accum x {ctx.world_size} ranks = {up_to}"
             f"{p.step_tokens:,} tokens/step",
             f"data: {describe() if describe else f'{len(run.train_ds):,} micro batches per epoch per rank'}",
             f"val: {val_describe() if val_describe else ('yes' if run.val_ds is not None else 'none')}",
             f"run: {p.max_iters:,} steps = {up_to}{total_tokens:,} tokens = {epochs:.2f} epochs = "
             f"{total_tokens / max(1, params):.1f} tokens/parameter",
             f"schedule: lr {p.lr:g}, {p.warmup_iters} warmup steps, cosine to {p.min_lr:g} at step "
             f"{p.lr_decay_iters} (steps of {p.tokens_per_iter:,} tokens); AdamW betas ({cfg.beta1}, {cfg.beta2}) "
             f"weight decay {cfg.weight_decay}; grad clip {cfg.grad_clip or 'off'}",
             f"hardware: {device} x {ctx.world_size}, {parallel}, {run.precision.name}"
             f"{' autocast (fp32 master weights)' if run.precision.autocast_dtype else ''}"
             f"{' + GradScaler' if run.precision.use_scaler else ''}, compile "
             f"{'on' if _use_compile(cfg, ctx.device) else 'off'}, MFU "
             + (f"vs {run.peak_flops / 1e12:.0f} TFLOP/s peak" if run.peak_flops else "not shown (CPU, fp32 or "
                                                                                       "a GPU without a known peak)")]
    return "\n".join(lines)


def _describe_lora(run: Run) -> str:
    trainable, total = count_parameters(run.raw)
    lora = run.lora
    return (f"LoRA: rank {lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g} on {lora['targets']}; "
            f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%); frozen base "
            f"{lora['base']['path']} (sha256 {lora['base']['sha256'][:12]}…)")


def _log_train(run: Run, window: dict, lr: float, result: StepResult, bar: tqdm) -> None:
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    tokens_per_s = window["tokens"] / elapsed
    losses = [x for x in window["losses"] if math.isfinite(x)]
    row = {"step": run.step, "tokens": run.tokens_seen, "epoch": run.train_ds.epoch,
           "loss": sum(losses) / len(losses) if losses else math.nan, "lr": lr, "grad_norm": result.grad_norm,
           "tokens_per_s": tokens_per_s, "skipped_steps": run.skipped_steps}
    for name in (window["metrics"][-1] if window["metrics"] else {}):   # the stage's own (DPO: rewards/...)
        values = [m[name] for m in window["metrics"] if math.isfinite(m.get(name, math.nan))]
        row[name] = sum(values) / len(values) if values else math.nan
    text = f"loss {row['loss']:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s"
    if "rewards/accuracies" in row:
        text += f" acc {row['rewards/accuracies']:.2f} margin {row['rewards/margins']:.3f}"
    if run.peak_flops:
        row["mfu"] = window["flops"] / elapsed / run.ctx.world_size / run.peak_flops
        text += f" mfu {row['mfu']:.1%}"
    if run.ctx.device.type == "cuda":   # what the micro batch costs: the number to watch on 24 GB cards
        row["max_mem_gb"] = torch.cuda.max_memory_allocated(run.ctx.device) / 2 ** 30
    run.logger.log(row)
    run.metrics["loss"] = row["loss"]
    bar.set_postfix_str(text, refresh=False)
    window.update(start=time.perf_counter(), tokens=0, flops=0.0, losses=[], metrics=[])


def _eval_and_log(run: Run, bar: tqdm) -> None:
    losses = evaluate(run)
    if losses is None:
        return
    val_loss = run.last_val_loss = losses["val_loss"]
    # a stage with its own metrics (DPO) logs them; perplexity means something only for a per-token loss
    extra = {f"val_{k}": v for k, v in run.val_metrics.items()} or {"val_ppl": math.exp(min(val_loss, 50.0))}
    run.logger.log({"step": run.step, "tokens": run.tokens_seen, "val_loss": val_loss, **extra}
                   | {k: v for k, v in losses.items() if k != "val_loss"})
    improved = val_loss < run.best_val_loss
    if improved:
        run.best_val_loss = val_loss
        save_best(run, val_loss)
    if run.ctx.is_master:
        per_source = ", ".join(f"{k[len('val/'):]} {v:.4f}" for k, v in losses.items() if k.startswith("val/"))
        shown = f"ppl {extra['val_ppl']:.2f}" if "val_ppl" in extra else \
            ", ".join(f"{k} {v:.3f}" for k, v in extra.items() if "rewards/" in k)
        bar.write(f"step {run.step:,}: val loss {val_loss:.4f}, {shown}"
                  f"{f' ({per_source})' if per_source else ''}{' (best, saved best.pt)' if improved else ''}")


def _after_step(run: Run, result: StepResult) -> None:
    """Count skipped steps; stop after max_bad_steps non-finite steps in a row (with run.defer_sync, noticed when
    the steps are read back, at the next log step)."""
    if not result.skipped:
        run.bad_in_a_row = 0
        return
    run.skipped_steps += 1
    if result.no_targets:
        return
    run.bad_in_a_row += 1
    if run.bad_in_a_row >= run.cfg.max_bad_steps:
        raise TrainError(f"stopped at step {run.step:,}: {run.bad_in_a_row} steps in a row had a non-finite loss or "
                         f"gradient (loss {result.loss}, grad norm {result.grad_norm}); lower --lr, use --dtype=bf16 "
                         f"or fp32, or --resume from an earlier checkpoint")


def _loop(run: Run) -> None:
    bar = tqdm(total=run.plan.end_step, initial=run.step, disable=not run.ctx.is_master, unit="step",
               dynamic_ncols=True, mininterval=1.0, desc="train")
    try:
        _steps(run, bar)
    finally:
        bar.close()


def _steps(run: Run, bar: tqdm) -> None:
    """Steps until max_iters, with logging, evaluation and checkpoints on their intervals and at the end."""
    cfg, plan = run.cfg, run.plan
    if run.step == 0:
        _eval_and_log(run, bar)   # the starting point of the validation curve
    window = {"start": time.perf_counter(), "tokens": 0, "flops": 0.0, "losses": [], "metrics": []}
    pending: list[StepResult] = []   # steps whose numbers are still on the device (run.defer_sync)
    while run.step < plan.end_step:
        lr = plan.lr_at(run.progress_tokens)
        pending.append(train_step(run, lr))
        run.step += 1
        run.progress_tokens += plan.step_tokens
        bar.update(1)
        log_now = run.step % cfg.log_interval == 0 or run.step == plan.end_step
        eval_now = run.step % cfg.eval_interval == 0 or run.step == plan.end_step
        save_now = run.step % cfg.save_interval == 0 or run.step == plan.end_step
        if not (log_now or eval_now or save_now) and pending[-1].on_device is not None:
            continue   # nothing needs the numbers yet: no host sync
        for result in read_back(run, pending):
            run.tokens_seen += result.positions
            window["tokens"] += result.positions
            window["flops"] += result.flops
            window["losses"].append(result.loss)
            window["metrics"].append(result.metrics)
            _after_step(run, result)
        pending.clear()
        if log_now:
            _log_train(run, window, lr, result, bar)
        paused_from = time.perf_counter()   # evaluation and checkpoint time does not count against tokens/s
        if eval_now:
            _eval_and_log(run, bar)
        if save_now:
            save_checkpoint(run)
        window["start"] += time.perf_counter() - paused_from


def _oom_message(cfg: TrainConfig, plan: Plan) -> str:
    smaller = max(1, cfg.micro_batch_size // 2)
    return (f"out of GPU memory at micro_batch_size={cfg.micro_batch_size} x seq_len={plan.seq_len}: try "
            f"--micro_batch_size={smaller} --grad_accum_steps={plan.grad_accum_steps * 2} (the same global "
            f"batch), a shorter --seq_len, or --fsdp")


def keep_freed_memory_on_cpu() -> bool:
    """Ask glibc to reuse freed memory instead of returning it to the OS. On CPU every step allocates and frees
    logits of micro_batch x seq_len x vocab floats (265 MB for 8 x 128 x 64,794); by default glibc mmaps each such
    block afresh, and the page faults cost about a third of a tiny model's step (measured: 1.5k -> 2.2k tokens/s).
    Returns False where this is not glibc (macOS, musl): nothing changes there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4   # mallopt parameter numbers from <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _resolve_plan(cfg: TrainConfig, ctx: DistContext, seq_len: int, train_ds: BatchSource,
                  meta: dict | None) -> tuple[Plan, list[str]]:
    """A new run's plan, or the checkpoint's continued on this world size, and the lines saying what changed
    (always the LR before and after the resume step)."""
    if meta is None:
        return resolve_plan(cfg, ctx.world_size, seq_len, train_ds.num_samples)
    saved = meta.get("plan")
    if saved is None:   # a checkpoint older than plans: rebuilt from its config, every step of the size it gave
        old_cfg = TrainConfig(**{k: v for k, v in meta["config"].items() if k in _TRAIN_FIELDS})
        saved = resolve_plan(old_cfg, meta["world_size"], seq_len, train_ds.num_samples)[0].saved()
        meta["progress_tokens"] = meta["step"] * saved["tokens_per_iter"]
    progress = meta["progress_tokens"]
    plan, notes = resolve_plan(cfg, ctx.world_size, seq_len, train_ds.num_samples, saved, meta["config"],
                               meta["step"], progress)
    before = Plan(**saved).lr_at(max(progress - saved["step_tokens"], 0))
    return plan, notes + [f"lr: {before:.3e} at step {meta['step']:,} (the checkpoint's last) -> "
                          f"{plan.lr_at(progress):.3e} at step {meta['step'] + 1:,} (the next)"]


def build_run(cfg: TrainConfig, ctx: DistContext, model_args: ModelArgs, train_ds: BatchSource,
              val_ds: BatchSource | None, tokenizer: dict) -> tuple[Run, dict | None]:
    """Model on its device (weights from scratch, --init_from or the checkpoint), wrapped, with its optimizer."""
    precision = choose_precision(cfg.dtype, ctx.device)
    if ctx.device.type == "cpu":
        keep_freed_memory_on_cpu()
    if cfg.fsdp and not ctx.distributed:   # fully_shard needs a process group, even of one process
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    fresh_plan = None if cfg.resume else _resolve_plan(cfg, ctx, model_args.max_seq_len, train_ds, None)[0]
    _prepare_out_dir(cfg, ctx)
    torch.manual_seed(cfg.seed)   # the same initial weights on every rank
    raw = Transformer(model_args).to(ctx.device)
    if cfg.lora_rank:   # before loading: base weights keep their names, a resumed run's adapters load into place
        apply_lora(raw, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    meta, optimizer_state, lora = _load_start(cfg, ctx, raw, tokenizer)
    plan, notes = (fresh_plan, []) if fresh_plan else \
        _resolve_plan(cfg, ctx, model_args.max_seq_len, train_ds, meta)
    flops_per_token = raw.flops_per_token(plan.seq_len)
    model = wrap_model(raw, cfg, ctx)
    optimizer = make_optimizer(model, cfg, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision.use_scaler)
    run = Run(cfg, ctx, plan, precision, model_args, tokenizer, train_ds, val_ds, raw, model, optimizer, scaler,
              flops_per_token, peak_flops(ctx.device, precision), lora=lora)
    # with CUDA and the fused AdamW (no GradScaler, no FSDP) a step never waits for the GPU except on log steps
    run.defer_sync = ctx.device.type == "cuda" and not precision.use_scaler and not cfg.fsdp \
        and bool(optimizer.defaults.get("fused"))
    if meta is not None:
        _restore(run, meta, optimizer_state)
        if ctx.is_master:
            print("\n".join(notes))
    else:
        torch.manual_seed(cfg.seed + ctx.rank)   # ranks draw different dropout masks
    return run, meta


def train(cfg: TrainConfig, ctx: DistContext, model_args: ModelArgs, train_ds: BatchSource,
          val_ds: BatchSource | None, tokenizer: dict, loss_fn: StageLoss | None = None) -> dict:
    """Train until plan.max_iters steps; returns a summary (step, tokens_seen, losses, checkpoint path).
    loss_fn: what the stage minimises (default TokenLoss: per-token cross-entropy)."""
    _check_logging_deps(cfg)
    if ctx.device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # fp32 matmuls (outside autocast) on TF32 tensor cores
    run, meta = build_run(cfg, ctx, model_args, train_ds, val_ds, tokenizer)
    run.loss_fn = loss_fn or run.loss_fn
    if run.progress_tokens >= run.plan.total_tokens:
        raise TrainError(f"the run in {cfg.out_dir} already finished at step {run.step:,} (max_iters "
                         f"{run.plan.max_iters:,}): pass a larger --max_iters (or --epochs) to train on; the LR then "
                         f"stays at its final {run.plan.lr_at(run.progress_tokens):.2e} unless you also give "
                         f"--lr_decay_iters, --lr or --min_lr")
    if ctx.is_master:
        print(describe_run(run), flush=True)
    run.logger = MetricsLogger(cfg, ctx, meta["step"] if meta else None)
    try:
        _loop(run)
    except torch.cuda.OutOfMemoryError:
        raise TrainError(_oom_message(cfg, run.plan)) from None
    finally:
        run.logger.close()
    summary = {"step": run.step, "tokens_seen": run.tokens_seen, "train_loss": run.metrics.get("loss", math.nan),
               "val_loss": run.last_val_loss, "best_val_loss": run.best_val_loss, "skipped_steps": run.skipped_steps,
               "checkpoint": os.path.join(cfg.out_dir, CKPT_LATEST)}
    if ctx.is_master:
        val = f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
        print(f"done: {summary['step']:,} steps, {summary['tokens_seen']:,} tokens, train loss "
              f"({getattr(run.loss_fn, 'unit', TokenLoss.unit)}) "
              f"{summary['train_loss']:.4f}{val}; checkpoint {summary['checkpoint']}")
    return summary


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None,
            errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a stage's main(argv): errors a user can fix (these plus `errors`) become one `error: ...` line on
    stderr and exit code 1; the process group is always torn down."""
    handled = (ConfigError, TrainError, TokenizerError, CheckpointError) + tuple(errors)
    try:
        main(sys.argv[1:] if argv is None else argv)
        return 0
    except handled as exc:
        world = int(os.environ.get("WORLD_SIZE", 1))
        prefix = f"rank {os.environ.get('RANK', 0)}: " if world > 1 else ""
        print(f"error: {prefix}{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
