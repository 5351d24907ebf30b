"""SFT throughput of packed rows (sft.py's default) against one padded sample per row (--pack=false), on real data.

    python benchmarks/bench_sft_pack.py                                  # ../shared/realdata medical sample
    python benchmarks/bench_sft_pack.py --csv=sft_data/sft_data.csv --preset=tiny --seq_len=512 --epochs=1

Three runs: packed; padded with length grouping (--pack=false, sft.py's padded mode: samples of similar length
share a micro batch, so little of it is padding); padded without it (--pack=false --bucket_batches=1: random
samples padded to the longest of their micro batch, the seed project's batches). All three train the same model
from the same initial weights through the trainer (trainer.build_run and trainer.train_step, as sft.py does) for
the same number of epochs, interleaved step by step in proportion to their lengths (so load from other processes
slows all alike), at the same micro batch: micro_batch_size rows of at most seq_len positions, so the largest
micro batch, and with it the memory it needs, is the same [micro_batch_size, seq_len] block in all. A padded step
accumulates as many micro batches as it takes to hold about as many conversations as one packed micro batch, so
the runs take about as many optimizer steps of the same size. Reported: learned answer tokens per second of
training step time, the answer tokens' share of the positions computed, steps, and the validation loss (the same
held-out split, padded, at each quarter of the run) against answer tokens trained: the loss curve packing must
keep. Without --csv it converts ../shared/realdata/medical_sft_1K_format.jsonl with sft_data_process.py into a
temporary folder.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sft  # noqa: E402
import trainer  # noqa: E402
from chatglm_tokenizer import load_tokenizer, tokenizer_identity  # noqa: E402
from dataset_sft import DEFAULT_BUCKET_BATCHES  # noqa: E402
from train_config import parse_config  # noqa: E402

REAL_SAMPLE = os.path.join(os.path.dirname(REPO), "shared", "realdata", "medical_sft_1K_format.jsonl")


def make_csv(folder: str) -> str:
    out = os.path.join(folder, "medical_sft.csv")
    subprocess.run([sys.executable, "sft_data_process.py", f"--corpus=sharegpt={REAL_SAMPLE}", "--max_chars=0",
                    f"--out={out}"], cwd=REPO, check=True, capture_output=True)
    return out


def val_loss(run: trainer.Run) -> float:
    return trainer.evaluate(run)["val_loss"]


def build_mode(opts: argparse.Namespace, csv: str, pack: bool, out_dir: str, accum: int,
               bucket_batches: int = DEFAULT_BUCKET_BATCHES) -> dict:
    """A trainer Run in one mode (same seed, so the same initial weights) and the counters of its progress."""
    argv = [f"--data={csv}", f"--out_dir={out_dir}", f"--preset={opts.preset}", f"--seq_len={opts.seq_len}",
            f"--micro_batch_size={opts.micro_batch_size}", f"--grad_accum_steps={accum}", f"--epochs={opts.epochs}",
            f"--lr={opts.lr}", f"--min_lr={opts.lr / 10}", "--warmup_iters=0", f"--val_fraction={opts.val_fraction}",
            "--eval_iters=1000", f"--pack={pack}", f"--bucket_batches={bucket_batches}",
            f"--tokenizer={opts.tokenizer}", "--overwrite"]
    cfg = parse_config(argv, sft.DEFAULTS)
    ctx = trainer.setup_distributed()
    identity = tokenizer_identity(opts.tokenizer)
    model_args = trainer.resolve_model_args(cfg, ctx, identity)
    train_ds, val_ds = sft.build_datasets(cfg, load_tokenizer(opts.tokenizer), model_args.max_seq_len, 0, 1)
    run, _ = trainer.build_run(cfg, ctx, model_args, train_ds, val_ds, identity)
    name = "packed" if pack else ("padded" if bucket_batches > 1 else "padded, ungrouped")
    mode = {"name": name, "run": run, "step": 0, "answers": 0, "positions": 0, "seconds": 0.0,
            "curve": [(0, val_loss(run))]}
    next_batch = train_ds.next_batch

    def counting_next_batch():
        batch = next_batch()
        mode["answers"] += int((batch[1] != -100).sum())
        mode["positions"] += batch[1].numel()
        return batch
    train_ds.next_batch = counting_next_batch
    return mode


def step_mode(mode: dict) -> None:
    """One timed optimizer step; the validation loss at each quarter of the run."""
    run = mode["run"]
    lr = run.plan.lr_at(mode["step"] * run.plan.tokens_per_iter)
    start = time.perf_counter()
    trainer.train_step(run, lr)
    mode["seconds"] += time.perf_counter() - start
    mode["step"] += 1
    if mode["step"] in {max(1, run.plan.max_iters * k // 4) for k in (1, 2, 3, 4)}:
        mode["curve"].append((mode["answers"], val_loss(run)))


def train_all(modes: list[dict]) -> None:
    """Step whichever mode is less far through its run, so that load from other processes on a shared machine
    falls on all alike."""
    while True:
        open_modes = [m for m in modes if m["step"] < m["run"].plan.max_iters]
        if not open_modes:
            return
        step_mode(min(open_modes, key=lambda m: m["step"] / m["run"].plan.max_iters))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default="", help="an SFT CSV; default: the real medical sample, converted")
    parser.add_argument("--tokenizer", default=os.path.join(REPO, "chatglm_tokenizer"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val_fraction", type=float, default=0.1)
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        csv = opts.csv or make_csv(folder)
        packed = build_mode(opts, csv, True, os.path.join(folder, "packed"), 1)
        # the padded run accumulates as many micro batches as it takes to hold about the conversations of one
        # packed micro batch: both take about the same optimizer steps over the epoch, and the loss curves compare
        rows = len(packed["run"].train_ds) * opts.micro_batch_size
        accum = max(1, round(len(packed["run"].train_ds.samples) / rows))
        results = [build_mode(opts, csv, False, os.path.join(folder, "padded"), accum),
                   build_mode(opts, csv, False, os.path.join(folder, "ungrouped"), accum, bucket_batches=1), packed]
        train_all(results)
    for r in results:
        r["answer_tok_s"] = r["answers"] / r["seconds"]
    padded, ungrouped, packed = results
    print(f"\n{opts.preset}, micro batch {opts.micro_batch_size} x {opts.seq_len} positions at most, {opts.epochs} "
          f"epoch(s), padded steps accumulate {accum} micro batches, packed 1; CPU {torch.get_num_threads()} threads")
    print(f"{'mode':<18}{'steps':>7}{'answer tokens':>15}{'of positions':>14}{'step s':>9}{'answer tok/s':>14}"
          f"   val loss at answer tokens")
    for r in results:
        curve = "  ".join(f"{loss:.3f}@{tokens:,}" for tokens, loss in r["curve"])
        print(f"{r['name']:<18}{r['step']:>7}{r['answers']:>15,}{r['answers'] / r['positions']:>14.0%}"
              f"{r['seconds']:>9.1f}{r['answer_tok_s']:>14,.0f}   {curve}")
    for base in (padded, ungrouped):
        ratio = packed["answer_tok_s"] / base["answer_tok_s"]
        print(f"packed / {base['name']} answer tokens per second: {ratio:.2f}x; "
              f"final val loss {packed['curve'][-1][1]:.3f} packed vs {base['curve'][-1][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
