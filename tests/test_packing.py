"""Packed SFT batches: a packed row computes each of its samples exactly as alone (logits, losses, gradients),
attention never crosses a sample boundary, rotary positions restart, the rows cover each epoch once across
ranks, a saved position resumes exactly, and the trainer counts each packed sample's own length.

    python -m pytest -q tests/test_packing.py
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainer
from dataset_sft import IGNORE_INDEX, build_sft_datasets, pack_rows
from model import Transformer, model_args_from_preset, segment_positions_and_mask
from test_dataset_sft import LetterTokenizer, numbered_rows, write_csv
from test_sft import init_weights, one_thread, sample_csv, small_tokenizer  # noqa: F401 (fixtures)

SEQ = 32


def build(tmp_path, n=40, world_size=1, rank=0, micro_batch_size=2, pack=True, **kw):
    path = tmp_path / "pack.csv"
    if not path.exists():
        write_csv(path, numbered_rows(n))
    train, _, _ = build_sft_datasets(str(path), LetterTokenizer(), SEQ, micro_batch_size, rank=rank,
                                     world_size=world_size, seed=7, progress=False, val_fraction=0.0, pack=pack, **kw)
    return train


def packed_samples(ds, x: torch.Tensor, segments: torch.Tensor) -> list[int]:
    """Which samples a packed batch holds (in row order), recovered from each segment's tokens."""
    lookup = {tuple(ds.samples.xy(i)[0].tolist()): i for i in range(len(ds.samples))}
    found = []
    for row, seg in zip(x, segments):
        for k in range(int(seg.max()) + 1):
            found.append(lookup[tuple(row[seg == k].tolist())])
    return found


def spread_model(seed: int = 0) -> Transformer:
    """tiny with a 36-id vocabulary and larger random weights, so a leak across samples would show."""
    torch.manual_seed(seed)
    model = Transformer(model_args_from_preset("tiny", vocab_size=36, max_seq_len=SEQ))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model


def test_positions_restart_and_the_mask_is_block_diagonal_causal():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    positions, mask = segment_positions_and_mask(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for start, end in ((0, 3), (3, 5), (5, 6), (6, 8)):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)


def test_packed_row_gives_each_sample_its_own_logits_loss_and_gradients(tmp_path):
    ds = build(tmp_path)
    x, y, segments = ds.next_batch()
    assert segments.max() >= 2                                  # several samples share a row
    model, alone = spread_model(), spread_model()
    with torch.no_grad():
        logits, _ = model(x, segment_ids=segments)              # [B, T, vocab]
    _, packed_loss = model(x, y, reduction="sum", segment_ids=segments)
    packed_loss.backward()
    total = 0.0
    for index in packed_samples(ds, x, segments):
        xi, yi = (torch.from_numpy(a)[None] for a in ds.samples.xy(index))
        row, seg = next((r, int(s)) for r in range(len(x)) for s in segments[r].unique().tolist()
                        if s >= 0 and torch.equal(x[r][segments[r] == s], xi[0]))
        with torch.no_grad():
            own, _ = alone(xi)
        torch.testing.assert_close(logits[row][segments[row] == seg], own[0], rtol=1e-5, atol=1e-5)
        _, loss = alone(xi, yi, reduction="sum")
        loss.backward()                                         # gradients add up over the samples
        total += loss.item()
    assert packed_loss.item() == pytest.approx(total, rel=1e-5)
    alone_params = dict(alone.named_parameters())
    for name, param in model.named_parameters():   # gradients reach ~30 here: atol 1e-4 is fp32 rounding
        torch.testing.assert_close(param.grad, alone_params[name].grad, rtol=1e-4, atol=1e-4, msg=name)


def test_perturbing_one_sample_leaves_the_others_unchanged(tmp_path):
    ds = build(tmp_path)
    x, _, segments = ds.next_batch()
    model = spread_model(1)
    changed = x.clone()
    target = (segments[0] == 1)
    changed[0][target] = (changed[0][target] + 5) % 36          # every token of sample 1 of row 0
    with torch.no_grad():
        before, _ = model(x, segment_ids=segments)
        after, _ = model(changed, segment_ids=segments)
    others = segments[0] != 1
    assert torch.equal(before[0][others], after[0][others])     # bit for bit: no attention across samples
    assert not torch.allclose(before[0][target], after[0][target])
    assert torch.equal(before[1:], after[1:])


def test_pack_rows_fits_every_sample_once_and_fills_rows():
    lengths = np.array([30, 5, 17, 12, 3, 26, 8, 1, 14, 9])
    rows = pack_rows(np.arange(10), lengths, 32)
    assert sorted(int(i) for row in rows for i in row) == list(range(10))
    assert all(lengths[row].sum() <= 32 for row in rows)
    assert len(rows) == int(np.ceil(lengths.sum() / 32))        # 125 positions: 4 rows, the fewest possible


def test_packed_rows_cover_each_epoch_once_across_ranks_and_pack_false_pads(tmp_path):
    world = 2
    ranks = [build(tmp_path, world_size=world, rank=r) for r in range(world)]
    n = len(ranks[0].samples)
    assert len(ranks[0]) == len(ranks[1]) < len(build(tmp_path, pack=False, micro_batch_size=2 * world))
    for epoch in range(2):
        seen = []
        for ds in ranks:
            part = []
            for _ in range(len(ds)):
                x, _, segments = ds.next_batch()
                assert x.shape[1] <= SEQ
                part += packed_samples(ds, x, segments)
            seen.append(part)
        counts = Counter(i for part in seen for i in part)
        assert set(counts) == set(range(n))
        repeated = [i for i, c in counts.items() if c > 1]      # only a wrapped row's samples may repeat
        assert not set(seen[0]) & set(seen[1]) - set(repeated)
        assert all(ds.epoch == epoch + 1 for ds in ranks)
    assert len(build(tmp_path, pack=False).next_batch()) == 2     # --pack=false: x, y padded, as before


def test_packed_position_resumes_exactly_and_geometries_agree(tmp_path):
    one = build(tmp_path, micro_batch_size=4)
    two = [build(tmp_path, world_size=2, rank=r) for r in range(2)]
    for _ in range(2):
        both = sorted(i for ds in two for i in packed_samples(ds, *ds.next_batch()[::2]))
        assert both == sorted(packed_samples(one, *one.next_batch()[::2]))
    state = json.loads(json.dumps(one.state_dict()))
    expected = [one.next_batch() for _ in range(len(one) + 2)]          # into the next epoch
    resumed = build(tmp_path, micro_batch_size=4)
    resumed.load_state_dict(state)
    for a, b in zip(expected, [resumed.next_batch() for _ in range(len(expected))]):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_trainer_counts_each_packed_sample_and_the_summed_loss(tmp_path):
    ds = build(tmp_path)
    x, y, segments = ds.next_batch()
    lengths = trainer._sample_lengths(x, ds, segments)
    expected = sorted(len(ds.samples.xy(i)[0]) for i in packed_samples(ds, x, segments))
    assert sorted(lengths.long().tolist()) == expected and lengths.sum() == (segments >= 0).sum()
    model = spread_model(2)
    loss = trainer._summed_loss(trainer.TokenLoss(), model, (x, y, segments))
    reference = sum(F.cross_entropy(model(torch.from_numpy(xi)[None])[0][0], torch.from_numpy(yi),
                                    ignore_index=IGNORE_INDEX, reduction="sum").item()
                    for xi, yi in (ds.samples.xy(i) for i in packed_samples(ds, x, segments)))
    assert loss.item() == pytest.approx(reference, rel=1e-5)


def test_doc_mask_keeps_documents_of_a_pretraining_window_apart(tmp_path):
    """--doc_mask: the segments of a window restart after each <eos>, and a document's logits inside the window
    are those of the document alone (without the mask, a later document sees the earlier one)."""
    from dataset import PretrainDataset
    from test_dataset import SYNTH_VOCAB, write_bin
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 36, n).tolist() + [2] for n in (9, 14, 6, 11)]
    path = write_bin(str(tmp_path / "docs.bin"), [t for doc in docs for t in doc])
    ds = PretrainDataset(path, SEQ, micro_batch_size=1, doc_mask=True)
    assert SYNTH_VOCAB >= 36
    x, y, segments = ds.next_batch()
    assert segments[0, :10].tolist() == [0] * 10 and segments[0, 10:25].tolist() == [1] * 15
    assert len(PretrainDataset(path, SEQ, micro_batch_size=1).next_batch()) == 2   # off by default
    model = spread_model(3)
    with torch.no_grad():
        masked, _ = model(x, segment_ids=segments)
        plain, _ = model(x)
        alone, _ = model(x[:, 10:25])
    torch.testing.assert_close(masked[0, 10:25], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[0, 10:25], alone[0], atol=1e-3)
    torch.testing.assert_close(masked[0, :10], plain[0, :10], rtol=1e-5, atol=1e-5)   # the first is unchanged


def test_sft_resume_with_multi_sample_rows_equals_uninterrupted(sample_csv, small_tokenizer, init_weights, tmp_path):
    """sft.py end to end at seq_len 128, where rows really hold several conversations: 3 steps + --resume 3
    steps equal 6 uninterrupted steps (losses bit for bit, weights equal)."""
    import sft
    from chatglm_tokenizer import load_tokenizer
    from test_sft import flags, load, metrics
    from train_config import parse_config
    common = dict(seq_len=128, max_iters=6, save_interval=3, eval_interval=3)
    cfg = parse_config(flags(sample_csv, small_tokenizer, tmp_path / "unused", **common), sft.DEFAULTS)
    train_ds, _ = sft.build_datasets(cfg, load_tokenizer(small_tokenizer), 128, 0, 1)
    assert cfg.pack and max(int(train_ds.next_batch()[2].max()) for _ in range(len(train_ds))) >= 1   # 2+ a row
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    sft.main(flags(sample_csv, small_tokenizer, whole, init_from=init_weights, **common))
    sft.main(flags(sample_csv, small_tokenizer, halves, init_from=init_weights, **dict(common, max_iters=3)))
    sft.main(flags(sample_csv, small_tokenizer, halves, **common) + ["--resume"])
    assert metrics(halves, "loss") == metrics(whole, "loss") and len(metrics(whole, "loss")) == 6
    a, b = load(halves / "ckpt.pt"), load(whole / "ckpt.pt")
    assert a["data_state"] == b["data_state"] and a["data_state"]["pack_len"] == 128
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
