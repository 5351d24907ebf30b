"""The training config: one typed dataclass, `--key=value` flags parsed against its field types, --help from
the docstring under each field. pretrain.py, sft.py and dpo.py set their own defaults (subclasses add fields).

    cfg = parse_config(sys.argv[1:], TrainConfig(out_dir="out/sft", lr=2e-5))
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

from dataset_sft import DEFAULT_BUCKET_BATCHES
from lora import parse_targets
from model import PRESETS


class ConfigError(ValueError):
    """A bad command-line flag or config value; the message names the flag."""


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message is one line saying what to do."""


@dataclass
class TrainConfig:
    """Everything a training run reads. pretrain.py and sft.py set their own defaults; `--key=value` overrides."""

    data: str = "data/pretrain_data.bin"
    """Training data: .bin files or glob patterns, comma-separated (sft.py: its CSV)."""
    val_data: str = ""
    """Validation data; '' = the split data_process.py wrote beside the first data file, if any; 'none' = off."""
    out_dir: str = "out/pretrain"
    """Folder for checkpoints (ckpt.pt, ckpt_NNNNNNN.pt, best.pt), metrics.jsonl and loss.png."""
    preset: str = "92m"
    """Model size from model.PRESETS (tiny, 92m, 218m); with --resume or --init_from their shape is used instead."""
    seq_len: int = 0
    """Tokens per training sequence; 0 = the model's max_seq_len (preset or checkpoint)."""
    tokenizer: str = ""
    """Tokenizer folder the data must match; '' = the tokenizer named by the data's manifest."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on each rank."""
    grad_accum_steps: int = 2
    """Micro batches per optimizer step on each rank (derived instead when batch_tokens > 0)."""
    batch_tokens: int = 0
    """Global batch in tokens per optimizer step; > 0 sets grad_accum_steps = batch_tokens /
    (micro_batch_size * seq_len * world_size), which must divide exactly."""
    max_iters: int = 0
    """Optimizer steps of the whole run; 0 = as many as `epochs` passes over the training data take. Fixed at the
    first start (with the tokens per step and the schedule); with --resume a new value moves the end only."""
    epochs: float = 1.0
    """Passes over the training data when max_iters is 0."""
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay and after it."""
    warmup_iters: int = -1
    """Steps of linear warmup; -1 = min(1000, max_iters // 10)."""
    lr_decay_iters: int = 0
    """Step at which the cosine decay reaches min_lr; 0 = max_iters."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices (embeddings, linear weights) only, never to norms."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    dtype: str = "auto"
    """auto | bf16 | fp16 | fp32. auto = bf16 on GPUs with native bf16 (Ampere or newer), else fp16 with a
    GradScaler; fp32 on CPU.
    Master weights, optimizer state and checkpoints are always fp32."""
    compile: str = "auto"
    """auto | true | false: torch.compile the model. auto = on with CUDA, off on CPU."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 (fully_shard) instead of replicating (DDP)."""
    eval_interval: int = 500
    """Evaluate on the validation data every this many steps (and at the start and the end)."""
    eval_iters: int = 50
    """Validation micro batches per rank per evaluation, counted at the first start; those samples, spread over
    the whole validation data, are scored at every evaluation on any world size."""
    save_interval: int = 1000
    """Write a checkpoint every this many steps (and at the end)."""
    keep_last: int = 3
    """Step-numbered checkpoints to keep; ckpt.pt is always the newest, best.pt the best validation loss."""
    log_interval: int = 10
    """Log loss, lr, tokens/s and MFU every this many steps (metrics.jsonl, progress bar)."""
    seed: int = 1337
    """Seed of the initial weights, the data order and dropout."""
    resume: bool = False
    """Continue the run in out_dir from its newest readable checkpoint (weights, optimizer, data position, RNG)
    with the settings it saved; flags given with --resume override them."""
    init_from: str = ""
    """Start from these weights (a checkpoint, a seed-style .pth or an exported HF folder), fresh optimizer."""
    overwrite: bool = False
    """Start a new run in an out_dir that already holds one, deleting its checkpoints (without it, refused)."""
    max_bad_steps: int = 20
    """Stop after this many steps in a row whose loss or gradient was not finite (each one is skipped)."""
    tensorboard: bool = False
    """Also log to TensorBoard (out_dir/tensorboard); needs the tensorboard package."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project; needs the wandb package."""
    wandb_run_name: str = ""
    """Name of the wandb run; '' = wandb's default."""
    lora_rank: int = 0
    """LoRA adapter rank; 0 = train every weight. > 0 freezes the --init_from weights and trains only low-rank
    adapters on --lora_targets (lora.py); checkpoints then hold the adapters and the base weights' sha256."""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter's update B A is multiplied by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    """Linear layers of every block that get adapters (comma-separated: wq,wk,wv,wo attention; w1,w2,w3 SwiGLU)."""

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            self.compile = str(self.compile).lower()
        self.dtype, self.compile = self.dtype.lower(), self.compile.lower()
        choices = {"dtype": ("auto", "bf16", "fp16", "fp32"), "compile": ("auto", "true", "false")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name}={getattr(self, name)}: choose one of {', '.join(allowed)}")
        for name in ("micro_batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "save_interval",
                     "keep_last", "log_interval", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 1")
        for name in ("seq_len", "batch_tokens", "max_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 0")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset={self.preset}: choose one of {', '.join(PRESETS)}")
        self._check_optimizer_values()
        self._check_lora_values()
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: --overwrite deletes the run --resume "
                              "would continue")
        if self.resume and self.init_from:
            raise ConfigError(f"--resume and --init_from={self.init_from} exclude each other: --resume continues "
                              f"the run in --out_dir, --init_from starts a new run from weights")

    def _check_lora_values(self) -> None:
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_rank={self.lora_rank} --lora_alpha={self.lora_alpha} --lora_dropout="
                              f"{self.lora_dropout}: need rank >= 0, alpha > 0, 0 <= dropout < 1")
        try:
            parse_targets(self.lora_targets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.lora_rank and not (self.init_from or self.resume):
            raise ConfigError(f"--lora_rank={self.lora_rank} adapts existing weights: pass --init_from (or --resume)")

    def _check_optimizer_values(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--lr={self.lr} --min_lr={self.min_lr}: need lr > 0 and 0 <= min_lr <= lr")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be in [0, 1)")
        if self.warmup_iters < -1:
            raise ConfigError(f"--warmup_iters={self.warmup_iters}: must be >= 0, or -1 for the default")
        if self.epochs <= 0 and self.max_iters == 0:
            raise ConfigError(f"--epochs={self.epochs}: must be > 0 when --max_iters is 0")


@dataclass
class SFTConfig(TrainConfig):
    """TrainConfig plus the data options of the stages that read conversation CSVs (sft.py, dpo.py)."""

    val_data: str = ""
    """Validation CSV (all its rows); '' = a held-out --val_fraction of --data's rows; 'none' = off."""
    val_fraction: float = 0.01
    """Share of --data's rows held out for the validation loss (by a hash of each row); ignored with --val_data."""
    bucket_batches: int = DEFAULT_BUCKET_BATCHES
    """Length grouping: samples are sorted by length within buckets of this many global batches (1 = none)."""


def _parse_value(name: str, kind: Any, text: str) -> Any:
    """`text` as the type of field `name`; ConfigError naming --name when it does not parse."""
    try:
        if kind is bool or kind == "bool":
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int or kind == "int":
            number = float(text.replace("_", ""))     # accepts 2e4 and 20_000
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float or kind == "float":
            return float(text)
        return text
    except ValueError:
        kind_name = getattr(kind, "__name__", kind)
        raise ConfigError(f"--{name}={text}: expected {kind_name}") from None


def _split_flags(argv: list[str]) -> Iterator[tuple[str, str]]:
    """(key, value) pairs of `--key=value`, `--key value` and bare `--key` (= true)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "true"
            i += has_value
        yield key.replace("-", "_"), value
        i += 1


def given_flags(argv: list[str], cls: type) -> dict[str, Any]:
    """The flags argv gives, as values of the types of dataclass `cls`'s fields."""
    kinds = {f.name: f.type for f in fields(cls)}
    given: dict[str, Any] = {}
    for key, value in _split_flags(argv):
        if key not in kinds:
            raise ConfigError(f"unknown flag --{key} (--help lists them)")
        given[key] = _parse_value(key, kinds[key], value)
    return given


def parse_config(argv: list[str], defaults: TrainConfig) -> TrainConfig:
    """`defaults` with `--key=value` overrides applied (any dataclass works, e.g. a TrainConfig subclass).
    Values are checked against the field types; `--flag` alone means true. --help prints every field."""
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(type(defaults), defaults))
        raise SystemExit(0)
    return dataclasses.replace(defaults, **given_flags(argv, type(defaults)))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (and its bases), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(inspect.getsource(klass)).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_help(cls: type, defaults: Any) -> str:
    docs = field_docs(cls)
    lines = ["flags (--key=value; --flag alone = true):"]
    for f in fields(cls):
        flag = f"--{f.name}={getattr(defaults, f.name)}"
        lines.append(f"  {flag:<34} {docs.get(f.name, '')}")
    return "\n".join(lines)


def format_config(cfg: Any) -> str:
    return "config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items())
