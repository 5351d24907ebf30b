"""pretrain.py as users run it: plain `python pretrain.py` (no torchrun), resuming after `kill -9`, and the
loss falling on the bundled sample corpus.

    python -m pytest -q tests/test_pretrain.py
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import checkpoint
import pretrain
import trainer
from test_trainer import assert_same_weights, flags, load, make_data, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_pretrain(argv: list[str], log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "pretrain.py", *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log_path) -> str:
    assert process.wait(timeout=300) == 0, open(log_path).read()[-3000:]
    return open(log_path).read()


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = make_data(tmp_path / "data")
    # the LR schedule is fixed by warmup_iters / lr_decay_iters, so runs of any length share it
    common = dict(save_interval=3, eval_interval=1000, lr_decay_iters=40)
    victim = python_pretrain(flags(data, tmp_path / "killed", max_iters=10_000, **common), tmp_path / "victim.log")
    deadline = time.time() + 240
    while not os.path.exists(tmp_path / "killed" / "ckpt_0000003.pt"):
        assert victim.poll() is None and time.time() < deadline, open(tmp_path / "victim.log").read()[-3000:]
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    _, path = checkpoint.find_checkpoint(str(tmp_path / "killed"), report=False)
    target = load(path)["step"] + 4
    resumed = python_pretrain(flags(data, tmp_path / "killed", max_iters=target, **common) + ["--resume"],
                              tmp_path / "resumed.log")
    fresh = python_pretrain(flags(data, tmp_path / "fresh", max_iters=target, **common), tmp_path / "fresh.log")
    assert "resuming" in finish(resumed, tmp_path / "resumed.log")
    out = finish(fresh, tmp_path / "fresh.log")   # plain python, no torchrun: the whole run
    assert f"done: {target} steps" in out and "single process" in out
    assert {"ckpt.pt", "best.pt", "metrics.jsonl", "loss.png"} <= set(os.listdir(tmp_path / "fresh"))
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "fresh")
    assert_same_weights(load(tmp_path / "killed" / "ckpt.pt")["model"], load(tmp_path / "fresh" / "ckpt.pt")["model"])


def test_loss_falls_on_the_bundled_sample(tmp_path, tokenizer_dir):
    made = subprocess.run([sys.executable, "data_process.py", "--out", str(tmp_path / "sample.bin")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    out = tmp_path / "run"
    pretrain.main([f"--data={tmp_path / 'sample.bin'}", f"--out_dir={out}", "--preset=tiny", "--seq_len=64",
                   "--micro_batch_size=4", "--grad_accum_steps=1", "--max_iters=25", "--lr=1e-2", "--min_lr=1e-3",
                   "--warmup_iters=3", "--eval_interval=1000", "--eval_iters=4", "--log_interval=1"])
    val = [r["val_loss"] for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "val_loss" in r]
    assert val[0] > 10.5                 # ln(64794) = 11.08: the untrained model knows nothing
    assert val[-1] < val[0] - 2.0        # 25 steps on the sample: far below the start
    losses = list(train_losses(out).values())
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5


def test_validation_file_inside_the_training_glob_is_refused(tmp_path, capsys):
    """--data="data/*.bin" also matches data/pretrain_val.bin: training on it would make the val loss untrue."""
    data = make_data(tmp_path / "data")
    glob_all = os.path.join(os.path.dirname(data), "*.bin")
    assert pretrain.cli(flags(glob_all, tmp_path / "leak")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "pretrain_val.bin is validation data" in err
    assert pretrain.cli(flags(data, tmp_path / "same", val_data=data)) == 1
    assert "pretrain_data.bin is validation data" in capsys.readouterr().err
    assert pretrain.cli(flags(glob_all, tmp_path / "ok", val_data="none", max_iters=1)) == 0
