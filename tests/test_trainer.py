"""trainer.py in one process: config parsing, LR schedule, checkpoints, resume parity, fallback, init_from,
non-finite steps, user errors. Runs pretrain.main in-process on synthetic data (tiny preset, 512-id vocab).

    python -m pytest -q tests/test_trainer.py
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import precision
import pretrain
import train_config
import trainer
from model import Transformer, load_model
from test_dataset import SYNTH_TOKENIZER, write_bin
from train_config import ConfigError, TrainConfig, parse_config
from run_plan import get_lr

SINGLE = trainer.DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))   # one process
BASE_FLAGS = dict(preset="tiny", seq_len=16, micro_batch_size=2, grad_accum_steps=2, lr=3e-3, min_lr=3e-4,
                  warmup_iters=2, lr_decay_iters=8, eval_interval=4, eval_iters=2, save_interval=4,
                  log_interval=1, keep_last=2, max_iters=8)


def make_data(folder) -> str:
    """folder/pretrain_data.bin (+ pretrain_val.bin beside it): random ids of a fake 512-id tokenizer."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    write_bin(os.path.join(folder, "pretrain_val.bin"), rng.integers(3, 512, 400))
    return write_bin(os.path.join(folder, "pretrain_data.bin"), rng.integers(3, 512, 3000))


@pytest.fixture
def data(tmp_path) -> str:
    """A fresh copy of the synthetic data for tests that change it."""
    return make_data(tmp_path / "data")


def flags(data: str, out_dir, **overrides) -> list[str]:
    values = dict(BASE_FLAGS, data=data, out_dir=str(out_dir), **overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def train_losses(out_dir) -> dict[int, float]:
    rows = trainer.read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------- config
def test_parse_config_types_bools_and_flag_forms():
    cfg = parse_config(["--lr=1e-3", "--max_iters", "2e3", "--resume", "--fsdp=false", "--compile", "--preset=tiny",
                        "--micro-batch-size=4"], TrainConfig())
    assert (cfg.lr, cfg.max_iters, cfg.resume, cfg.fsdp, cfg.compile, cfg.micro_batch_size) == \
        (1e-3, 2000, True, False, "true", 4)
    assert parse_config([], TrainConfig(lr=5e-5)).lr == 5e-5   # a stage's defaults stay unless overridden


@pytest.mark.parametrize("argv,flag", [(["--max_iters=abc"], "--max_iters"), (["--lr=fast"], "--lr"),
                                       (["--bogus=1"], "--bogus"), (["--dtype=fp8"], "--dtype"),
                                       (["--resume=maybe"], "--resume"), (["--keep_last=0"], "--keep_last"),
                                       (["--min_lr=1", "--lr=0.1"], "--min_lr"), (["--preset=huge"], "--preset"),
                                       (["--resume", "--init_from=x.pt"], "--init_from")])
def test_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as err:
        parse_config(argv, TrainConfig())
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_help_lists_every_field_with_its_docstring(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], TrainConfig())
    out = capsys.readouterr().out
    docs = train_config.field_docs(TrainConfig)
    for f in trainer.fields(TrainConfig):
        assert f"--{f.name}=" in out and docs.get(f.name), f.name


def test_lr_is_warmup_then_cosine_to_min_lr():
    lrs = [get_lr(s, 1.0, 0.1, 10, 110) for s in range(130)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))       # warmup rises
    assert lrs[10] == pytest.approx(1.0)                           # peak when warmup ends
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # cosine falls
    assert lrs[60] == pytest.approx(0.55) and lrs[110:] == [0.1] * 20


def test_precision_and_mfu_on_cpu():
    cpu = torch.device("cpu")
    assert precision.choose_precision("auto", cpu).name == "fp32"
    assert precision.choose_precision("fp16", cpu).use_scaler
    assert precision.peak_flops(cpu, precision.choose_precision("bf16", cpu)) is None


PRE_AMPERE, AMPERE = ("Tesla V100-SXM2-32GB", (7, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0))


def fake_gpu(monkeypatch, gpu: tuple[str, tuple[int, int]], has_emulation_keyword: bool = True) -> torch.device:
    """Pretend cuda:0 is `gpu` (name, compute capability) to torch's bf16 queries. Every CUDA GPU of the last
    years emulates bf16, so the bare is_bf16_supported() says yes on all of them, as torch's own does."""
    name, capability = gpu
    if has_emulation_keyword:
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            return including_emulation or capability >= (8, 0)
    else:   # torch < 2.4
        def is_bf16_supported() -> bool:
            return True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("has_emulation_keyword", [True, False])
def test_auto_precision_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, has_emulation_keyword):
    """A V100 or T4 only emulates bf16 (slowly): dtype auto must pick fp16 with a GradScaler there."""
    ampere = precision.choose_precision("auto", fake_gpu(monkeypatch, AMPERE, has_emulation_keyword))
    assert (ampere.name, ampere.autocast_dtype, ampere.use_scaler) == ("bf16", torch.bfloat16, False)
    volta = precision.choose_precision("auto", fake_gpu(monkeypatch, PRE_AMPERE, has_emulation_keyword))
    assert (volta.name, volta.autocast_dtype, volta.use_scaler) == ("fp16", torch.float16, True)


def test_bf16_asked_for_on_a_gpu_without_native_bf16_is_a_config_error(monkeypatch):
    gpu = fake_gpu(monkeypatch, PRE_AMPERE)
    with pytest.raises(ConfigError) as err:
        precision.choose_precision("bf16", gpu)
    message = str(err.value)
    assert message.startswith("--dtype=bf16: Tesla V100") and "--dtype=fp16" in message and "\n" not in message
    assert precision.choose_precision("bf16", fake_gpu(monkeypatch, AMPERE)).name == "bf16"


# ------------------------------------------------------------------------------ runs and resuming
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps (checkpoints at 4 and 8) on the same data as `data`; tests only read it."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "ref"
    summary = pretrain.main(flags(make_data(folder / "data"), out))
    return out, summary


def test_checkpoint_contract_and_outputs(reference):
    out, summary = reference
    assert summary["step"] == 8 and summary["tokens_seen"] == 8 * 2 * 2 * 16
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "ckpt_0000004.pt", "ckpt_0000008.pt", "loss.png",
                                       "metrics.jsonl"]
    assert os.path.samefile(out / "ckpt.pt", out / "ckpt_0000008.pt")
    ckpt = load(out / "ckpt.pt")
    for key in ("model", "model_args", "config", "tokenizer", "optimizer", "scaler", "step", "tokens_seen",
                "data_state", "rng", "best_val_loss"):
        assert key in ckpt, key
    assert ckpt["tokenizer"] == SYNTH_TOKENIZER and ckpt["config"]["max_iters"] == 8 and ckpt["step"] == 8
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    model, meta = load_model(str(out / "ckpt.pt"))
    assert meta["kind"] == "checkpoint" and model.args.vocab_size == 512
    rows = trainer.read_metrics(str(out / "metrics.jsonl"))
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8] and val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    assert load(out / "best.pt")["val_loss"] == min(r["val_loss"] for r in val)


def test_resume_equals_uninterrupted(data, tmp_path, reference):
    ref_out, _ = reference
    out = tmp_path / "halves"
    pretrain.main(flags(data, out, max_iters=4, save_interval=2))
    pretrain.main(flags(data, out, max_iters=8, save_interval=2) + ["--resume"])
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == \
        ["ckpt.pt", "ckpt_0000006.pt", "ckpt_0000008.pt"]   # keep_last=2
    assert train_losses(out) == train_losses(ref_out)   # every step's loss, bit for bit
    a, b = load(out / "ckpt.pt"), load(ref_out / "ckpt.pt")
    assert_same_weights(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][name]["exp_avg_sq"]), name
    assert a["data_state"] == b["data_state"] and a["tokens_seen"] == b["tokens_seen"]


def resuming_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("resuming "))


def test_bare_resume_keeps_the_run_settings_and_given_flags_override_them(tmp_path, reference, capsys):
    """`pretrain.py --resume` alone continues the run with the settings it was started with (micro batch 2, lr
    3e-3, tiny at seq 16, its data), not pretrain.DEFAULTS; a flag given with --resume overrides its setting."""
    out = tmp_path / "moved"   # out_dir comes from the command line, not the checkpoint
    shutil.copytree(reference[0], out)
    newest = out / "ckpt_0000008.pt"   # what --resume picks; saved keys that are no field are ignored
    ckpt = load(newest)
    started = dict(ckpt["config"])
    ckpt["config"] |= {"init_from": "weights.pt", "overwrite": True, "field_of_another_version": 1}
    torch.save(ckpt, newest)
    capsys.readouterr()
    summary = pretrain.main(["--resume", f"--out_dir={out}", "--max_iters=10"])
    assert summary["tokens_seen"] == 10 * 2 * 2 * 16   # micro batch 2 x accum 2 x seq 16 (defaults: 16 x 2 x 16)
    saved = load(out / "ckpt.pt")["config"]
    assert saved == dict(started, out_dir=str(out), max_iters=10, resume=True)
    line = resuming_line(capsys.readouterr().out)
    assert line.endswith(f"; out_dir: {reference[0]} -> {out}; max_iters: 8 -> 10"), line
    pretrain.main(["--resume", f"--out_dir={out}", "--max_iters=11", "--lr=1e-3", "--min_lr=1e-4"])
    saved = load(out / "ckpt.pt")["config"]
    assert (saved["lr"], saved["min_lr"], saved["micro_batch_size"], saved["lr_decay_iters"]) == (1e-3, 1e-4, 2, 8)
    line = resuming_line(capsys.readouterr().out)
    assert line.endswith("max_iters: 10 -> 11; lr: 0.003 -> 0.001; min_lr: 0.0003 -> 0.0001"), line
    lrs = {r["step"]: r["lr"] for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "lr" in r}
    assert lrs[11] == pytest.approx(1e-4)   # the saved schedule (decay to min_lr at step 8), the new min_lr


def test_truncated_latest_checkpoint_falls_back_to_the_previous(data, tmp_path, reference, capsys):
    ref_out, _ = reference
    final = load(ref_out / "ckpt.pt")["model"]
    out = tmp_path / "crashed"
    shutil.copytree(ref_out, out)
    os.remove(out / "ckpt.pt")
    os.link(out / "ckpt_0000008.pt", out / "ckpt.pt")   # as the trainer leaves it (copytree copied it)
    with open(out / "ckpt.pt", "r+b") as f:   # also truncates ckpt_0000008.pt: the same file
        f.truncate(os.path.getsize(out / "ckpt.pt") // 2)
    capsys.readouterr()
    summary = pretrain.main(flags(data, out) + ["--resume"])
    err = capsys.readouterr().err
    assert "ckpt_0000008.pt is unreadable" in err and "resuming from the previous checkpoint" in err
    assert summary["step"] == 8
    assert_same_weights(load(out / "ckpt.pt")["model"], final)   # steps 5..8 redone exactly
    for name in ("ckpt_0000004.pt", "ckpt_0000008.pt"):
        with open(out / name, "r+b") as f:
            f.truncate(100)
    assert pretrain.cli(flags(data, out) + ["--resume"]) == 1
    assert "no usable checkpoint" in capsys.readouterr().err


def test_new_run_never_overwrites_an_old_one_unless_asked(data, tmp_path, reference, capsys):
    out, _ = reference
    assert pretrain.cli(flags(data, out)) == 1
    assert "already holds a run" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert pretrain.cli(flags(data, copy, max_iters=2, save_interval=1) + ["--overwrite"]) == 0
    assert sorted(n for n in os.listdir(copy) if n.endswith(".pt")) == \
        ["best.pt", "ckpt.pt", "ckpt_0000001.pt", "ckpt_0000002.pt"]
    assert max(train_losses(copy)) == 2   # the old run's rows are gone


def test_overwrite_never_deletes_the_init_from_weights(data, tmp_path, reference, capsys):
    """`--init_from=OUT/ckpt.pt --overwrite` in the same out_dir (a fresh optimizer, same folder) must not delete
    the very weights it was asked to start from."""
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    for weights in ("ckpt.pt", "ckpt_0000004.pt", "best.pt"):
        assert pretrain.cli(flags(data, out, init_from=out / weights) + ["--overwrite"]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and "--overwrite would delete" in err, err
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference[0]))
    assert_same_weights(load(out / "ckpt.pt")["model"], load(reference[0] / "ckpt.pt")["model"])


def test_resume_with_data_of_another_tokenizer_is_refused(data, reference, capsys):
    out, _ = reference
    write_bin(data, np.arange(3000) % 512, tokenizer=dict(SYNTH_TOKENIZER, sha256="cd" * 32, path="retrained"))
    os.remove(os.path.join(os.path.dirname(data), "pretrain_val.bin"))
    assert pretrain.cli(flags(data, out) + ["--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: tokenizer mismatch") and "synthetic" in err and "retrained" in err


def test_init_from_checkpoint_and_seed_state_dict(data, tmp_path, reference):
    ref_out, _ = reference
    ref_val = [r for r in trainer.read_metrics(str(ref_out / "metrics.jsonl")) if "val_loss" in r][-1]["val_loss"]
    seed_pth = tmp_path / "seed.pth"   # the seed project saved a compiled model's raw state dict
    torch.save({"_orig_mod." + k: v for k, v in load(ref_out / "ckpt.pt")["model"].items()}, seed_pth)
    for source in (ref_out / "ckpt.pt", seed_pth):
        out = tmp_path / f"init_{source.stem}"
        pretrain.main(flags(data, out, init_from=source, max_iters=1))
        start = [r for r in trainer.read_metrics(str(out / "metrics.jsonl")) if "val_loss" in r][0]
        assert start["step"] == 0 and start["val_loss"] == pytest.approx(ref_val, rel=1e-6)
        assert load(out / "ckpt.pt")["step"] == 1   # a new run: counters start at zero
    cfg = TrainConfig(init_from=str(ref_out / "ckpt.pt"))
    assert trainer.recorded_tokenizer(cfg, SINGLE) == SYNTH_TOKENIZER
    assert trainer.recorded_tokenizer(TrainConfig(init_from=str(seed_pth), preset="tiny"), SINGLE) is None
    assert trainer.recorded_tokenizer(TrainConfig(resume=True, out_dir=str(ref_out)), SINGLE) == SYNTH_TOKENIZER


def test_init_from_seed_weights_one_row_short(tmp_path, reference):
    """The seed's .pth files have 64,793 rows for ChatGLM2's 64,794 ids (no row for the GLM special 'eop', which
    text never contains): such weights train on data of the full tokenizer; a size that misses text ids does not."""
    ref_out, _ = reference
    os.makedirs(tmp_path / "d")
    data = write_bin(str(tmp_path / "d" / "pretrain_data.bin"), np.arange(3000) % 500 + 3)   # text ids < 507
    state = load(ref_out / "ckpt.pt")["model"]
    for rows, works in ((511, True), (506, False)):
        seed = {k: v[:rows] if k in ("tok_embeddings.weight", "output.weight") else v for k, v in state.items()}
        torch.save(seed, tmp_path / f"seed{rows}.pth")
        argv = flags(data, tmp_path / f"out{rows}", init_from=tmp_path / f"seed{rows}.pth", max_iters=1)
        assert (pretrain.cli(argv) == 0) == works
    assert load(tmp_path / "out511" / "ckpt.pt")["model"]["tok_embeddings.weight"].shape[0] == 511


def test_init_from_weights_of_another_tokenizer_is_refused(data, tmp_path, reference, capsys):
    ref_out, _ = reference
    os.remove(os.path.join(os.path.dirname(data), "pretrain_val.bin"))
    write_bin(data, np.arange(3000) % 600, tokenizer=dict(SYNTH_TOKENIZER, sha256="ef" * 32, vocab_size=600))
    assert pretrain.cli(flags(data, tmp_path / "x", init_from=ref_out / "ckpt.pt")) == 1
    assert "512-token vocabulary" in capsys.readouterr().err
    write_bin(data, np.arange(3000) % 512, tokenizer=dict(SYNTH_TOKENIZER, sha256="ef" * 32, path="other"))
    assert pretrain.cli(flags(data, tmp_path / "y", init_from=ref_out / "ckpt.pt")) == 1
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and "synthetic" in err and "other" in err


class FlakyTransformer(Transformer):
    """Returns a NaN loss on the training forward calls listed in `bad_calls` (1-based)."""
    bad_calls: set = set()
    calls = 0

    def forward(self, tokens, targets=None, reduction="mean"):
        logits, loss = super().forward(tokens, targets, reduction)
        if self.training:
            type(self).calls += 1
            if type(self).calls in type(self).bad_calls:
                loss = loss * float("nan")
        return logits, loss


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "Transformer", FlakyTransformer)
    monkeypatch.setattr(FlakyTransformer, "calls", 0)
    monkeypatch.setattr(FlakyTransformer, "bad_calls", {3})   # step 2's first micro batch
    summary = pretrain.main(flags(data, tmp_path / "flaky", max_iters=4, eval_interval=100))
    assert summary["skipped_steps"] == 1 and summary["step"] == 4
    rows = {r["step"]: r for r in trainer.read_metrics(str(tmp_path / "flaky" / "metrics.jsonl")) if "loss" in r}
    assert rows[2]["loss"] is None and rows[2]["skipped_steps"] == 1 and math.isfinite(rows[3]["loss"])
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "flaky" / "ckpt.pt")["model"].values())
    monkeypatch.setattr(FlakyTransformer, "calls", 0)
    monkeypatch.setattr(FlakyTransformer, "bad_calls", set(range(1, 100)))
    assert pretrain.cli(flags(data, tmp_path / "nan", max_bad_steps=3)) == 1
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err


def test_out_of_gpu_memory_suggests_a_smaller_micro_batch(data, tmp_path, monkeypatch, capsys):
    def out_of_memory(run, lr):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(trainer, "train_step", out_of_memory)
    assert pretrain.cli(flags(data, tmp_path / "oom")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "out of GPU memory at micro_batch_size=2" in err and "--micro_batch_size=1 --grad_accum_steps=4" in err


def test_user_errors_are_one_line(data, tmp_path, capsys):
    cases = [(["--data=" + str(tmp_path / "nope.bin")], "run python data_process.py first"),
             (["--max_iters=ten"], "--max_iters=ten: expected int"),
             (flags(data, tmp_path / "f" / "x", batch_tokens=100), "--batch_tokens=100 is not a multiple"),
             (flags(data, tmp_path / "empty") + ["--resume"], "holds no checkpoint")]
    (tmp_path / "f").write_text("a file where a folder should be")
    cases.append((flags(data, tmp_path / "f" / "out"), "is not writable"))
    if importlib.util.find_spec("tensorboard") is None:
        cases.append((flags(data, tmp_path / "tb") + ["--tensorboard"], "needs the tensorboard package"))
    for argv, expected in cases:
        assert pretrain.cli(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and expected in err[-1], (argv, err)


def test_tokens_per_second_counts_real_tokens_not_padding():
    """SFT batches are padded to their longest sample; throughput and tokens_seen count only real tokens."""
    class Padded:
        pad_id = 0
    x = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    assert trainer._sample_lengths(x, Padded()).tolist() == [4, 2]
    assert trainer._sample_lengths(x, object()).tolist() == [4, 4]   # pretraining windows are never padded


def test_steps_without_targets_are_skipped_but_never_stop_the_run():
    """A step whose batches hold no target token (possible in SFT) is skipped and counted, but it is not a
    numerical failure: only non-finite steps count towards --max_bad_steps."""
    run = types.SimpleNamespace(bad_in_a_row=0, skipped_steps=0, step=5, cfg=TrainConfig(max_bad_steps=2))
    for _ in range(5):
        trainer._after_step(run, trainer.StepResult(math.nan, math.nan, 0, skipped=True, no_targets=True))
    assert (run.skipped_steps, run.bad_in_a_row) == (5, 0)
    trainer._after_step(run, trainer.StepResult(math.nan, math.nan, 8, skipped=True))
    with pytest.raises(trainer.TrainError, match="non-finite"):
        trainer._after_step(run, trainer.StepResult(math.nan, math.nan, 8, skipped=True))


def test_resume_of_a_finished_run_says_so(data, tmp_path, reference, capsys):
    ref_out, _ = reference
    out = tmp_path / "done"
    shutil.copytree(ref_out, out)
    assert pretrain.cli(flags(data, out) + ["--resume"]) == 1          # max_iters=8: nothing left to do
    assert "already finished at step 8" in capsys.readouterr().err
    assert pretrain.cli(flags(data, out, max_iters=9) + ["--resume"]) == 0
    assert load(out / "ckpt.pt")["step"] == 9


def fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)   # found by importlib.util.find_spec
    module.__dict__.update(attrs)
    return module


def test_tensorboard_and_wandb_get_every_logged_number(data, tmp_path, monkeypatch):
    """Neither package is installed here: stand-ins record what the trainer hands them."""
    calls: list[tuple] = []

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("tb_dir", log_dir))

        def add_scalar(self, key, value, step):
            calls.append(("tb", key, value, step))

        def close(self):
            calls.append(("tb_close",))

    class WandbRun:
        def log(self, numbers, step):
            calls.append(("wandb", dict(numbers), step))

        def finish(self):
            calls.append(("wandb_finish",))

    def init(project, name, config):
        calls.append(("wandb_init", project, name, config["max_iters"]))
        return WandbRun()
    monkeypatch.setitem(sys.modules, "tensorboard", fake_module("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        fake_module("torch.utils.tensorboard", SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    out = tmp_path / "out"
    pretrain.main(flags(data, out, max_iters=4) + ["--tensorboard", "--wandb_project=mcg", "--wandb_run_name=r1"])
    rows = trainer.read_metrics(str(out / "metrics.jsonl"))
    assert calls[0] == ("tb_dir", str(out / "tensorboard")) and calls[1] == ("wandb_init", "mcg", "r1", 4)
    assert calls[-2:] == [("tb_close",), ("wandb_finish",)]
    scalars = {(key, step): value for _, key, value, step in (c for c in calls if c[0] == "tb")}
    logged = [(c[1], c[2]) for c in calls if c[0] == "wandb"]
    assert len(logged) == len(rows) and [step for _, step in logged] == [r["step"] for r in rows]
    for row, (numbers, _) in zip(rows, logged):
        expected = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        assert numbers == expected and all(scalars[(k, row["step"])] == v for k, v in expected.items())
    assert {"loss", "lr", "tokens_per_s", "val_loss"} <= {key for key, _ in scalars}
