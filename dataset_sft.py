"""SFT batches from sft_data/sft_data.csv: multi-turn layout, exact loss masks, sharded, resumable.

    python dataset_sft.py sft_data/sft_data.csv --max_seq_len=512   # sizes, truncation counts, a sample

    from dataset_sft import build_sft_datasets
    train_ds, val_ds, stats = build_sft_datasets("sft_data/sft_data.csv", tok, max_seq_len=512,
                                                 micro_batch_size=8, rank=0, world_size=1, seed=1337)
    print(stats.describe())
    x, y = train_ds.next_batch()    # x, y [B, T] int64, T = longest sample in this batch; y == -100: no loss
    # pack=True: x, y, segment_ids = train_ds.next_batch(), rows of several samples up to max_seq_len

sft.py builds these after setup_distributed() and hands them to trainer.train (the BatchSource protocol).

A CSV row is a conversation: `history` (a JSON list of earlier [prompt, answer] turns) then the row's own
prompt and answer. Its token layout is `prompt <bos> answer <eos>` per turn, in order. The model learns
every answer token and the `<eos>` closing it, never a prompt token, a `<bos>` or padding:

    ids  p1 p2 <bos> a1 a2 <eos>          x = ids[:-1] = p1   p2   <bos> a1  a2
                                          y = ids[1:]  = -100 -100 a1    a2  <eos>

Samples longer than max_seq_len + 1 ids (so that x fits the model's context) lose their oldest turns
first, then the beginning of the last prompt; if the last answer itself must be cut, it ends without
`<eos>` so the model is never taught to stop mid-sentence. Every such sample is counted in the stats.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

IGNORE_INDEX = -100          # target value the loss skips; the model's cross-entropy uses the same value
TOKENIZE_CHUNK_ROWS = 8192   # rows per native batch-encode call: fast, yet bounded peak memory
# When one turn alone is too long, the prompt keeps at least 1/4 of the room before the answer is cut:
# an answer with no question left would teach the model to talk without being asked.
PROMPT_FLOOR_DIVISOR = 4
DEFAULT_BUCKET_BATCHES = 32  # length grouping: sort by length within buckets of this many global batches


class SFTDataError(ValueError):
    """Bad SFT input or data position; the message is one line naming file, line and field."""


class Turn(NamedTuple):
    prompt: list[int]
    answer: list[int]


class Cut(NamedTuple):
    """How a sample was truncated (all zero / False when it fit)."""
    turns_dropped: int
    prompt_tokens_cut: int
    answer_cut: bool


@dataclass
class SFTStats:
    """Counts a run prints at start, so nothing is dropped or truncated silently."""
    path: str = ""
    rows: int = 0
    train_samples: int = 0
    val_samples: int = 0
    truncated: int = 0          # samples changed in any way by truncation
    turns_dropped: int = 0      # samples that lost at least one oldest turn
    prompt_cut: int = 0         # samples whose last prompt lost its beginning
    answer_cut: int = 0         # samples whose last answer was cut (and so has no <eos>)
    tokens: int = 0             # ids in all samples after truncation
    target_tokens: int = 0      # ids the model learns (answer tokens and their <eos>)

    def count(self, cut: Cut) -> None:
        self.turns_dropped += cut.turns_dropped > 0
        self.prompt_cut += cut.prompt_tokens_cut > 0
        self.answer_cut += cut.answer_cut
        self.truncated += cut.turns_dropped > 0 or cut.prompt_tokens_cut > 0 or cut.answer_cut

    def describe(self) -> str:
        pct = 100.0 * self.truncated / max(self.rows, 1)
        return (f"{self.path}: {self.rows:,} conversations -> {self.train_samples:,} train / "
                f"{self.val_samples:,} val; {self.tokens:,} tokens, {self.target_tokens:,} learned "
                f"(answers + <eos>); truncated {self.truncated:,} ({pct:.2f}%): oldest turns dropped "
                f"in {self.turns_dropped:,}, prompt head cut in {self.prompt_cut:,}, answer cut "
                f"(no <eos>) in {self.answer_cut:,}")


# ---------------------------------------------------------------------------------------------- CSV
def _csv_line_of_row(path: str, row: int) -> int:
    """1-based physical line where data row `row` (0-based, header excluded) starts. Fields may hold
    newlines, so this re-parses the file; only called on the error path."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        start, seen = 1, -1
        for record in reader:
            if record:  # pandas skips blank lines; so do we, to count rows the same way
                if seen == row:
                    return start
                seen += 1
            start = reader.line_num + 1
    return start


def _parse_history(text: str) -> list[tuple[str, str]]:
    """Earlier turns from the `history` field; ValueError with the reason when malformed."""
    if text in ("", "[]"):
        return []
    try:
        turns = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(turns, list):
        raise ValueError(f"expected a JSON list of [prompt, answer] pairs, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(s, str) for s in turn)):
            raise ValueError(f"turn {i} is not a [prompt, answer] pair of strings: {json.dumps(turn)[:80]}")
    return [(p, a) for p, a in turns]


def _frame_conversations(frame: pd.DataFrame, path: str, first_row: int,
                         answer_columns: tuple[str, ...] = ("answer",)) -> list[list[list[tuple[str, str]]]]:
    """Conversations of one chunk of CSV rows, one list per answer column (dpo_data.csv: chosen and rejected,
    the same history and prompt before each); `first_row` is the chunk's 0-based row in the file. Only prompt
    and the answer columns are required: history and source are optional, so seed-style CSVs load too."""
    missing = [c for c in ("prompt", *answer_columns) if c not in frame.columns]
    if missing:
        expected = "prompt, answer, history, source" if answer_columns == ("answer",) else \
            "prompt, chosen, rejected, history, source"
        raise SFTDataError(f"{path}: line 1: missing column(s) {', '.join(missing)} (expected {expected})")
    histories = frame["history"].tolist() if "history" in frame.columns else [""] * len(frame)
    answers = [frame[column].tolist() for column in answer_columns]
    per_column: list[list[list[tuple[str, str]]]] = [[] for _ in answer_columns]
    for row, (prompt, history) in enumerate(zip(frame["prompt"].tolist(), histories), start=first_row):
        try:
            turns = _parse_history(history)
        except ValueError as exc:
            raise SFTDataError(f"{path}:{_csv_line_of_row(path, row)}: field history: {exc}") from None
        for conversations, column in zip(per_column, answers):
            conversations.append(turns + [(prompt, column[row - first_row])])
    return per_column


def _csv_error(path: str, exc: Exception) -> SFTDataError:
    if isinstance(exc, UnicodeDecodeError):   # pandas reports a buffer offset: find the line ourselves
        with open(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return SFTDataError(f"{path}:{line_number}: not UTF-8 text (byte {line[bad.start]:#04x} at "
                                        f"column {bad.start + 1}); save the CSV as UTF-8")
    return SFTDataError(f"{path}: not a readable CSV ({str(exc).strip().splitlines()[0]})")


def _chunks(reader: Iterator[pd.DataFrame], path: str,
            answer_columns: tuple[str, ...]) -> Iterator[list[list[list[tuple[str, str]]]]]:
    rows = 0
    try:
        for frame in reader:
            yield _frame_conversations(frame, path, rows, answer_columns)
            rows += len(frame)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _csv_error(path, exc) from None
    if rows == 0:
        raise SFTDataError(f"{path}: has a header but no rows")


def iter_csv_answers(path: str, answer_columns: tuple[str, ...],
                     chunk_rows: int = TOKENIZE_CHUNK_ROWS) -> Iterator[list[list[list[tuple[str, str]]]]]:
    """Chunks of an SFT or preference CSV, each a list per answer column of conversations (lists of (prompt,
    answer) turns, oldest first, ending in that column's answer), streamed so memory holds one chunk of text
    at a time and the file is parsed once whatever the columns. Raises SFTDataError naming the file (and line
    and field) for a missing file, a missing column, an unparsable CSV, no rows, or a malformed history; a
    missing or empty file is refused at once, before any chunk is read."""
    if not os.path.isfile(path):
        raise SFTDataError(f"{path}: no such file (make it with: python sft_data_process.py --out {path})")
    try:
        # keep_default_na=False + dtype=str: "" and "NA" stay text; sft_data_process.py round-trips this way
        reader = pd.read_csv(path, keep_default_na=False, dtype=str, chunksize=chunk_rows)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise _csv_error(path, exc) from None
    return _chunks(reader, path, answer_columns)


def iter_sft_csv(path: str, chunk_rows: int = TOKENIZE_CHUNK_ROWS) -> Iterator[list[list[tuple[str, str]]]]:
    """Chunks of conversations of an SFT CSV (its `answer` column): see iter_csv_answers."""
    return (chunk for chunk, in iter_csv_answers(path, ("answer",), chunk_rows))


def read_sources(path: str) -> np.ndarray | None:
    """The `source` column of an SFT CSV (one name per row, '' becomes "unnamed"), or None without one."""
    frame = pd.read_csv(path, usecols=lambda column: column == "source", keep_default_na=False, dtype=str)
    if "source" not in frame.columns:
        return None
    return np.array([name or "unnamed" for name in frame["source"].tolist()], dtype=object)


def read_sft_csv(path: str) -> list[list[tuple[str, str]]]:
    """Every conversation of an SFT CSV at once (for tools and tests; training streams iter_sft_csv)."""
    return [conversation for chunk in iter_sft_csv(path) for conversation in chunk]


# ---------------------------------------------------------------------------------- sample layout
def fit_turns(turns: list[Turn], max_ids: int) -> tuple[list[Turn], Cut]:
    """Truncate a conversation to at most `max_ids` ids of layout: drop the oldest turns first, then cut
    the last prompt's beginning, then (only if still needed) the last answer's end."""
    sizes = [len(t.prompt) + len(t.answer) + 2 for t in turns]   # +2: <bos> and <eos>
    total, first = sum(sizes), 0
    while total > max_ids and first < len(turns) - 1:
        total -= sizes[first]
        first += 1
    kept = turns[first:]
    if total <= max_ids:
        return kept, Cut(first, 0, False)
    prompt, answer = kept[0]
    room = max_ids - 2
    keep_prompt = max(min(len(prompt), room // PROMPT_FLOOR_DIVISOR), room - len(answer))
    answer_cut = keep_prompt + len(answer) > room
    if answer_cut:
        answer = answer[:max_ids - 1 - keep_prompt]   # the <eos> slot goes to the answer: no <eos> now
    cut = Cut(first, len(prompt) - keep_prompt, answer_cut)
    return [Turn(prompt[len(prompt) - keep_prompt:], answer)], cut


def layout_sample(turns: list[Turn], bos: int, eos: int, answer_cut: bool = False) -> tuple[list[int], list[bool]]:
    """ids `prompt <bos> answer <eos>` per turn, and `learn[j]` = True where ids[j] is a token the model
    learns to predict: an answer token or the <eos> closing it. A cut last answer gets no <eos>."""
    ids: list[int] = []
    learn: list[bool] = []
    for i, (prompt, answer) in enumerate(turns):
        ids += prompt + [bos] + answer
        learn += [False] * (len(prompt) + 1) + [True] * len(answer)
        if not (answer_cut and i == len(turns) - 1):
            ids.append(eos)
            learn.append(True)
    return ids, learn


def sample_xy(ids: np.ndarray, learn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model input x = ids[:-1] and target y = ids[1:], with y = IGNORE_INDEX where ids[1:] is not learned.
    Position t reads ids[t] and predicts ids[t+1]: the <bos> position predicts the first answer token."""
    ids = ids.astype(np.int64)
    return ids[:-1], np.where(learn[1:], ids[1:], IGNORE_INDEX)


def row_key(turns: list[tuple[str, str]]) -> int:
    """Stable 64-bit hash of a conversation's text: decides its split and its place in the eval order,
    so duplicates always land in the same split and no process or seed changes either."""
    text = "\x1e".join(p + "\x1f" + a for p, a in turns)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------ tokenized samples
@dataclass
class SFTSamples:
    """Tokenized, truncated samples concatenated into flat arrays (SFT corpora fit in memory as ids)."""
    ids: np.ndarray       # [total ids] every sample's layout, back to back
    learn: np.ndarray     # [total ids] bool: the model learns to predict this id
    offsets: np.ndarray   # [n + 1] int64: sample i is ids[offsets[i]:offsets[i + 1]]
    keys: np.ndarray      # [n] uint64 row_key of each sample: the deterministic eval order
    rows: np.ndarray      # [n] int64: the CSV data row (0-based) each sample comes from

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Model positions per sample (ids - 1)."""
        return np.diff(self.offsets) - 1

    def xy(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return sample_xy(self.ids[start:end], self.learn[start:end])

    def fingerprint(self) -> str:
        """Hash of every sample's ids and mask: a resumed run checks it still reads the same data."""
        digest = hashlib.blake2b(digest_size=8)
        for array in (self.offsets, self.ids, self.learn):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


@dataclass
class SampleAccumulator:
    """Collects samples as Python lists per chunk, then packs each chunk into numpy arrays (dataset_dpo too)."""
    id_dtype: type
    ids: list = field(default_factory=list)
    learn: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    parts: list = field(default_factory=list)

    def add(self, ids: list[int], learn: list[bool], key: int, row: int) -> None:
        self.ids += ids
        self.learn += learn
        self.lengths.append(len(ids))
        self.keys.append(key)
        self.rows.append(row)

    def flush(self) -> None:
        self.parts.append((np.array(self.ids, dtype=self.id_dtype), np.array(self.learn, dtype=bool),
                           np.array(self.lengths, dtype=np.int64), np.array(self.keys, dtype=np.uint64),
                           np.array(self.rows, dtype=np.int64)))
        self.ids, self.learn, self.lengths, self.keys, self.rows = [], [], [], [], []

    def finish(self) -> SFTSamples:
        self.flush()
        ids, learn, lengths, keys, rows = (np.concatenate(column) for column in zip(*self.parts))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return SFTSamples(ids, learn, offsets, keys, rows)


def encode_turns(tokenizer, conversations: list[list[tuple[str, str]]], num_threads: int) -> list[list[Turn]]:
    """Every prompt and answer of `conversations` in one native batch-encode call (no specials added)."""
    texts = [text for turns in conversations for turn in turns for text in turn]
    encoded = iter(tokenizer.encode_batch(texts, num_threads=num_threads))
    return [[Turn(next(encoded), next(encoded)) for _ in turns] for turns in conversations]


def tokenize_conversations(chunks: Iterable[list[list[tuple[str, str]]]], tokenizer, max_seq_len: int,
                           val_fraction: float, stats: SFTStats, progress: bool = True,
                           num_threads: int = -1) -> tuple[SFTSamples, SFTSamples]:
    """(train, val) samples from chunks of conversations: each one laid out, truncated to max_seq_len + 1
    ids and put in the validation split when its row_key falls in the lowest `val_fraction` of hashes."""
    bos, eos = tokenizer.special_tokens["<bos>"], tokenizer.special_tokens["<eos>"]
    id_dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    train, val = SampleAccumulator(id_dtype), SampleAccumulator(id_dtype)
    val_below = int(val_fraction * 2.0 ** 64)
    with tqdm(desc="tokenizing SFT data", unit=" conversations", disable=not progress) as bar:
        for chunk in chunks:
            for text_turns, turns in zip(chunk, encode_turns(tokenizer, chunk, num_threads)):
                kept, cut = fit_turns(turns, max_seq_len + 1)
                ids, learn = layout_sample(kept, bos, eos, cut.answer_cut)
                stats.rows += 1
                stats.count(cut)
                stats.tokens += len(ids)
                stats.target_tokens += sum(learn[1:])   # ids[0] is never a target: nothing predicts it
                key = row_key(text_turns)
                (val if key < val_below else train).add(ids, learn, key, stats.rows - 1)
            train.flush()
            val.flush()
            bar.update(len(chunk))
    return train.finish(), val.finish()


# ------------------------------------------------------------------------------------ BatchSource
def pack_rows(samples: np.ndarray, lengths: np.ndarray, row_len: int) -> list[np.ndarray]:
    """First-fit decreasing: `samples` (indices into `lengths`) placed into rows of `row_len` positions, longest
    first, each into the first row with room (close to the fewest rows possible: at most 11/9 of them + 1).
    Deterministic: ties keep the given order."""
    by_length = samples[np.argsort(-lengths[samples], kind="stable")]
    room = np.empty(len(samples), dtype=np.int64)     # free positions of each open row
    rows: list[list[int]] = []
    for i in by_length:
        fits = np.flatnonzero(room[:len(rows)] >= lengths[i])
        if len(fits):
            rows[fits[0]].append(int(i))
            room[fits[0]] -= lengths[i]
        else:
            room[len(rows)] = row_len - lengths[i]
            rows.append([int(i)])
    return [np.array(row, dtype=np.int64) for row in rows]


class SFTDataset:
    """BatchSource (see trainer.py) over SFTSamples for one rank.

    Each epoch is a seeded permutation of all samples (the same on every rank), cut into buckets of
    `bucket_batches` chunks of `order_batch` samples (world_size * micro_batch_size at the run's first start),
    sorted by length inside a bucket, cut into chunks whose order is then shuffled: the epoch's stream. A
    micro batch of all ranks takes the stream's next world_size * micro_batch_size samples (fewer at the
    epoch's end), rank r the r-th slice. So ranks see disjoint samples covering the epoch exactly once
    (nothing repeated to make it divide; a rank left without a sample gets an all-ignored one), ranks of
    one step get similar lengths (no straggler) and a batch pads only to its own longest sample. The order
    is a pure function of (seed, epoch, order_batch), so the position is just (epoch, samples read): restoring
    it continues exactly, also on another world size or micro batch, and W ranks with micro batch B train on
    exactly the samples of one rank with micro batch W * B.

    With pack_len > 0 (sft.py's default, --pack) a micro batch is micro_batch_size rows of up to pack_len
    positions, each holding several whole samples, and next_batch also returns segment ids: the model attends
    only within a sample and restarts its positions there, so a sample's loss and gradient are what it gives
    alone, without the padding. The epoch's rows (_epoch_rows: its permutation cut into buckets of
    bucket_batches * order_batch samples, each packed first-fit decreasing, the rows shuffled) depend on
    (seed, epoch, order_batch) only; a micro batch of all ranks takes the next world_size * micro_batch_size
    rows, rank r the r-th slice, and the position is still the samples read, always at a row boundary. So the
    guarantees above hold for rows as for samples. Validation batches stay padded (the same per-sample losses).
    """
    KIND = "sft"   # what state_dict() records; a data position saved by another kind of source is refused

    def __init__(self, samples: SFTSamples, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 1337, pad_id: int = 0, bucket_batches: int = DEFAULT_BUCKET_BATCHES,
                 sources: np.ndarray | None = None, pack_len: int = 0):
        if len(samples) == 0:
            raise SFTDataError("an SFT split has no samples")
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or bucket_batches < 1:
            raise SFTDataError(f"bad batch geometry: micro_batch_size={micro_batch_size} rank={rank} "
                               f"world_size={world_size} bucket_batches={bucket_batches}")
        self.samples, self.micro_batch_size = samples, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.pad_id, self.bucket_batches = pad_id, bucket_batches
        self.lengths = samples.lengths
        if pack_len and pack_len < int(self.lengths.max()):
            raise SFTDataError(f"pack_len={pack_len} is shorter than the longest sample ({int(self.lengths.max())} "
                               f"positions): pack to the max_seq_len the samples were truncated to")
        self.pack_len = pack_len   # > 0: training rows pack several samples up to this many positions
        self._rows: tuple[int, list[np.ndarray], np.ndarray] | None = None   # (epoch, rows, samples before each)
        self._epoch0_rows: int | None = None   # num_samples when packed (packing epoch 0 again would evict _rows)
        # each sample's `source` (validation is scored per source); one source "data" without that column
        self.sources = np.full(len(samples), "data", dtype=object) if sources is None else sources
        self.order_batch = world_size * micro_batch_size   # chunk size of the epoch order, fixed by the first start
        self.epoch = 0      # epochs completed = the epoch the next batch comes from
        self._offset = 0    # samples of this epoch's stream read by all ranks together
        self._stream: tuple[int, np.ndarray] | None = None
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        units = len(self._epoch_rows(self.epoch)[0]) if self.pack_len else len(self.samples)
        return -(-units // (self.world_size * self.micro_batch_size))

    @property
    def num_samples(self) -> int:
        """Conversations per epoch, all ranks together; packed, the rows per epoch: what a micro batch row holds
        one of, the unit the run plan counts epochs in."""
        if not self.pack_len:
            return len(self.samples)
        if self._epoch0_rows is None:
            self._epoch0_rows = len(self._epoch_rows(0)[0])
        return self._epoch0_rows

    def describe(self) -> str:
        """One line for the start-of-run summary (trainer.describe_run prints it)."""
        learned = int(self.samples.learn.sum())
        if self.pack_len:
            fill = float(self.lengths.sum()) / (len(self._epoch_rows(self.epoch)[0]) * self.pack_len)
            layout = (f"of {self.micro_batch_size} rows packing several samples into {self.pack_len} positions "
                      f"({fill:.0%} filled; attention and positions restart at each sample)")
        else:
            layout = (f"each padded to its longest sample (length-grouped in buckets of {self.bucket_batches} "
                      f"global batches)")
        return (f"{len(self.samples):,} conversations, {int(self.lengths.sum()):,} positions ({learned:,} "
                f"learned answer tokens), mean {float(self.lengths.mean()):.0f} / max {int(self.lengths.max())} "
                f"per sample; {len(self):,} micro batches per epoch per rank, {layout}")

    def _epoch_stream(self, epoch: int) -> np.ndarray:
        """This epoch's sample indices in training order: length-sorted chunks of order_batch samples, the
        chunks shuffled (cached for one epoch)."""
        if self._stream is None or self._stream[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order, chunk = rng.permutation(len(self.samples)), self.order_batch
            chunks = []
            for start in range(0, len(order), chunk * self.bucket_batches):
                bucket = order[start:start + chunk * self.bucket_batches]
                bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
                parts = [bucket[i:i + chunk] for i in range(0, len(bucket), chunk)]
                chunks += [parts[i] for i in rng.permutation(len(parts))]
            self._stream = (epoch, np.concatenate(chunks))
        return self._stream[1]

    def _epoch_rows(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """This epoch's packed rows in training order (each: the sample indices it holds) and the samples before
        each row and after the last, [rows + 1] (cached for one epoch)."""
        if self._rows is None or self._rows[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order, bucket = rng.permutation(len(self.samples)), self.order_batch * self.bucket_batches
            rows: list[np.ndarray] = []
            for start in range(0, len(order), bucket):
                rows += pack_rows(order[start:start + bucket], self.lengths, self.pack_len)
            rows = [rows[i] for i in rng.permutation(len(rows))]
            before = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
            self._rows = (epoch, rows, before)
        return self._rows[1], self._rows[2]

    def collate_packed(self, rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y, segment_ids [B, T] int64 for packed rows, T = the fullest row. Sample k of a row is segment k;
        the padding after the last sample is segment -1 (x pad_id, y IGNORE_INDEX). The model keeps segments
        apart (block-diagonal causal attention, positions restarting at 0), so each sample's logits are those
        it has alone. No rows (a rank left without any at an epoch's end): one all-ignored position."""
        width = max([int(self.lengths[row].sum()) for row in rows] + [1])
        x = np.full((max(len(rows), 1), width), self.pad_id, dtype=np.int64)
        y = np.full_like(x, IGNORE_INDEX)
        segments = np.full_like(x, -1)
        for r, row in enumerate(rows):
            start = 0
            for k, i in enumerate(row):
                xi, yi = self.samples.xy(int(i))
                end = start + len(xi)
                x[r, start:end], y[r, start:end], segments[r, start:end] = xi, yi, k
                start = end
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(segments)

    def _next_packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, before = self._epoch_rows(self.epoch)
        first = int(np.searchsorted(before, self._offset))   # the position is always a row boundary
        batch = rows[first:first + self.world_size * self.micro_batch_size]
        self._offset = int(before[first + len(batch)])
        if self._offset == len(self.samples):
            self.epoch, self._offset = self.epoch + 1, 0
        share = np.array_split(np.arange(len(batch)), self.world_size)[self.rank]
        return self.collate_packed([batch[i] for i in share])

    def collate(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [B, T] int64 for these samples, T = their longest; x pads with pad_id, y with IGNORE_INDEX."""
        width = max(int(self.lengths[indices].max()), 1) if len(indices) else 1
        x = np.full((max(len(indices), 1), width), self.pad_id, dtype=np.int64)
        y = np.full_like(x, IGNORE_INDEX)
        for row, i in enumerate(indices):
            xi, yi = self.samples.xy(int(i))
            x[row, :len(xi)], y[row, :len(yi)] = xi, yi
        return torch.from_numpy(x), torch.from_numpy(y)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """x, y (padded) or x, y, segment_ids (packed): see collate and collate_packed."""
        if self.pack_len:
            return self._next_packed()
        stream = self._epoch_stream(self.epoch)
        batch = stream[self._offset:self._offset + self.world_size * self.micro_batch_size]
        self._offset += len(batch)
        if self._offset == len(stream):   # advance eagerly so `epoch` counts completed epochs
            self.epoch, self._offset = self.epoch + 1, 0
        return self.collate(np.array_split(batch, self.world_size)[self.rank])

    def eval_batches(self, n_samples: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(source, x, y) batches of this rank's share of the first `n_samples` samples in the fixed row_key
        order (a representative subset, the same for every seed and world size), source by source in name
        order, each source's samples in global batches of world_size x micro_batch_size. Every rank yields the
        same number of batches; a rank with nothing left gets an all-ignored [1, 1] batch, which adds 0 to a
        summed loss and 0 to its target count, so the all-reduced mean is exact and no rank waits on another."""
        order = np.argsort(self.samples.keys, kind="stable")[:n_samples]
        global_batch = self.world_size * self.micro_batch_size
        for name in sorted(set(self.sources[order])):
            chosen = order[self.sources[order] == name]
            for start in range(0, len(chosen), global_batch):
                chunk = chosen[start:start + global_batch]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                yield (str(name), *self.collate(np.array_split(chunk, self.world_size)[self.rank]))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.samples.fingerprint()
        return self._fingerprint

    def state_dict(self) -> dict:
        return {"kind": self.KIND, "epoch": self.epoch, "offset": self._offset, "seed": self.seed,
                "order_batch": self.order_batch, "bucket_batches": self.bucket_batches,
                "num_samples": len(self.samples), "fingerprint": self.fingerprint(), "pack_len": self.pack_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken, on any world size and micro batch. The seed, chunk size
        and bucketing of the saved run win (they define its order). Different data is refused."""
        if state.get("kind") != self.KIND or state.get("fingerprint") != self.fingerprint():
            raise SFTDataError(f"the checkpoint's data position is for other data ({state.get('num_samples')} "
                               f"samples, fingerprint {state.get('fingerprint')}) than this run's "
                               f"({len(self.samples)} samples, {self.fingerprint()}): resume with the same "
                               f"--data and max_seq_len, or start a new run with --init_from")
        self.seed, self.bucket_batches = int(state["seed"]), int(state["bucket_batches"])
        # checkpoints written before `offset` counted batches of `global_batch` samples (their order chunk)
        self.order_batch = int(state.get("order_batch", state.get("global_batch", 0)))
        self.epoch, self._stream, self._rows, self._epoch0_rows = int(state["epoch"]), None, None, None
        self._offset = int(state["offset"] if "offset" in state else state["batch"] * self.order_batch)
        if self._offset >= len(self.samples):   # an old checkpoint's epoch end (its epochs repeated a few samples)
            self.epoch, self._offset = self.epoch + 1, 0
        if state.get("pack_len", 0) != self.pack_len and self.rank == 0:   # packed <-> padded: another order
            print(f"note: data position saved with pack_len={state.get('pack_len', 0)}, resumed with "
                  f"{self.pack_len}: epoch {self.epoch} continues after as many samples, in another order",
                  file=sys.stderr)


def build_sft_datasets(path: str, tokenizer, max_seq_len: int, micro_batch_size: int, rank: int = 0,
                       world_size: int = 1, seed: int = 1337, val_fraction: float = 0.01,
                       bucket_batches: int = DEFAULT_BUCKET_BATCHES, progress: bool = True,
                       num_threads: int = -1, pack: bool = False) -> tuple[SFTDataset, SFTDataset | None, SFTStats]:
    """Read, tokenize and split an SFT CSV; (train, val or None when the split is empty, stats).
    Every rank builds the same samples (the order needs every length) and then reads its own shard.
    pack=True: training rows pack several samples into max_seq_len positions (validation stays padded)."""
    if not 0.0 <= val_fraction < 1.0:
        raise SFTDataError(f"--val_fraction={val_fraction}: must be in [0, 1)")
    if max_seq_len < 2:
        raise SFTDataError(f"max_seq_len={max_seq_len}: an SFT sample needs at least 2 positions")
    stats = SFTStats(path=path)
    train, val = tokenize_conversations(iter_sft_csv(path), tokenizer, max_seq_len, val_fraction, stats,
                                        progress, num_threads)
    stats.train_samples, stats.val_samples = len(train), len(val)
    if len(train) == 0:
        raise SFTDataError(f"{path}: all {stats.rows} rows fell in the validation split; "
                           f"lower --val_fraction")
    pad_id = tokenizer.special_tokens["<pad>"]
    sources = read_sources(path)
    train_ds = SFTDataset(train, micro_batch_size, rank, world_size, seed, pad_id, bucket_batches,
                          sources[train.rows] if sources is not None else None, pack_len=max_seq_len if pack else 0)
    val_ds = SFTDataset(val, micro_batch_size, rank, world_size, seed, pad_id, bucket_batches,
                        sources[val.rows] if sources is not None else None) if len(val) else None
    return train_ds, val_ds, stats


def train_and_val(data: str, val_data: str, val_fraction: float, build: Callable[[str, float], tuple],
                  rank: int) -> tuple:
    """(train, val or None) for sft.py and dpo.py: the train split of `data`, and validation from `val_data`
    (all its rows) or a held-out `val_fraction` of `data`; `val_data`='none' = no validation. build(path,
    fraction) returns (train, val or None, stats), e.g. build_sft_datasets with the run's settings."""
    separate_val = val_data.lower() not in ("", "none")
    train_ds, val_ds, stats = build(data, 0.0 if val_data else val_fraction)
    if rank == 0:
        print(stats.describe())
    if separate_val:
        # every row of --val_data is validation: its "train" split at fraction 0 holds them all
        val_ds, _, val_stats = build(val_data, 0.0)
        if rank == 0:
            print(val_stats.describe() + " (all used for validation)")
    if val_ds is None and rank == 0:
        why = "--val_data=none" if val_data else f"--val_fraction={val_fraction} selected no row"
        print(f"note: no validation data ({why}): no val loss, no best.pt", file=sys.stderr)
    return train_ds, val_ds


def main(argv: list[str] | None = None) -> int:
    """Summarise an SFT CSV as training would see it, and show its first sample's targets."""
    parser = argparse.ArgumentParser(description="Summarise an SFT CSV: sizes, truncation, one sample.")
    parser.add_argument("path", nargs="?", default="sft_data/sft_data.csv")
    parser.add_argument("--max_seq_len", type=int, default=512, help="model positions per sample")
    parser.add_argument("--tokenizer", default="chatglm_tokenizer", help="tokenizer folder")
    parser.add_argument("--val_fraction", type=float, default=0.01)
    args = parser.parse_args(argv)
    from chatglm_tokenizer import TokenizerError, load_tokenizer
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        train, _, stats = build_sft_datasets(args.path, tokenizer, args.max_seq_len, 1,
                                             val_fraction=args.val_fraction)
    except (SFTDataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(stats.describe())
    print("train:", train.describe())
    x, y = train.samples.xy(0)
    print("sample 0 input: ", tokenizer.decode_ids(x.tolist()))
    print("sample 0 learns:", tokenizer.decode_ids(y[y != IGNORE_INDEX].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
