"""LoRA (Hu et al. 2021): low-rank adapters on the model's linear layers; only the adapters train.

    from lora import apply_lora, adapters_disabled, merge_lora
    apply_lora(model, rank=8, alpha=16, dropout=0.05, targets="wq,wk,wv,wo,w1,w2,w3")   # base frozen
    with adapters_disabled(model):      # the base model again (DPO's reference, no second copy)
        ref_logits, _ = model(x)
    merge_lora(model)                   # W += (alpha / rank) B A in place; the model is a plain Transformer again

LoRALinear subclasses nn.Linear and keeps its `weight` under the same name, so a LoRA model loads base weights
unchanged and its state dict is the base's plus `….lora_A` [rank, in] and `….lora_B` [out, rank]. B starts at
zero, so a fresh adapter changes nothing. A LoRA checkpoint holds only those adapter tensors plus the identity
(path, sha256) of the base weights it was trained on; model.load_model merges them (merge_state_dict) into
the base, so chat.py, eval.py, eval_pretrain.py and export_hf.py read LoRA checkpoints like any other.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# --lora_targets names -> the module path inside a Block
TARGETS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
           "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    """y = x W^T + (alpha / rank) * dropout(x) A^T B^T, W frozen; merge() folds the adapter into W."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight   # the same Parameter: no copy, the same state-dict name
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as peft and the paper: A random, B zero
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if not self.enabled:
            return out
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        """The adapter as a weight update [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + delta (the adapter folded in)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device=self.weight.device,
                           dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta())
        return linear


def parse_targets(text: str) -> list[str]:
    """`wq,wv` -> ["wq", "wv"]; ValueError naming the unknown ones."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if not names or unknown:
        raise ValueError(f"--lora_targets={text}: choose from {','.join(TARGETS)} (unknown: {','.join(unknown)})")
    return names


def _targets(model: nn.Module, targets: list[str]) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute name, module) of every targeted linear layer of every block."""
    for block in model.layers:
        for name in targets:
            path, _, attr = TARGETS[name].rpartition(".")
            parent = block.get_submodule(path)
            yield parent, attr, getattr(parent, attr)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str) -> None:
    """Wrap the targeted linear layers of every block in LoRALinear and freeze everything but the adapters."""
    for parent, attr, linear in _targets(model, parse_targets(targets)):
        setattr(parent, attr, LoRALinear(linear, rank, alpha, dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(ADAPTER_SUFFIXES))


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model inside the block (every adapter off), the adapted one again after it."""
    modules = lora_modules(model)
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.enabled = True


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place: the model is a plain network again (what export calls)."""
    for block in model.layers:
        for name in TARGETS.values():
            path, _, attr = name.rpartition(".")
            parent = block.get_submodule(path)
            if isinstance(getattr(parent, attr), LoRALinear):
                setattr(parent, attr, getattr(parent, attr).merged())
    return model


def adapter_state(state: dict) -> dict:
    """The adapter tensors of a state dict."""
    return {k: v for k, v in state.items() if k.endswith(ADAPTER_SUFFIXES)}


def merge_state_dict(base: dict, adapters: dict, scaling: float) -> dict:
    """Base weights with every adapter pair folded in: W + scaling * B @ A (fp32), names unchanged."""
    merged = dict(base)
    for key in adapters:
        if not key.endswith(".lora_A"):
            continue
        module = key[:-len(".lora_A")]
        if f"{module}.weight" not in base or f"{module}.lora_B" not in adapters:
            raise KeyError(f"adapter {module} has no base weight or no lora_B")
        a, b = adapters[key].float(), adapters[f"{module}.lora_B"].float()
        weight = base[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.float() + scaling * (b @ a)).to(weight.dtype)
    return merged


def weights_sha256(path: str) -> str:
    """sha256 of the file that holds weights: the file itself, an HF folder's model.safetensors, or a run
    folder's ckpt.pt (what model.load_model reads for that path)."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "ckpt.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
