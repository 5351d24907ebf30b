"""The run plan (run_plan.py) kept across a crash and a resume on another number of ranks, and across an
extension of a finished run: the same total tokens, the same LR at the same tokens, every window of the epoch
seen exactly once, and no silent LR jump.

    python -m pytest -q tests/test_run_plan.py
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest

import pretrain
import sft
import trainer
from conftest import torchrun
from dataset import PretrainDataset
from dataset_sft import SFTDataset
from run_plan import get_lr, resolve_plan
from test_dataset import write_bin
from test_sft import flags as sft_flags
from test_sft import init_weights, load as load_ckpt, sample_csv, small_tokenizer  # noqa: F401 (fixtures)
from test_trainer import flags
from train_config import TrainConfig

WINDOWS, SEQ = 40, 16          # one epoch = 40 windows = 10 steps of 2 x 2 windows
STOP = 4                       # the step after whose checkpoint a run is killed
EPOCH_FLAGS = dict(max_iters=0, epochs=1, warmup_iters=-1, lr_decay_iters=0, eval_interval=100, eval_iters=1,
                   save_interval=STOP, keep_last=5)

# torchrun target: records each rank's training windows, and with STOP_AT_STEP dies right after that checkpoint
PROBE = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import dataset, pretrain, trainer

log = os.path.join(os.path.dirname(__file__), f"windows_rank{os.environ['RANK']}.jsonl")
real_collate = dataset.PretrainDataset._collate
def collate(self, indices):
    if self.paths[0].endswith("pretrain_data.bin"):
        with open(log, "a") as f:
            print(json.dumps(indices), file=f)
    return real_collate(self, indices)
dataset.PretrainDataset._collate = collate

stop = int(os.environ.get("STOP_AT_STEP", 0))
real_save = trainer.save_checkpoint
def save_checkpoint(run):
    real_save(run)
    if run.step == stop:
        os._exit(0)   # killed: nothing after this checkpoint happens
trainer.save_checkpoint = save_checkpoint
sys.exit(trainer.run_cli(pretrain.main, sys.argv[1:]))
"""


REAL_SAVE = trainer.save_checkpoint


class Killed(Exception):
    pass


def make_epoch_data(folder) -> str:
    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)
    write_bin(os.path.join(folder, "pretrain_val.bin"), rng.integers(3, 512, 200))
    return write_bin(os.path.join(folder, "pretrain_data.bin"), rng.integers(3, 512, WINDOWS * SEQ + 1))


def record_windows(monkeypatch, seen: list) -> None:
    """In-process runs: collect the training windows read."""
    real = PretrainDataset._collate

    def collate(self, indices):
        if self.paths[0].endswith("pretrain_data.bin"):
            seen.extend(indices)
        return real(self, indices)
    monkeypatch.setattr(PretrainDataset, "_collate", collate)


def kill_after(monkeypatch, step: int) -> None:
    real = trainer.save_checkpoint

    def save_checkpoint(run):
        real(run)
        if run.step == step:
            raise Killed
    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)


def probe_windows(folder) -> list[int]:
    return [i for path in glob.glob(str(folder / "windows_rank*.jsonl"))
            for line in open(path).read().splitlines() for i in json.loads(line)]


def lr_by_tokens(out) -> dict[int, float]:
    return {r["tokens"]: r["lr"] for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "lr" in r}


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory):
    """One uninterrupted process: 1 epoch of micro batch 2 x 2 accumulation steps (64 tokens a step)."""
    folder = tmp_path_factory.mktemp("plan")
    data = make_epoch_data(folder / "data")
    out = folder / "uninterrupted"
    summary = pretrain.main(flags(data, out, grad_accum_steps=2, **EPOCH_FLAGS))
    return data, out, summary


def assert_kept_the_plan(out, windows: list[int], summary: dict, epoch_run) -> None:
    _, ref_out, ref = epoch_run
    assert (summary["step"], summary["tokens_seen"]) == (ref["step"], ref["tokens_seen"]) == (10, WINDOWS * SEQ)
    assert Counter(windows) == Counter(range(WINDOWS))                       # every window once, none twice
    assert lr_by_tokens(out) == pytest.approx(lr_by_tokens(ref_out), rel=1e-12)   # the same LR at the same tokens


def test_two_ranks_killed_then_resumed_on_one_keep_the_plan(epoch_run, tmp_path, monkeypatch, capsys):
    """Before plans, the 1-rank resume recomputed the run from its own smaller batch and replayed or skipped data."""
    data, _, _ = epoch_run
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "out"
    monkeypatch.setenv("STOP_AT_STEP", str(STOP))
    torchrun(str(probe), flags(data, out, grad_accum_steps=1, **EPOCH_FLAGS))   # 2 ranks x 2 x 1 = 64 tokens
    assert trainer.read_metrics(str(out / "metrics.jsonl"))[-1]["step"] == STOP
    windows = probe_windows(tmp_path)
    record_windows(monkeypatch, windows)
    capsys.readouterr()
    summary = pretrain.main(["--resume", f"--out_dir={out}"])
    printed = capsys.readouterr().out
    assert "batch: 2 seqs x 16 tokens x 2 accum x 1 ranks = 64 tokens/step" in printed   # accumulation doubled
    assert f"at step {STOP} (the checkpoint's last) -> " in printed and f"at step {STOP + 1} (the next)" in printed
    assert_kept_the_plan(out, windows, summary, epoch_run)


def test_one_rank_killed_then_resumed_on_two_keeps_the_plan(epoch_run, tmp_path, monkeypatch):
    data, _, _ = epoch_run
    out = tmp_path / "out"
    windows: list[int] = []
    record_windows(monkeypatch, windows)
    kill_after(monkeypatch, STOP)
    with pytest.raises(Killed):
        pretrain.main(flags(data, out, grad_accum_steps=2, **EPOCH_FLAGS))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = torchrun(str(probe), ["--resume", f"--out_dir={out}"])
    assert "2 seqs x 16 tokens x 1 accum x 2 ranks = 64 tokens/step" in done.stdout
    windows += probe_windows(tmp_path)
    final = trainer.read_metrics(str(out / "metrics.jsonl"))[-1]
    assert_kept_the_plan(out, windows, {"step": final["step"], "tokens_seen": final["tokens"]}, epoch_run)


def test_a_step_size_that_cannot_be_kept_is_said_and_the_lr_follows_tokens():
    cfg = TrainConfig(preset="tiny", micro_batch_size=2, grad_accum_steps=1, max_iters=10, warmup_iters=2,
                      lr_decay_iters=10)
    plan, _ = resolve_plan(cfg, 1, SEQ, 100)                                  # 32 tokens a step
    resumed, notes = resolve_plan(cfg, 2, SEQ, 100, plan.saved(), asdict(cfg), step=4, progress_tokens=4 * 32)
    assert len(notes) == 1 and "steps of 64 tokens instead of the plan's 32" in notes[0]
    assert (resumed.step_tokens, resumed.end_step) == (64, 4 + 3)             # the 6 steps left, in 3 of 64
    for done in range(4, 10, 2):
        assert resumed.lr_at(done * 32) == get_lr(done, cfg.lr, cfg.min_lr, 2, 10)


def test_extending_a_finished_run_keeps_its_final_lr_unless_the_schedule_is_changed(tmp_path, capsys):
    """Before plans, --max_iters=12 re-stretched the cosine over 12 steps: the LR jumped up at step 9."""
    data = make_epoch_data(tmp_path / "data")
    out = tmp_path / "out"
    base = dict(warmup_iters=-1, lr_decay_iters=0, eval_interval=100)
    pretrain.main(flags(data, out, max_iters=8, **base))
    with pytest.raises(trainer.TrainError, match="already finished at step 8"):
        pretrain.main(["--resume", f"--out_dir={out}"])
    capsys.readouterr()
    pretrain.main(["--resume", f"--out_dir={out}", "--max_iters=12"])
    printed = capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "lr" in r}
    min_lr = 3e-4
    assert lrs[8] > min_lr and [lrs[s] for s in range(9, 13)] == pytest.approx([min_lr] * 4)   # no jump
    assert "run length: 8 -> 12 steps" in printed and "the LR continues the saved schedule" in printed
    assert f"lr: {lrs[8]:.3e} at step 8 (the checkpoint's last) -> {min_lr:.3e} at step 9 (the next)" in printed
    pretrain.main(["--resume", f"--out_dir={out}", "--max_iters=16", "--lr_decay_iters=16"])   # decay again, asked
    printed = capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "lr" in r}
    assert lrs[13] == pytest.approx(get_lr(12, 3e-3, min_lr, 0, 16)) and lrs[13] > 2 * min_lr
    assert "the schedule changes with --lr_decay_iters" in printed
    assert f"-> {lrs[13]:.3e} at step 13 (the next)" in printed


def test_keep_last_after_a_fallback_never_prunes_the_checkpoint_just_written(tmp_path, monkeypatch, capsys):
    """ckpt_8 is corrupt, so the resume falls back to ckpt_4; with keep_last=1 the step-6 checkpoint used to be
    pruned as older than the corrupt ckpt_8, leaving nothing to resume from after a crash."""
    data = make_epoch_data(tmp_path / "data")
    out = tmp_path / "out"
    pretrain.main(flags(data, out, max_iters=8, eval_interval=100))   # ckpt_4 and ckpt_8 (save_interval 4)
    os.remove(out / "ckpt.pt")                                        # a crash while writing step 8
    with open(out / "ckpt_0000008.pt", "r+b") as f:
        f.truncate(1000)
    kill_after(monkeypatch, 6)
    with pytest.raises(Killed):
        pretrain.main(["--resume", f"--out_dir={out}", "--keep_last=1", "--save_interval=2"])
    assert "resuming from the previous checkpoint" in capsys.readouterr().err
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == ["ckpt_0000006.pt", "ckpt_0000008.pt"]
    monkeypatch.undo()
    assert pretrain.main(["--resume", f"--out_dir={out}"])["step"] == 8   # continues from step 6


def test_sft_resumed_with_another_micro_batch_keeps_the_plan_and_reads_every_sample_once(
        sample_csv, small_tokenizer, init_weights, tmp_path, monkeypatch):
    """SFT killed after 4 steps of micro batch 2 x 2 accumulation, resumed with micro batch 4 (what another
    world size or a memory limit asks): accumulation 1 keeps 4 samples a step, the epoch's samples are each read
    once, and the LR is the plan's at every step. Before, the order was re-cut by the new batch and the
    position mapped by fraction (samples replayed or skipped)."""
    seen: list[int] = []
    real_next = SFTDataset.next_batch

    def next_batch(self):
        epoch, offset = self.epoch, self._offset
        batch = real_next(self)
        taken = self._epoch_stream(epoch)[offset:offset + self.world_size * self.micro_batch_size]
        seen.extend(int(k) for k in self.samples.keys[taken])
        return batch
    monkeypatch.setattr(SFTDataset, "next_batch", next_batch)
    out = tmp_path / "sft"
    run = dict(init_from=init_weights, max_iters=0, epochs=1, warmup_iters=2, lr_decay_iters=0, eval_interval=100,
               save_interval=4)
    kill_after(monkeypatch, STOP)
    with pytest.raises(Killed):
        sft.main(sft_flags(sample_csv, small_tokenizer, out, **run))
    monkeypatch.setattr(trainer, "save_checkpoint", REAL_SAVE)   # no more kills
    summary = sft.main(["--resume", f"--out_dir={out}", "--micro_batch_size=4"])
    n = load_ckpt(out / "ckpt.pt")["data_state"]["num_samples"]
    steps = -(-n // 4)
    assert summary["step"] == steps and len(seen) == len(set(seen)) == n   # the epoch's samples, each once
    # (the epoch's last micro batch is short: nothing is repeated to fill it)
    lrs = {r["step"]: r["lr"] for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "lr" in r}
    assert lrs == pytest.approx({s: get_lr(s - 1, 1e-2, 1e-3, 2, steps) for s in range(1, steps + 1)})
