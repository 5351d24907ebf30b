"""sft.py end to end: the step loss is token-weighted, a tiny run lowers the answer loss, resume parity,
2 ranks == 1 rank with twice the micro batch, and user errors are one line.

    python -m pytest -q tests/test_sft.py

Runs sft.main in-process on the bundled sample (sft_data_process.py's default output) with the tiny preset.
To keep steps fast the runs use a ~2.2k-piece SentencePiece model trained here on the sample's text (the
real 64,794-id vocabulary makes the output layer 30x larger); dataset tests cover the real tokenizer.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import sft
import train_config
import trainer
from chatglm_tokenizer import load_tokenizer, tokenizer_identity
from conftest import torchrun
from dataset_sft import IGNORE_INDEX, SFTDataError, read_sft_csv
from model import Transformer, model_args_from_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FLAGS = dict(preset="tiny", seq_len=48, micro_batch_size=2, grad_accum_steps=2, lr=1e-2, min_lr=1e-3,
                 warmup_iters=2, lr_decay_iters=16, max_iters=16, eval_interval=8, eval_iters=4, save_interval=8,
                 log_interval=1, val_fraction=0.2, keep_last=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared machine: one intra-op thread is ~8x faster than several contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample_csv(tmp_path_factory) -> str:
    """The bundled sample, written by sft_data_process.py as a user would."""
    out = tmp_path_factory.mktemp("sft_data") / "sft.csv"
    subprocess.run([sys.executable, "sft_data_process.py", f"--out={out}"], cwd=REPO, check=True,
                   capture_output=True)
    return str(out)


@pytest.fixture(scope="module")
def small_tokenizer(sample_csv, tmp_path_factory) -> str:
    """A tokenizer folder: SentencePiece (<unk>=0 <s>=1 </s>=2, as ChatGLM2) trained on the sample's text."""
    folder = tmp_path_factory.mktemp("tokenizer")
    texts = [text for turns in read_sft_csv(sample_csv) for turn in turns for text in turn if text]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=2200, byte_fallback=True, character_coverage=0.9995,
                                   hard_vocab_limit=False, minloglevel=2)
    return str(folder)


@pytest.fixture(scope="module")
def init_weights(small_tokenizer, tmp_path_factory) -> str:
    """Random tiny weights saved as a plain state dict, the way the seed project saves its .pth files."""
    torch.manual_seed(0)
    vocab = load_tokenizer(small_tokenizer).vocab_size
    path = tmp_path_factory.mktemp("init") / "tiny.pth"
    torch.save(Transformer(model_args_from_preset("tiny", vocab_size=vocab)).state_dict(), path)
    return str(path)


def flags(sample_csv, small_tokenizer, out_dir, **overrides) -> list[str]:
    values = dict(RUN_FLAGS, data=sample_csv, tokenizer=small_tokenizer, out_dir=str(out_dir), **overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def metrics(out_dir, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in trainer.read_metrics(os.path.join(out_dir, "metrics.jsonl")) if key in r}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(sample_csv, small_tokenizer, init_weights, tmp_path_factory):
    """16 uninterrupted steps from the init weights (checkpoints at 8 and 16)."""
    out = tmp_path_factory.mktemp("reference")
    summary = sft.main(flags(sample_csv, small_tokenizer, out, init_from=init_weights))
    return out, summary


# ------------------------------------------------------------------------------------------- runs
def test_tiny_run_lowers_the_answer_loss(reference):
    out, summary = reference
    val, train = metrics(out, "val_loss"), metrics(out, "loss")
    assert sorted(val) == [0, 8, 16] and sorted(train) == list(range(1, 17))
    # from ln(vocab) = 7.7 at the random init; measured: val 7.71 -> 7.13, train (4-step means) 7.59 -> 7.15
    assert val[16] < val[0] - 0.3 and summary["val_loss"] == val[16]    # held-out answers got likelier
    assert sum(train[s] for s in range(13, 17)) / 4 < sum(train[s] for s in range(1, 5)) / 4 - 0.3
    ckpt = load(out / "ckpt.pt")
    assert ckpt["config"]["out_dir"] == str(out) and ckpt["config"]["val_fraction"] == 0.2
    assert ckpt["model_args"]["max_seq_len"] == 48 and ckpt["data_state"]["kind"] == "sft"
    assert ckpt["tokenizer"] == tokenizer_identity(ckpt["config"]["tokenizer"])
    assert os.path.isfile(out / "best.pt") and os.path.isfile(out / "loss.png")


def test_resume_equals_uninterrupted(sample_csv, small_tokenizer, init_weights, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "halves"
    sft.main(flags(sample_csv, small_tokenizer, out, init_from=init_weights, max_iters=8))
    sft.main(flags(sample_csv, small_tokenizer, out) + ["--resume"])
    assert metrics(out, "loss") == metrics(ref_out, "loss")             # every step, bit for bit
    assert metrics(out, "val_loss") == metrics(ref_out, "val_loss")
    a, b = load(out / "ckpt.pt"), load(ref_out / "ckpt.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for name, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][name]["exp_avg"]), name
    assert a["data_state"] == b["data_state"] and a["data_state"]["offset"] + a["data_state"]["epoch"] > 0


def test_bare_resume_continues_with_the_settings_the_run_was_started_with(reference, tmp_path, capsys):
    """`python sft.py --resume` (as the docstring shows) keeps the run's data, tokenizer, split and batch, not
    sft.DEFAULTS; the --init_from it started from is not carried over (it excludes --resume)."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    started = load(out / "ckpt.pt")["config"]
    capsys.readouterr()
    sft.main(["--resume", f"--out_dir={out}", "--max_iters=17"])
    ckpt = load(out / "ckpt.pt")
    assert ckpt["step"] == 17
    assert ckpt["config"] == dict(started, out_dir=str(out), max_iters=17, resume=True, init_from="")
    resuming = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming "))
    assert resuming.endswith(f"; out_dir: {reference[0]} -> {out}; max_iters: 16 -> 17"), resuming


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(sample_csv, small_tokenizer, init_weights,
                                                             tmp_path):
    """torchrun, 2 processes on gloo, micro batch 2 == 1 process, micro batch 4: the same samples per step
    and the same token-weighted loss, although each rank holds a different number of answer tokens."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(init_from=init_weights, max_iters=3, eval_interval=3, save_interval=3)
    sft.main(flags(sample_csv, small_tokenizer, one, micro_batch_size=4, **common))
    torchrun("sft.py", flags(sample_csv, small_tokenizer, two, micro_batch_size=2, **common))
    losses_one, losses_two = metrics(one, "loss"), metrics(two, "loss")
    assert losses_one.keys() == losses_two.keys() == {1, 2, 3}
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5)
    assert metrics(two, "val_loss")[3] == pytest.approx(metrics(one, "val_loss")[3], rel=1e-5)
    a, b = load(one / "ckpt.pt")["model"], load(two / "ckpt.pt")["model"]
    # AdamW divides each gradient by its own RMS, so where a gradient is near 0 the float noise of another
    # summation order (2 ranks) grows to a small share of one lr-sized (1e-2) update: up to 2e-5 measured
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_validation_comes_from_a_split_a_separate_file_or_nowhere(sample_csv, small_tokenizer, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer)
    rows = len(read_sft_csv(sample_csv))

    def datasets(**overrides):
        cfg = train_config.parse_config(flags(sample_csv, small_tokenizer, tmp_path, **overrides), sft.DEFAULTS)
        return sft.build_datasets(cfg, tokenizer, 48, 0, 1)
    train_ds, val_ds = datasets()
    assert len(train_ds.samples) + len(val_ds.samples) == rows and len(val_ds.samples) >= rows // 10
    train_ds, val_ds = datasets(val_data="none")
    assert len(train_ds.samples) == rows and val_ds is None
    train_ds, val_ds = datasets(val_data=sample_csv)
    assert len(train_ds.samples) == rows and len(val_ds.samples) == rows
    assert "conversations" in train_ds.describe() and "micro batches per epoch" in train_ds.describe()


# ----------------------------------------------------------------------------------- step loss
def test_step_loss_is_the_mean_over_answer_tokens_of_the_whole_step(sample_csv, small_tokenizer, tmp_path):
    """3 micro batches of different answer-token counts: the trainer's step loss and gradient are those
    of (sum of every answer token's loss) / (answer tokens in the step), not a mean of batch means."""
    cfg = train_config.parse_config(flags(sample_csv, small_tokenizer, tmp_path / "out", grad_accum_steps=3,
                                     grad_clip=0, bucket_batches=1, pack=False), sft.DEFAULTS)
    ctx = trainer.setup_distributed()
    identity = tokenizer_identity(small_tokenizer)
    model_args = trainer.resolve_model_args(cfg, ctx, identity)
    train_ds, _ = sft.build_datasets(cfg, load_tokenizer(small_tokenizer), model_args.max_seq_len, 0, 1)
    run, _ = trainer.build_run(cfg, ctx, model_args, train_ds, None, identity)
    run.optimizer = torch.optim.SGD(run.raw.parameters(), lr=1.0)   # update = -gradient, exactly

    position = train_ds.state_dict()
    batches = [train_ds.next_batch() for _ in range(3)]
    train_ds.load_state_dict(position)
    counts = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
    assert len(set(counts)) > 1, "the micro batches should hold different numbers of answer tokens"

    reference_model = copy.deepcopy(run.raw)
    sums = [F.cross_entropy(reference_model(x)[0].flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum") for x, y in batches]
    step_loss = torch.stack(sums).sum() / sum(counts)
    step_loss.backward()
    mean_of_means = sum(s.item() / c for s, c in zip(sums, counts)) / len(counts)
    before = {name: p.detach().clone() for name, p in run.raw.named_parameters()}

    result = trainer.train_step(run, lr=1.0)
    assert result.loss == pytest.approx(step_loss.item(), rel=1e-6)
    lengths = [int(n) for x, _ in batches for n in (x != train_ds.pad_id).sum(dim=1)]   # padding excluded
    assert result.positions == sum(lengths)
    assert result.flops == run.raw.training_flops(sum(lengths), sum(n * n for n in lengths))
    assert abs(mean_of_means - step_loss.item()) > 1e-4               # the two definitions differ here
    for name, param in run.raw.named_parameters():
        expected = dict(reference_model.named_parameters())[name].grad
        torch.testing.assert_close(before[name] - param.detach(), expected, rtol=1e-4, atol=1e-7)


def test_padded_token_budget_is_an_upper_bound_and_flops_count_real_lengths(sample_csv, small_tokenizer, tmp_path):
    """SFT batches pad to their longest sample, shorter than seq_len: micro_batch_size x seq_len x accum is
    the most a step can train on, not what it trains on; MFU counts each sample's attention at its length."""
    cfg = train_config.parse_config(flags(sample_csv, small_tokenizer, tmp_path / "out", seq_len=512, pack=False),
                                    sft.DEFAULTS)
    ctx = trainer.setup_distributed()
    identity = tokenizer_identity(small_tokenizer)
    model_args = trainer.resolve_model_args(cfg, ctx, identity)
    train_ds, _ = sft.build_datasets(cfg, load_tokenizer(small_tokenizer), model_args.max_seq_len, 0, 1)
    run, _ = trainer.build_run(cfg, ctx, model_args, train_ds, None, identity)
    position = train_ds.state_dict()
    lengths = torch.cat([trainer._sample_lengths(train_ds.next_batch()[0], train_ds) for _ in range(2)])
    train_ds.load_state_dict(position)
    assert lengths.sum() < 2 * 2 * 512   # one step's real positions fall short of the block
    summary = trainer.describe_run(run)
    assert "ranks = at most 2,048 tokens/step" in summary and "16 steps = at most 32,768 tokens" in summary
    # and MFU's FLOPs: each sample's attention at its own length, not at seq_len
    result = trainer.train_step(run, lr=1e-3)
    assert result.positions == lengths.sum()
    assert result.flops == run.raw.training_flops(int(lengths.sum()), int(lengths.square().sum()))
    assert result.flops < result.positions * run.flops_per_token


# ---------------------------------------------------------------------------------------- errors
def test_user_errors_are_one_line(sample_csv, small_tokenizer, init_weights, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,answer,history,source\n"q\nq",a,[],s\np,a,"[[""x""",s\n', encoding="utf-8")
    cases = [(flags(sample_csv, small_tokenizer, tmp_path / "a"), "sft.py fine-tunes pretrained weights"),
             (flags(str(bad), small_tokenizer, tmp_path / "b", init_from=init_weights),
              f"{bad}:4: field history: not valid JSON"),
             (flags(sample_csv, small_tokenizer, tmp_path / "c", init_from=init_weights, val_fraction=1.5),
              "--val_fraction=1.5"),
             (flags(str(tmp_path / "absent.csv"), small_tokenizer, tmp_path / "d", init_from=init_weights),
              "no such file")]
    for argv, message in cases:
        capsys.readouterr()
        assert trainer.run_cli(sft.main, argv, errors=(SFTDataError,)) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
