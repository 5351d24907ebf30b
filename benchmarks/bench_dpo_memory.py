"""Memory of one DPO step (policy and reference scored, backward) with sequence log-probabilities from the fused
output layer (dpo_loss.sequence_logps: model(x, y, reduction="none")) against from full fp32 logits.

    python benchmarks/bench_dpo_memory.py                         # tiny, 4 pairs x 256 positions
    python benchmarks/bench_dpo_memory.py --preset=92m --pairs=4 --seq=512

Each way runs in a fresh process with glibc returning freed tensors to the OS (bench_train.track_live_memory);
reported: its peak RSS minus its RSS with both models built, and the step's time. The reference is a frozen copy
(full DPO); half of each row is prompt (ignored), half answer.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_train import peak_rss_mb, rss_mb, track_live_memory  # noqa: E402
import dpo_loss  # noqa: E402
from dpo_loss import DPOLoss, sequence_logps  # noqa: E402
from model import Transformer, model_args_from_preset  # noqa: E402


def logits_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plain way: full logits, then cross-entropy per position."""
    token_logps = -F.cross_entropy(model(x)[0].float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                   reduction="none")
    return token_logps.view(y.shape).sum(dim=1)


def one_step(way: str, preset: str, pairs: int, seq: int) -> dict:
    track_live_memory()
    torch.manual_seed(0)
    policy = Transformer(model_args_from_preset(preset, max_seq_len=seq)).train()
    reference = copy.deepcopy(policy).requires_grad_(False)
    x = torch.randint(0, policy.args.vocab_size, (2 * pairs, seq))
    y = x.clone()
    y[:, :seq // 2] = -100
    logps = logits_logps if way == "logits" else sequence_logps
    loss_fn = DPOLoss(beta=0.1, reference=lambda _model, xs, ys: logps(reference, xs, ys))
    dpo_loss.sequence_logps = logps   # the policy's pass too (DPOLoss looks the function up when called)
    built = rss_mb()
    start = time.perf_counter()
    loss_fn(policy, x, y).backward()
    return {"mb": peak_rss_mb() - built, "s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--_way", default="", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts._way:
        print(json.dumps(one_step(opts._way, opts.preset, opts.pairs, opts.seq)))
        return 0
    results = {}
    for way in ("logits", "fused"):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_way={way}", f"--preset={opts.preset}",
                               f"--pairs={opts.pairs}", f"--seq={opts.seq}"], capture_output=True, text=True,
                              check=True)
        results[way] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"DPO step, {opts.preset}, {opts.pairs} pairs x {opts.seq} positions, CPU {torch.get_num_threads()} threads")
    for way, r in results.items():
        print(f"{way:<8}{r['mb']:>9,.0f} MB{r['s']:>8.2f} s")
    print(f"fused / logits memory: {results['fused']['mb'] / results['logits']['mb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
