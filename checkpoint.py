"""Checkpoint files: atomic writes, finding the newest readable checkpoint of a run, RNG states.

A run's folder holds ckpt_NNNNNNN.pt (step-numbered), ckpt.pt (the newest, a hard link) and best.pt."""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from typing import Any

import numpy as np
import torch

from train_config import TrainError

CKPT_LATEST, CKPT_BEST = "ckpt.pt", "best.pt"
_STEP_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")
RESUME_KEYS = ("model", "optimizer", "step", "model_args", "config", "tokenizer", "data_state", "rng")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to path.tmp, fsync, rename into place: a crash leaves the old file or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:   # platforms that cannot open a directory (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: str, dst: str) -> None:
    """Make dst the same file as src (a hard link costs no space or time; a copy where links fail), atomically."""
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def step_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of out_dir's ckpt_NNNNNNN.pt files, newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, name))
             for name in os.listdir(out_dir) if (m := _STEP_CKPT.match(name))]
    return sorted(found, reverse=True)


def find_checkpoint(out_dir: str, report: bool = True) -> tuple[dict, str]:
    """The newest checkpoint of out_dir that loads and holds everything resuming needs. Unreadable ones
    (truncated by a crash, corrupt) are reported and the previous one is used."""
    candidates = [path for _, path in step_checkpoints(out_dir)] + [os.path.join(out_dir, CKPT_LATEST)]
    problems: list[str] = []
    tried: list[str] = []
    for path in candidates:
        if not os.path.isfile(path) or any(os.path.samefile(path, t) for t in tried):
            continue
        tried.append(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            missing = [k for k in RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["everything"]
            reason = f"lacks {', '.join(missing)}" if missing else ""
        except Exception as exc:   # truncated zip, garbage bytes: anything torch.load can raise
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if not reason:
            if problems and report:
                print(f"warning: {'; '.join(problems)}; resuming from the previous checkpoint {path}", file=sys.stderr)
            return ckpt, path
        problems.append(f"{path} is unreadable or incomplete ({reason})")
    if problems:
        raise TrainError(f"--resume: no usable checkpoint in {out_dir}: {'; '.join(problems)}")
    raise TrainError(f"--resume: {out_dir} holds no checkpoint (ckpt.pt); drop --resume to start a new run")


def rng_state(device: torch.device) -> dict:
    """Every RNG state as plain lists / tensors (so torch.load(weights_only=True) reads it back)."""
    py_version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [py_version, list(py_keys), py_gauss],
             "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    py_version, py_keys, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_keys), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

