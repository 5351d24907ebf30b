"""Direct Preference Optimization (Rafailov et al. 2023) as a trainer.StageLoss: dpo.py's objective.

    from dpo_loss import DPOLoss, dpo_loss, sequence_logps, adapters_off_reference, FrozenReference
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)   # per pair
    trainer.train(cfg, ctx, model_args, train_ds, val_ds, tokenizer,
                  loss_fn=DPOLoss(beta=0.1, reference=FrozenReference("out/sft/ckpt.pt")))

A micro batch from dataset_dpo.DPODataset is x, y [2B, T]: B chosen samples, then the B rejected samples of
the same pairs. One forward pass scores all 2B (TRL's concatenated_forward); a sequence's log-probability is
the sum of log p(y_t) over its targets (y != -100: the final answer's tokens and its <eos>, never the prompt
or padding), from model(x, y, reduction="none"): the fused output layer (fused_ce.target_log_probs), so neither
the policy's nor the reference's [2B, T, vocab] logits are ever made (1 GB in fp32 for 4 pairs of 512 tokens).

The reference policy is the frozen starting model, scored without gradients in the same step:
- adapters_off_reference (with --lora_rank): the very model with its LoRA adapters switched off. No second
  copy: one extra no-grad forward per micro batch (about +1/3 of the step's compute), no extra memory.
- FrozenReference (full fine-tuning): a second, frozen copy of the --init_from weights on each rank: the same
  extra forward, plus one more set of weights in memory (fp32: 4 bytes per parameter; unsharded under FSDP).
Reference log-probabilities precomputed once (TRL's precompute_ref_log_probs) would save that forward but
need a pass over the data before training and a per-pair store that follows the data order; not built here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset_sft import IGNORE_INDEX
from lora import adapters_disabled
from model import load_model

LOSS_KINDS = ("sigmoid", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
Reference = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]   # (policy, x, y) -> ref logps [N]


def sequence_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p(y_t) over the targets (y != -100): [N] fp32 for x, y [N, T], through the model's
    fused output layer (no logits)."""
    return -model(x, y, reduction="none")[1].sum(dim=1)                   # [N]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             kind: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from sequence log-probabilities [B] each.
    sigmoid: -(1 - ls) log σ(β h) - ls log σ(-β h), h = (πc - rc) - (πr - rr) (label smoothing = cDPO);
    ipo: (h - 1 / (2β))² (Azar et al. 2023; DPOLoss gives it log-probabilities averaged over each sequence's
    targets, as TRL does). Rewards: β (π - r), no gradient."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif kind == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--loss={kind}: choose one of {', '.join(LOSS_KINDS)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_mask(y: torch.Tensor) -> torch.Tensor:
    """[B] bool: pairs whose chosen and rejected rows both have targets (an all-ignored filler pair has none)."""
    has_targets = (y != IGNORE_INDEX).any(dim=1)
    half = y.shape[0] // 2
    return has_targets[:half] & has_targets[half:]


def adapters_off_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sequence log-probabilities under the LoRA model's base: the same weights with every adapter off (a DDP
    wrapper is bypassed: a no-grad forward has no gradients to synchronise)."""
    inner = getattr(model, "module", model)
    with adapters_disabled(inner):
        return sequence_logps(inner, x, y)


class FrozenReference:
    """A frozen copy of the starting weights, loaded on first use onto the batch's device."""

    def __init__(self, path: str, n_heads: int = 8):
        self.path, self.n_heads = path, n_heads
        self.model: nn.Module | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            self.model = load_model(self.path, device=x.device, n_heads=self.n_heads)[0].requires_grad_(False)
        return sequence_logps(self.model, x, y)


class DPOLoss:
    """trainer.StageLoss for DPO: the summed loss of a micro batch's pairs; the step averages per pair."""
    unit = "per pair"
    batch_item = "pairs"   # --micro_batch_size counts pairs: twice as many sequences
    plot_label = "DPO loss (mean per pair)"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, kind: str = "sigmoid",
                 reference: Reference = adapters_off_reference):
        if beta <= 0 or not 0 <= label_smoothing < 0.5 or kind not in LOSS_KINDS:
            raise ValueError(f"--beta={beta} --label_smoothing={label_smoothing} --loss={kind}: need beta > 0, "
                             f"0 <= label_smoothing < 0.5, loss one of {', '.join(LOSS_KINDS)}")
        self.beta, self.label_smoothing, self.kind, self.reference = beta, label_smoothing, kind, reference
        self._sums: dict[str, torch.Tensor] = {}

    def count(self, y: torch.Tensor) -> int:
        return int(pair_mask(y).sum())

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logps = sequence_logps(model, x, y)                      # [2B]: one pass over chosen and rejected
        with torch.no_grad():
            ref_logps = self.reference(model, x, y)
        if self.kind == "ipo":   # IPO's margin is on per-token averages (TRL): long answers do not dominate it
            targets = (y != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            logps, ref_logps = logps / targets, ref_logps / targets
        half, valid = x.shape[0] // 2, pair_mask(y)
        losses, chosen_rewards, rejected_rewards = dpo_loss(logps[:half], logps[half:], ref_logps[:half],
                                                            ref_logps[half:], self.beta, self.label_smoothing,
                                                            self.kind)
        values = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                  "rewards/margins": chosen_rewards - rejected_rewards,
                  "logps/chosen": logps[:half].detach(), "logps/rejected": logps[half:].detach()}
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.masked_fill(~valid, 0.0).sum()
        return losses.masked_fill(~valid, 0.0).sum()

    def take_metrics(self) -> dict[str, torch.Tensor]:
        sums, self._sums = self._sums, {}
        return sums

