"""The run plan: what a training run promised at its first start, kept across resume, rescale and extension.

    plan, notes = resolve_plan(cfg, world_size, seq_len, num_samples)                  # first start
    plan, notes = resolve_plan(cfg, world_size, seq_len, num_samples, saved, ckpt)     # --resume
    lr = plan.lr_at(progress_tokens)

The plan is fixed at the first start and saved in every checkpoint: total optimizer steps (max_iters) in steps
of tokens_per_iter tokens, warmup, decay horizon, peak and minimum LR, and how many validation samples an
evaluation scores. The LR is a pure function of progress = positions stepped so far / tokens_per_iter, so a
resume needs no scheduler state and a rescale cannot bend the schedule:

- Another world size (or micro batch): gradient accumulation is chosen to keep tokens_per_iter when it divides
  evenly (then every step is the step it would have been); otherwise the steps get another size, one line says
  so, and the schedule and the end of the run follow tokens seen.
- Extension (`--resume --max_iters=N` or `--epochs=E` past the old end): only the end moves. The LR continues the
  saved schedule, which stays at its final value (min_lr) after the decay horizon, unless --lr, --min_lr,
  --warmup_iters or --lr_decay_iters are given too; the LR before and after the resume step is always printed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from train_config import ConfigError, TrainConfig

# config fields that shape the schedule; given anew with --resume they change the saved plan
SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_iters", "lr_decay_iters")


def get_lr(step: float, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """Learning rate at progress `step` (optimizer steps done, 0-based, fractional after a rescale whose steps
    have another size): linear warmup, cosine decay to min_lr, then min_lr."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


@dataclass
class Plan:
    """The saved promise (max_iters ... eval_samples) and how this process keeps it (grad_accum_steps,
    step_tokens, end_step)."""
    max_iters: int           # optimizer steps of the whole run, each of tokens_per_iter positions
    tokens_per_iter: int     # positions per optimizer step, all ranks, as resolved at the first start
    warmup_iters: int
    lr_decay_iters: int
    lr: float
    min_lr: float
    seq_len: int
    eval_samples: int        # validation windows (pretraining) or conversations (SFT) per evaluation, all ranks
    grad_accum_steps: int = 1   # this run's micro batches per optimizer step per rank
    step_tokens: int = 0        # this run's positions per optimizer step, all ranks
    end_step: int = 0           # the step counter at which this run stops

    @property
    def total_tokens(self) -> int:
        return self.max_iters * self.tokens_per_iter

    def lr_at(self, progress_tokens: int) -> float:
        return get_lr(progress_tokens / self.tokens_per_iter, self.lr, self.min_lr, self.warmup_iters,
                      self.lr_decay_iters)

    def saved(self) -> dict:
        """What a checkpoint records (plain values)."""
        return asdict(self)


def _steps_for_epochs(epochs: float, num_samples: int, seq_len: int, tokens_per_iter: int) -> int:
    samples_per_step = tokens_per_iter // seq_len
    return max(1, math.ceil(epochs * num_samples / samples_per_step))


def _default_warmup(cfg: Any, max_iters: int) -> int:
    return cfg.warmup_iters if cfg.warmup_iters >= 0 else min(1000, max_iters // 10)


def _asked_accum(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    """The accumulation the flags ask for: --batch_tokens / (micro batch positions of all ranks), which must
    divide exactly, else --grad_accum_steps."""
    per_micro = cfg.micro_batch_size * seq_len * world_size
    if not cfg.batch_tokens:
        return cfg.grad_accum_steps
    if cfg.batch_tokens % per_micro:
        raise ConfigError(f"--batch_tokens={cfg.batch_tokens} is not a multiple of micro_batch_size * seq_len * "
                          f"world_size = {cfg.micro_batch_size} * {seq_len} * {world_size} = {per_micro}")
    return cfg.batch_tokens // per_micro


def _fresh(cfg: TrainConfig, world_size: int, seq_len: int, num_samples: int) -> Plan:
    accum = _asked_accum(cfg, seq_len, world_size)
    tokens = cfg.micro_batch_size * seq_len * world_size * accum
    max_iters = cfg.max_iters or _steps_for_epochs(cfg.epochs, num_samples, seq_len, tokens)
    warmup = _default_warmup(cfg, max_iters)
    decay = max(cfg.lr_decay_iters or max_iters, warmup)
    return Plan(max_iters, tokens, warmup, decay, cfg.lr, cfg.min_lr, seq_len,
                cfg.eval_iters * cfg.micro_batch_size * world_size, accum, tokens, max_iters)


def _changed(cfg: TrainConfig, before: dict, name: str) -> bool:
    return name in before and getattr(cfg, name) != before[name]


def _continue(cfg: TrainConfig, saved: dict, before: dict, num_samples: int) -> tuple[Plan, list[str]]:
    """The saved plan with what this resume changes on purpose: the run's length, the schedule, the eval size."""
    plan = Plan(**{k: v for k, v in saved.items() if k in Plan.__dataclass_fields__})
    notes: list[str] = []
    if _changed(cfg, before, "max_iters") or (not cfg.max_iters and _changed(cfg, before, "epochs")):
        old = plan.max_iters
        plan.max_iters = cfg.max_iters or _steps_for_epochs(cfg.epochs, num_samples, plan.seq_len,
                                                            plan.tokens_per_iter)
        rescheduled = [f"--{n}" for n in SCHEDULE_FIELDS if _changed(cfg, before, n)]
        how = (f"the schedule changes with {', '.join(rescheduled)}" if rescheduled else
               f"the LR continues the saved schedule (cosine to {plan.min_lr:g} at step {plan.lr_decay_iters:,}, "
               f"then {plan.min_lr:g}); give --lr_decay_iters (or --lr / --min_lr / --warmup_iters) to change it")
        notes.append(f"run length: {old:,} -> {plan.max_iters:,} steps of {plan.tokens_per_iter:,} tokens; {how}")
    if _changed(cfg, before, "lr") or _changed(cfg, before, "min_lr"):
        plan.lr, plan.min_lr = cfg.lr, cfg.min_lr   # TrainConfig checked 0 <= min_lr <= lr
    if _changed(cfg, before, "warmup_iters"):
        plan.warmup_iters = _default_warmup(cfg, plan.max_iters)
    if _changed(cfg, before, "lr_decay_iters"):
        plan.lr_decay_iters = cfg.lr_decay_iters or plan.max_iters
    plan.lr_decay_iters = max(plan.lr_decay_iters, plan.warmup_iters)
    if _changed(cfg, before, "eval_iters"):
        plan.eval_samples = 0   # set from this run's geometry by _geometry
    return plan, notes


def _geometry(plan: Plan, cfg: TrainConfig, before: dict, world_size: int) -> list[str]:
    """Choose this run's accumulation: the plan's tokens per step when they divide into micro batches of this
    world size; another step size (said in one line) when they do not or when the batch flags were changed."""
    per_micro = cfg.micro_batch_size * plan.seq_len * world_size
    if not plan.eval_samples:
        plan.eval_samples = cfg.eval_iters * cfg.micro_batch_size * world_size
    asked = _changed(cfg, before, "batch_tokens") or _changed(cfg, before, "grad_accum_steps")
    if not asked and plan.tokens_per_iter % per_micro == 0:
        plan.grad_accum_steps = plan.tokens_per_iter // per_micro
        plan.step_tokens = plan.tokens_per_iter
        return []
    if asked:
        accum = _asked_accum(cfg, plan.seq_len, world_size)
    else:
        accum = max(1, round(plan.tokens_per_iter / per_micro))
    plan.grad_accum_steps, plan.step_tokens = accum, per_micro * accum
    if plan.step_tokens == plan.tokens_per_iter:
        return []
    why = "as asked" if asked else (f"{plan.tokens_per_iter:,} is no multiple of micro_batch_size x seq_len x "
                                    f"{world_size} ranks = {per_micro:,}")
    return [f"note: steps of {plan.step_tokens:,} tokens instead of the plan's {plan.tokens_per_iter:,} ({why}); "
            f"the LR schedule and the end of the run follow tokens seen"]


def resolve_plan(cfg: TrainConfig, world_size: int, seq_len: int, num_samples: int, saved: dict | None = None,
                 before: dict | None = None, step: int = 0, progress_tokens: int = 0) -> tuple[Plan, list[str]]:
    """The plan of a new run (saved=None), or of a resumed one: its checkpoint's plan `saved` and config `before`
    continued at (step, progress_tokens) with what `cfg` changes on purpose. Returns the plan with this run's
    geometry and end, and lines to print."""
    if saved is None or before is None:
        return _fresh(cfg, world_size, seq_len, num_samples), []
    plan, notes = _continue(cfg, saved, before, num_samples)
    notes += _geometry(plan, cfg, before, world_size)
    left = max(plan.total_tokens - progress_tokens, 0)
    plan.end_step = step + math.ceil(left / plan.step_tokens)
    return plan, notes
