"""dataset.PretrainDataset: windows, coverage across ranks, exact position restore, manifest checks.

    python -m pytest -q tests/test_dataset.py

Fixtures are synthetic .bin files with a manifest naming a fake 512-id tokenizer; `write_bin` is also used by
the trainer tests.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from dataset import PretrainDataset
from tokenfile import DataError, data_tokenizer, manifest_path, resolve_bin_paths

SYNTH_VOCAB = 512
SYNTH_TOKENIZER = {"path": "synthetic", "sha256": "5e" * 32, "vocab_size": SYNTH_VOCAB}


def write_bin(path: str, tokens, tokenizer: dict | None = SYNTH_TOKENIZER) -> str:
    """A uint16 .bin and, unless tokenizer is None, its manifest in data_process.py's layout."""
    tokens = np.asarray(tokens, dtype=np.uint16)
    tokens.tofile(path)
    if tokenizer is not None:
        with open(manifest_path(path), "w", encoding="utf-8") as f:
            json.dump({"split": "train", "dtype": "uint16", "byte_order": "little", "eos_id": 2,
                       "tokenizer": tokenizer, "tokens": int(len(tokens)), "documents": 1}, f)
    return path


def counting_bin(tmp_path, n_tokens: int, name: str = "count.bin", start: int = 0) -> str:
    """Tokens start, start+1, ...: each window is identified by its first token."""
    return write_bin(str(tmp_path / name), np.arange(start, start + n_tokens))


def window_id(x_row, seq_len: int) -> int:
    return int(x_row[0]) // seq_len


def test_windows_overlap_by_one_token_so_no_target_is_lost(tmp_path):
    seq_len, n = 8, 8 * 10 + 5
    ds = PretrainDataset(counting_bin(tmp_path, n), seq_len, micro_batch_size=1)
    assert ds.n_windows == (n - 1) // seq_len == 10
    assert ds.tail_tokens == n - (10 * seq_len + 1)
    targets = []
    for i in range(ds.n_windows):
        window = ds.window(i)
        assert len(window) == seq_len + 1 and window[0] == i * seq_len
        targets += list(window[1:])
    # every token after the first (up to the last window's end) is a target exactly once
    assert targets == list(range(1, ds.n_windows * seq_len + 1))
    x, y = ds.next_batch()
    assert x.dtype == y.dtype and str(x.dtype) == "torch.int64"
    assert (y[:, :-1] == x[:, 1:]).all() and int(y[0, -1]) == int(x[0, -1]) + 1


def test_memmaps_and_never_spans_two_files(tmp_path):
    seq_len = 4
    a = counting_bin(tmp_path, 4 * 5 + 1, "a.bin")            # 5 windows, no tail
    b = counting_bin(tmp_path, 4 * 3 + 3, "b.bin", start=1000)  # 3 windows, 2 tail tokens
    ds = PretrainDataset([a, b], seq_len, micro_batch_size=1)
    assert ds.n_windows == 8 and ds.tail_tokens == 2
    assert all(isinstance(t, np.memmap) for t in ds._tokens)
    firsts = [int(ds.window(i)[0]) for i in range(ds.n_windows)]
    assert firsts == [0, 4, 8, 12, 16, 1000, 1004, 1008]
    assert resolve_bin_paths(str(tmp_path / "*.bin")) == [a, b]
    assert resolve_bin_paths(f"{b},{a}") == [b, a]


@pytest.mark.parametrize("world_size,micro_batch_size", [(1, 3), (2, 1), (3, 2)])
def test_each_epoch_visits_every_window_once_across_ranks(tmp_path, world_size, micro_batch_size):
    seq_len, n_windows = 4, 23   # 23 windows: no world size or batch divides an epoch evenly
    path = counting_bin(tmp_path, n_windows * seq_len + 1)
    ranks = [PretrainDataset(path, seq_len, micro_batch_size, r, world_size, seed=7) for r in range(world_size)]
    steps = -(-3 * n_windows // (world_size * micro_batch_size))   # enough batches for three epochs
    per_rank = [[window_id(row, seq_len) for _ in range(steps) for row in ds.next_batch()[0]] for ds in ranks]
    # rank r read global stream positions r, r + W, r + 2W, ...: rebuild the stream
    stream = [per_rank[p % world_size][p // world_size] for p in range(steps * micro_batch_size * world_size)]
    epochs = [stream[e * n_windows:(e + 1) * n_windows] for e in range(3)]
    for order in epochs:
        assert Counter(order) == Counter(range(n_windows))   # each window exactly once
    assert epochs[0] != epochs[1]                              # reshuffled per epoch
    for r in range(world_size):                                # shards are disjoint within an epoch
        mine = {stream[p] for p in range(n_windows) if p % world_size == r}
        others = {stream[p] for p in range(n_windows) if p % world_size != r}
        assert not mine & others


def test_order_depends_on_seed_only(tmp_path):
    path = counting_bin(tmp_path, 50 * 4 + 1)
    first = [PretrainDataset(path, 4, 5, seed=s).next_batch()[0][:, 0].tolist() for s in (1, 1, 2)]
    assert first[0] == first[1] != first[2]


def test_state_restores_exactly_no_replay_no_skip(tmp_path):
    path = counting_bin(tmp_path, 17 * 4 + 1)
    ds = PretrainDataset(path, 4, micro_batch_size=3, seed=3)
    for _ in range(7):   # past the first epoch boundary (17 windows)
        ds.next_batch()
    state = json.loads(json.dumps(ds.state_dict()))   # plain python
    expected = [ds.next_batch()[0] for _ in range(5)]
    fresh = PretrainDataset(path, 4, micro_batch_size=3, seed=999)
    fresh.load_state_dict(state)
    assert fresh.consumed == 21 and fresh.epoch == 1 and fresh.seed == 3   # the saved seed wins
    got = [fresh.next_batch()[0] for _ in range(5)]
    assert all((a == b).all() for a, b in zip(expected, got))


def test_restore_with_another_world_size_continues_the_global_stream(tmp_path):
    path = counting_bin(tmp_path, 20 * 4 + 1)
    single = PretrainDataset(path, 4, micro_batch_size=2, seed=5)
    for _ in range(3):
        single.next_batch()
    state = single.state_dict()
    stream = [window_id(row, 4) for _ in range(4) for row in single.next_batch()[0]]   # positions 6..13
    pair = [PretrainDataset(path, 4, micro_batch_size=2, rank=r, world_size=2, log=False) for r in range(2)]
    for ds in pair:
        ds.load_state_dict(state)
    per_rank = [[window_id(row, 4) for _ in range(2) for row in ds.next_batch()[0]] for ds in pair]
    assert [per_rank[p % 2][p // 2] for p in range(8)] == stream


def test_restore_refuses_other_data(tmp_path):
    ds = PretrainDataset(counting_bin(tmp_path, 10 * 4 + 1), 4, 1)
    other = PretrainDataset(counting_bin(tmp_path, 12 * 4 + 1, "other.bin"), 4, 1)
    with pytest.raises(DataError, match="other data"):
        other.load_state_dict(ds.state_dict())


def test_eval_windows_spread_over_the_file_and_are_the_same_for_any_world_size(tmp_path):
    path = counting_bin(tmp_path, 11 * 4 + 1)
    spread = PretrainDataset(path, 4, micro_batch_size=2).eval_windows(4)
    assert list(spread) == ["count"] and spread["count"].tolist() == [1, 4, 6, 9]   # not the file's head 0..3
    for world in (1, 2, 3):
        ranks = [PretrainDataset(path, 4, micro_batch_size=2, rank=r, world_size=world, log=False)
                 for r in range(world)]
        batches = [list(ds.eval_batches(4)) for ds in ranks]
        assert len({len(b) for b in batches}) == 1                      # no rank waits on another
        ids = [window_id(x_row, 4) for b in batches for _, x, y in b for x_row, y_row in zip(x, y)
               if (y_row != -100).any()]
        assert sorted(ids) == [1, 4, 6, 9]                               # the same windows, each once
    assert len(list(PretrainDataset(path, 4, micro_batch_size=2).eval_batches(100))) == 6   # all 11 windows


def test_missing_bin_says_which_command_makes_it(tmp_path):
    with pytest.raises(DataError, match="run python data_process.py first"):
        resolve_bin_paths(str(tmp_path / "pretrain_data.bin"))
    with pytest.raises(DataError, match="run python data_process.py first"):
        resolve_bin_paths(str(tmp_path / "part_*.bin"))


def test_manifest_mismatch_is_refused_naming_both(tmp_path):
    a = counting_bin(tmp_path, 41, "a.bin")
    other = dict(SYNTH_TOKENIZER, path="other_tok", sha256="ab" * 32)
    b = write_bin(str(tmp_path / "b.bin"), np.arange(41), tokenizer=other)
    with pytest.raises(DataError) as err:
        PretrainDataset([a, b], 4, 1)
    assert "b.bin" in str(err.value) and "a.bin" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="other_tok"):
        data_tokenizer([a], expected=other)
    with pytest.raises(DataError, match="vocab 600"):
        data_tokenizer([a], expected=dict(SYNTH_TOKENIZER, vocab_size=600))


def test_manifest_less_bin_needs_a_named_tokenizer_and_fitting_ids(tmp_path, capsys):
    path = write_bin(str(tmp_path / "seed.bin"), np.r_[np.arange(40), 99], tokenizer=None)
    with pytest.raises(DataError, match="no manifest"):
        PretrainDataset(path, 4, 1)
    ds = PretrainDataset(path, 4, 1, tokenizer=SYNTH_TOKENIZER)
    assert ds.n_windows == 10 and "no manifest" in capsys.readouterr().err
    small = dict(SYNTH_TOKENIZER, vocab_size=50)
    with pytest.raises(DataError, match="token id 99 >= vocab 50"):
        PretrainDataset(path, 4, 1, tokenizer=small)


def test_truncated_or_odd_bin_is_refused(tmp_path):
    path = counting_bin(tmp_path, 41)
    with open(path, "r+b") as f:
        f.truncate(40)   # the manifest still says 41 tokens
    with pytest.raises(DataError, match="manifest says 41"):
        PretrainDataset(path, 4, 1)
    with open(path, "r+b") as f:
        f.truncate(39)
    with pytest.raises(DataError, match="not a whole number"):
        PretrainDataset(path, 4, 1)


def test_too_little_data_for_one_window(tmp_path):
    with pytest.raises(DataError, match="no window"):
        PretrainDataset(counting_bin(tmp_path, 8), 8, 1)
    assert os.path.exists(tmp_path / "count.json")
