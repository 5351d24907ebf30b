"""dataset_sft.py: exact loss masks, truncation policy, CSV reading, rank shards, exact resume.

    python -m pytest -q tests/test_dataset_sft.py

Most tests use a letter tokenizer (a..z -> ids 10..35, <pad>=0 <bos>=1 <eos>=2) so expected targets can be
listed literally; one test runs the real ChatGLM2 tokenizer end to end.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pandas as pd
import pytest
import torch

from dataset_sft import (IGNORE_INDEX, SFTDataError, Turn, build_sft_datasets, fit_turns, layout_sample,
                         read_sft_csv)

PAD, BOS, EOS, X = 0, 1, 2, IGNORE_INDEX


class LetterTokenizer:
    """a..z -> 10..35, one id per character; the interface dataset_sft uses from ChatGLMTokenizer."""
    special_tokens = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD}
    vocab_size = 36

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return [[ord(c) - ord("a") + 10 for c in text] for text in texts]


def ids(text: str) -> list[int]:
    return LetterTokenizer().encode_batch([text])[0]


def write_csv(path, rows: list[tuple]) -> str:
    """rows of (prompt, answer, history turns) -> an SFT CSV at path."""
    frame = pd.DataFrame([{"prompt": p, "answer": a, "history": json.dumps(h, ensure_ascii=False),
                           "source": "test"} for p, a, h in rows])
    frame.to_csv(path, index=False)
    return str(path)


def one_batch(tmp_path, rows, max_seq_len=64, micro_batch_size=1) -> tuple[list, list]:
    path = write_csv(tmp_path / "sft.csv", rows)
    train, _, _ = build_sft_datasets(path, LetterTokenizer(), max_seq_len, micro_batch_size,
                                     val_fraction=0.0, progress=False)
    x, y = train.next_batch()
    return x.tolist(), y.tolist()


# ------------------------------------------------------------------------------------- loss masks
def test_single_turn_targets_are_answer_and_eos_only(tmp_path):
    x, y = one_batch(tmp_path, [("ab", "xyz", [])])
    # ids: a b <bos> x y z <eos>; the <bos> position predicts the first answer token
    assert x == [[10, 11, BOS, 33, 34, 35]]
    assert y == [[X, X, 33, 34, 35, EOS]]


def test_multi_turn_targets_every_answer_never_a_prompt(tmp_path):
    x, y = one_batch(tmp_path, [("e", "fg", [["ab", "cd"]])])
    # ids: a b <bos> c d <eos> e <bos> f g <eos>  (history turn first)
    assert x == [[10, 11, BOS, 12, 13, EOS, 14, BOS, 15, 16]]
    assert y == [[X, X, 12, 13, EOS, X, X, 15, 16, EOS]]


def test_three_turns_and_empty_prompt(tmp_path):
    x, y = one_batch(tmp_path, [("", "z", [["a", "b"], ["c", "d"]])])
    # ids: a <bos> b <eos> c <bos> d <eos> <bos> z <eos>
    assert x == [[10, BOS, 11, EOS, 12, BOS, 13, EOS, BOS, 35]]
    assert y == [[X, 11, EOS, X, X, 13, EOS, X, 35, EOS]]


def test_batch_pads_to_its_longest_with_pad_id_and_ignore_index(tmp_path):
    path = write_csv(tmp_path / "sft.csv", [("a", "b", []), ("abcd", "efgh", [])])
    train, _, _ = build_sft_datasets(path, LetterTokenizer(), 64, micro_batch_size=2, val_fraction=0.0,
                                     progress=False)
    x, y = train.next_batch()
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.tolist() == [[10, BOS, 11, PAD, PAD, PAD, PAD, PAD, PAD],             # sorted by length
                          [10, 11, 12, 13, BOS, 14, 15, 16, 17]]
    assert y.tolist() == [[X, 11, EOS, X, X, X, X, X, X],
                          [X, X, X, X, 14, 15, 16, 17, EOS]]


# ------------------------------------------------------------------------------------- truncation
def turn(p: str, a: str) -> Turn:
    return Turn(ids(p), ids(a))


def test_fit_turns_keeps_a_conversation_that_fits():
    turns = [turn("ab", "cd"), turn("e", "f")]
    kept, cut = fit_turns(turns, 10)                       # 4 + 2 + 2 + 2 = 10 ids exactly
    assert kept == turns and tuple(cut) == (0, 0, False)


def test_fit_turns_drops_oldest_turns_first():
    turns = [turn("aa", "bb"), turn("cc", "dd"), turn("e", "f")]   # 6 + 6 + 4 ids
    kept, cut = fit_turns(turns, 11)
    assert kept == turns[1:] and tuple(cut) == (1, 0, False)
    kept, cut = fit_turns(turns, 9)
    assert kept == turns[2:] and tuple(cut) == (2, 0, False)


def test_fit_turns_then_cuts_the_prompt_head():
    kept, cut = fit_turns([turn("zz", "yy"), turn("abcdefgh", "xyz")], 9)   # room 7: 4 prompt + 3 answer
    assert kept == [turn("efgh", "xyz")] and tuple(cut) == (1, 4, False)
    ids_, learn = layout_sample(kept, BOS, EOS, cut.answer_cut)
    assert ids_[-1] == EOS and len(ids_) == 9


def test_cut_answer_keeps_some_prompt_and_has_no_eos():
    prompt, answer = "abcdefghijklmnop", "qrstuvwxyzqrstuvwxyzqrstuvwxyz"
    kept, cut = fit_turns([turn(prompt, answer)], 18)      # room 16: prompt floor 16 // 4 = 4
    assert kept == [Turn(ids("mnop"), ids(answer)[:13])]   # 4 + <bos> + 13 = 18 ids, no <eos>
    assert tuple(cut) == (0, 12, True)
    ids_, learn = layout_sample(kept, BOS, EOS, cut.answer_cut)
    assert ids_ == ids("mnop") + [BOS] + ids(answer)[:13] and EOS not in ids_
    assert learn == [False] * 5 + [True] * 13


def test_truncation_through_the_dataset_and_its_counters(tmp_path):
    rows = [("ab", "cd", []),                                   # fits
            ("ef", "gh", [["aaaa", "bbbb"]]),                   # loses its history turn
            ("abcdefghij", "xy", []),                           # loses its prompt head
            ("abcd", "qrstuvwxyzqrstu", [["a", "b"]])]          # loses history and its answer tail
    path = write_csv(tmp_path / "sft.csv", rows)
    train, _, stats = build_sft_datasets(path, LetterTokenizer(), max_seq_len=9, micro_batch_size=4,
                                         val_fraction=0.0, progress=False)
    assert (stats.rows, stats.truncated, stats.turns_dropped, stats.prompt_cut, stats.answer_cut) == (4, 3, 2, 2, 1)
    x, y = train.next_batch()
    assert x.shape[1] == 9                                      # the longest sample fills max_seq_len
    samples = {tuple(r[r != PAD].tolist()): t[:int((r != PAD).sum())].tolist() for r, t in zip(x, y)}
    # 10 ids at most. Answer cut: prompt keeps 8 // 4 = 2 tokens, the answer 10 - 1 - 2 = 7, no <eos>
    assert samples[tuple(ids("cd") + [BOS] + ids("qrstuv"))] == [X, X] + ids("qrstuvw")
    # prompt head cut: 6 prompt tokens + <bos> + x y <eos>
    assert samples[tuple(ids("efghij") + [BOS] + ids("xy"))] == [X] * 6 + ids("xy") + [EOS]
    # oldest turn dropped: only the last turn is left, whole
    assert samples[tuple(ids("ef") + [BOS] + ids("gh"))] == [X, X] + ids("gh") + [EOS]


# -------------------------------------------------------------------------------------------- CSV
def test_csv_reads_exact_text_and_seed_style_files(tmp_path):
    tricky = 'line1\nline2, "quoted", 逗号，emoji 😀\r\nend'
    path = write_csv(tmp_path / "sft.csv", [(tricky, "NA", [[tricky, ""]]), ("", "null", [])])
    assert read_sft_csv(path) == [[(tricky, ""), (tricky, "NA")], [("", "null")]]
    seed = tmp_path / "seed.csv"
    pd.DataFrame({"prompt": ["p"], "answer": ["a"]}).to_csv(seed, index=False)   # the seed's two columns
    assert read_sft_csv(str(seed)) == [[("p", "a")]]


def test_bad_history_names_file_physical_line_and_field(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('prompt,answer,history,source\n"two\nlines",a,[],s\np,a,"[[""x"", ""y""]",s\n',
                    encoding="utf-8")
    with pytest.raises(SFTDataError, match=rf"^{path}:4: field history: not valid JSON"):
        read_sft_csv(str(path))


@pytest.mark.parametrize("history, reason", [('{"a": 1}', "expected a JSON list"),
                                             ('[["only prompt"]]', "turn 0 is not a"),
                                             ('[["p", 3]]', "turn 0 is not a")])
def test_malformed_history_turns(tmp_path, history, reason):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"prompt": ["p", "q"], "answer": ["a", "b"], "history": ["[]", history]}).to_csv(path, index=False)
    with pytest.raises(SFTDataError, match=rf"{path}:3: field history: {reason}"):
        read_sft_csv(str(path))


def test_missing_file_column_and_rows(tmp_path):
    with pytest.raises(SFTDataError, match="no such file.*sft_data_process.py"):
        read_sft_csv(str(tmp_path / "absent.csv"))
    (tmp_path / "cols.csv").write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(SFTDataError, match="line 1: missing column.*prompt"):
        read_sft_csv(str(tmp_path / "cols.csv"))
    (tmp_path / "empty.csv").write_text("prompt,answer,history,source\n", encoding="utf-8")
    with pytest.raises(SFTDataError, match="no rows"):
        read_sft_csv(str(tmp_path / "empty.csv"))


@pytest.mark.parametrize("content, message", [(b"", ": not a readable CSV"),
                                              (b'prompt,answer\n"never closed,x\n', ": not a readable CSV"),
                                              (b"prompt,answer\nok,fine\n\xff\xfe,x\n", ":3: not UTF-8 text")])
def test_unreadable_csv_is_one_line(tmp_path, content, message):
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    with pytest.raises(SFTDataError, match="^" + re.escape(f"{path}{message}")) as err:
        build_sft_datasets(str(path), LetterTokenizer(), 16, 1, progress=False)
    assert "\n" not in str(err.value)


def test_real_tokenizer_learns_exactly_the_answer(tmp_path, tokenizer):
    rows = [("头痛怎么办？", "多休息，多喝水。", [["你好", "你好！有什么可以帮你？"]])]
    path = write_csv(tmp_path / "sft.csv", rows)
    train, _, _ = build_sft_datasets(path, tokenizer, 64, 1, val_fraction=0.0, progress=False)
    x, y = train.next_batch()
    learned = y[0][y[0] != IGNORE_INDEX].tolist()
    answers = [tokenizer.encode(a) + [EOS] for a in ("你好！有什么可以帮你？", "多休息，多喝水。")]
    assert learned == answers[0] + answers[1]
    assert tokenizer.decode_ids(x[0].tolist()).startswith("你好")


# ----------------------------------------------------------------------------- shards and resume
def numbered_rows(n: int) -> list[tuple]:
    """n distinct conversations of varied length: prompt spells i in letters, answer length varies."""
    return [("".join(chr(ord("a") + int(d)) for d in str(i)), "x" * (1 + i * 7 % 11), []) for i in range(n)]


def sample_ids(ds, x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Which samples a batch holds, recovered from its content (a row without targets holds none)."""
    lookup = {tuple(ds.samples.xy(i)[0].tolist()): i for i in range(len(ds.samples))}
    return [lookup[tuple(row[:int((t != X).nonzero().max()) + 1].tolist())] for row, t in zip(x, y) if (t != X).any()]


def build(tmp_path, n=23, world_size=1, rank=0, micro_batch_size=2, **kw):
    path = tmp_path / "shard.csv"
    if not path.exists():
        write_csv(path, numbered_rows(n))
    train, val, _ = build_sft_datasets(str(path), LetterTokenizer(), 32, micro_batch_size, rank=rank,
                                       world_size=world_size, seed=7, progress=False, **kw)
    return train, val


@pytest.mark.parametrize("micro_batch_size", [2, 7])
def test_rank_shards_are_disjoint_and_cover_each_epoch_exactly_once(tmp_path, micro_batch_size):
    """23 samples on 3 ranks: nothing is repeated to make the epoch divide. With micro batch 7 the epoch's last
    global batch holds 2 samples, so one rank gets a batch without targets (it adds nothing to the loss)."""
    world = 3
    ranks = [build(tmp_path, world_size=world, rank=r, micro_batch_size=micro_batch_size, val_fraction=0.0)[0]
             for r in range(world)]
    n = len(ranks[0].samples)
    for epoch in range(2):
        batches = [len(ds) for ds in ranks]
        assert len(set(batches)) == 1                      # lockstep: same batch count on every rank
        seen = [[i for _ in range(batches[0]) for i in sample_ids(ds, *ds.next_batch())] for ds in ranks]
        assert all(ds.epoch == epoch + 1 for ds in ranks)
        counts = Counter(i for part in seen for i in part)
        assert set(counts) == set(range(n)) and set(counts.values()) == {1}   # each sample once, in all ranks


def test_position_restores_exactly_across_epochs(tmp_path):
    first, _ = build(tmp_path, val_fraction=0.0)
    for _ in range(9):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))      # plain python: survives any serialisation
    expected = [first.next_batch() for _ in range(20)]      # crosses into the next epochs
    second, _ = build(tmp_path, val_fraction=0.0)
    second.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [second.next_batch() for _ in range(20)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert second.state_dict() == first.state_dict() and first.epoch >= 1


def test_ranks_split_what_one_process_reads_and_resume_across_geometries(tmp_path):
    """2 ranks x 2 read, step by step, the samples 1 rank x 4 reads; a position saved by one continues
    exactly in the other (the order depends on world_size * micro_batch_size only)."""
    one, _ = build(tmp_path, n=24, micro_batch_size=4, val_fraction=0.0)
    two = [build(tmp_path, n=24, world_size=2, rank=r, micro_batch_size=2, val_fraction=0.0)[0] for r in range(2)]
    for _ in range(3):
        both = sorted(i for ds in two for i in sample_ids(ds, *ds.next_batch()))
        assert both == sorted(sample_ids(one, *one.next_batch()))
    resumed, _ = build(tmp_path, n=24, micro_batch_size=4, val_fraction=0.0)
    resumed.load_state_dict(two[0].state_dict())
    for _ in range(len(one) + 2):                         # into the next epoch
        x1, y1 = one.next_batch()
        x2, y2 = resumed.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resume_on_another_world_size_and_micro_batch_continues_the_same_stream(tmp_path):
    """A position saved by 1 rank x micro batch 2 continues on 2 ranks x micro batch 3 (another global batch):
    the rest of the epoch is the same samples in the same order, each once, none skipped or repeated."""
    small, _ = build(tmp_path, n=40, micro_batch_size=2, val_fraction=0.0)
    done = [i for _ in range(8) for i in sample_ids(small, *small.next_batch())]
    state = json.loads(json.dumps(small.state_dict()))
    rest = [i for _ in range(12) for i in sample_ids(small, *small.next_batch())]
    assert small.epoch == 1 and sorted(done + rest) == list(range(40))
    pair = [build(tmp_path, n=40, world_size=2, rank=r, micro_batch_size=3, val_fraction=0.0)[0] for r in range(2)]
    for ds in pair:
        ds.load_state_dict(state)
    resumed = []
    while pair[0].epoch == 0:
        resumed += [i for ds in pair for i in sample_ids(ds, *ds.next_batch())]
    assert resumed == rest and pair[1].epoch == 1


def test_other_data_is_refused_on_resume(tmp_path):
    first, _ = build(tmp_path, val_fraction=0.0)
    state = first.state_dict()
    other_path = write_csv(tmp_path / "other.csv", numbered_rows(24))
    other, _, _ = build_sft_datasets(other_path, LetterTokenizer(), 32, 2, progress=False, val_fraction=0.0)
    with pytest.raises(SFTDataError, match="other data"):
        other.load_state_dict(state)


def test_epoch_order_depends_on_seed_and_epoch(tmp_path):
    ds, _ = build(tmp_path, val_fraction=0.0)
    epoch0 = [sample_ids(ds, *ds.next_batch()) for _ in range(len(ds))]
    epoch1 = [sample_ids(ds, *ds.next_batch()) for _ in range(len(ds))]
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))


def test_length_grouping_reduces_padding(tmp_path):
    def padding(bucket_batches: int) -> int:
        ds, _ = build(tmp_path, n=200, val_fraction=0.0, bucket_batches=bucket_batches)
        return sum(int((x == PAD).sum()) for x, _ in (ds.next_batch() for _ in range(len(ds))))
    assert padding(32) < padding(1) / 2


def test_validation_split_is_deterministic_and_eval_covers_it_once(tmp_path):
    world = 2
    parts = [build(tmp_path, n=200, world_size=world, rank=r, micro_batch_size=3, val_fraction=0.2)
             for r in range(world)]
    train, val = parts[0]
    assert 20 <= len(val.samples) <= 60 and len(train.samples) + len(val.samples) == 200
    train_keys, val_keys = set(train.samples.keys.tolist()), set(val.samples.keys.tolist())
    assert not train_keys & val_keys
    per_rank = [list(v.eval_batches(1000)) for _, v in parts]
    assert len(per_rank[0]) == len(per_rank[1])                       # no rank waits on another
    ids_seen = [i for (_, v), batches in zip(parts, per_rank) for _, x, y in batches
                if (y != X).any() for i in sample_ids(v, x, y)]
    assert sorted(ids_seen) == list(range(len(val.samples)))          # each val sample exactly once
    again = list(parts[0][1].eval_batches(1000))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(per_rank[0], again))
    assert len(list(val.eval_batches(2 * world * 3))) == 2            # 2 global batches of 2 ranks x 3


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SFTDataError, match="val_fraction"):
        build(tmp_path, val_fraction=1.0)
    with pytest.raises(SFTDataError, match="max_seq_len"):
        build_sft_datasets(write_csv(tmp_path / "a.csv", [("a", "b", [])]), LetterTokenizer(), 1, 1,
                           progress=False)
