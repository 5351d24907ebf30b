"""Mixed precision and the hardware's peak FLOP/s: shared by training (autocast, GradScaler, MFU) and
inference (the default dtype on a GPU)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from train_config import ConfigError


@dataclass
class Precision:
    name: str                              # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None     # None = no autocast (fp32)

    @property
    def use_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself (Ampere, compute capability 8.0, or newer; ROCm). A bare
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (V100, T4, RTX 20xx): slow, and
    without some kernels. torch < 2.4 lacks its including_emulation keyword: the capability is read instead."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def choose_precision(dtype: str, device: torch.device) -> Precision:
    """dtype auto -> bf16 where the GPU computes in it natively, else fp16 (with a GradScaler); fp32 on CPU."""
    if dtype == "auto":
        dtype = ("bf16" if native_bf16(device) else "fp16") if device.type == "cuda" else "fp32"
    elif dtype == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ConfigError(f"--dtype=bf16: {torch.cuda.get_device_name(device)} has no native bf16 (only a slow "
                          f"emulation); use --dtype=fp16 (with a GradScaler) or --dtype=auto")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    return Precision(dtype, autocast_dtype)


# Dense bf16/fp16 tensor-core peak FLOP/s (fp32 accumulate) from NVIDIA's spec sheets, most specific name first.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 366e12), ("L40", 181e12), ("L4", 121e12), ("RTX 6000 Ada", 364e12), ("RTX A6000", 155e12),
    ("RTX 4090", 165e12), ("RTX 4080", 97.5e12), ("RTX 3090 Ti", 80e12), ("RTX 3090", 71e12),
    ("RTX 3080", 59.5e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device: torch.device, precision: Precision) -> float | None:
    """Per-device peak FLOP/s for MFU, or None (CPU, fp32, or a GPU not in PEAK_FLOPS: tokens/s only)."""
    if device.type != "cuda" or precision.autocast_dtype is None:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)
