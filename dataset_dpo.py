"""DPO batches from sft_data/dpo_data.csv: each pair as two SFT samples sharing one context, in one batch.

    from dataset_dpo import build_dpo_datasets
    train_ds, val_ds, stats = build_dpo_datasets("sft_data/dpo_data.csv", tok, max_seq_len=512,
                                                 micro_batch_size=4, rank=0, world_size=1, seed=1337)
    x, y = train_ds.next_batch()   # [2B, T]: rows 0..B-1 the chosen answers, rows B..2B-1 the rejected ones

dpo.py builds these and hands them to trainer.train with a dpo_loss.DPOLoss. A CSV row (prompt, chosen,
rejected, history) is laid out exactly as an SFT row would be with `chosen` (then `rejected`) as its answer
(dataset_sft.layout_sample): `history… prompt <bos> answer <eos>`; y marks the last answer's tokens and its
`<eos>` (and the earlier answers, which dpo_loss ignores: it scores only the final answer, see
DPODataset.collate). Both samples of a pair are truncated together so that they keep the very same context:
the longer answer decides how many old turns and prompt tokens go (dataset_sft.fit_turns), then the shorter
answer is cut only if it still does not fit. The order, sharding, length grouping and exact resume are
SFTDataset's, over pairs (a pair's length is its longer sample's); validation is scored per `source` too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from dataset_sft import (DEFAULT_BUCKET_BATCHES, IGNORE_INDEX, Cut, SampleAccumulator, SFTDataError, SFTDataset,
                         SFTSamples, SFTStats, Turn, encode_turns, fit_turns, iter_csv_answers, layout_sample,
                         read_sources, row_key)


@dataclass
class DPOStats(SFTStats):
    """SFTStats counted per pair (a pair is truncated when either of its samples is)."""

    def describe(self) -> str:
        return super().describe().replace("conversations", "preference pairs").replace(
            "learned (answers + <eos>)", "in chosen and rejected answers + <eos>")


def fit_pair(context: list[Turn], chosen: list[int], rejected: list[int],
             max_ids: int) -> tuple[list[Turn], list[Turn], Cut, bool, bool]:
    """The two conversations `context + (prompt, answer)` truncated to max_ids ids with one shared context.
    Returns (chosen turns, rejected turns, the cut of the longer, chosen answer cut, rejected answer cut)."""
    longer_is_chosen = len(chosen) >= len(rejected)
    prompt = context[-1].prompt
    earlier = context[:-1]
    kept, cut = fit_turns(earlier + [Turn(prompt, chosen if longer_is_chosen else rejected)], max_ids)
    shared = kept[:-1]
    context_ids = sum(len(t.prompt) + len(t.answer) + 2 for t in shared) + len(kept[-1].prompt) + 1
    shorter = rejected if longer_is_chosen else chosen
    shorter_cut = context_ids + len(shorter) + 1 > max_ids
    if shorter_cut:
        shorter = shorter[:max_ids - context_ids]   # the <eos> slot goes to the answer: no <eos> now
    pair = [kept, shared + [Turn(kept[-1].prompt, shorter)]]
    cuts = [cut.answer_cut, shorter_cut]
    if not longer_is_chosen:
        pair.reverse()
        cuts.reverse()
    return pair[0], pair[1], cut, cuts[0], cuts[1]


def tokenize_pairs(chunks: Iterable[list[list]], tokenizer, max_seq_len: int, val_fraction: float,
                   stats: DPOStats, progress: bool = True) -> tuple[tuple[SFTSamples, SFTSamples], ...]:
    """((train chosen, train rejected), (val chosen, val rejected)) from chunks of (chosen conversations,
    rejected conversations); index i of a chosen and a rejected SFTSamples is the same pair."""
    bos, eos = tokenizer.special_tokens["<bos>"], tokenizer.special_tokens["<eos>"]
    id_dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    splits = {"train": [SampleAccumulator(id_dtype), SampleAccumulator(id_dtype)],
              "val": [SampleAccumulator(id_dtype), SampleAccumulator(id_dtype)]}
    val_below = int(val_fraction * 2.0 ** 64)
    with tqdm(desc="tokenizing DPO data", unit=" pairs", disable=not progress) as bar:
        for chosen_chunk, rejected_chunk in chunks:
            encoded_chosen = encode_turns(tokenizer, chosen_chunk, -1)
            encoded_rejected = encode_turns(tokenizer, [turns[-1:] for turns in rejected_chunk], -1)
            for text_turns, rejected_text, turns, rejected in zip(chosen_chunk, rejected_chunk, encoded_chosen,
                                                                  encoded_rejected):
                chosen_turns, rejected_turns, cut, chosen_cut, rejected_cut = fit_pair(
                    turns, turns[-1].answer, rejected[0].answer, max_seq_len + 1)
                key = row_key(text_turns + rejected_text[-1:])
                target = splits["val" if key < val_below else "train"]
                stats.rows += 1
                stats.count(Cut(cut.turns_dropped, cut.prompt_tokens_cut, chosen_cut or rejected_cut))
                for acc, kept, answer_cut in zip(target, (chosen_turns, rejected_turns), (chosen_cut, rejected_cut)):
                    ids, learn = layout_sample(kept, bos, eos, answer_cut)
                    stats.tokens += len(ids)
                    stats.target_tokens += len(kept[-1].answer) + (not answer_cut)   # the last answer, <eos>
                    acc.add(ids, learn, key, stats.rows - 1)
            for acc in splits["train"] + splits["val"]:
                acc.flush()
            bar.update(len(chosen_chunk))
    return tuple((chosen.finish(), rejected.finish()) for chosen, rejected in splits.values())


class DPODataset(SFTDataset):
    """BatchSource (trainer.py) over pairs: SFTDataset's order and sharding, a batch of B pairs is
    x, y [2B, T] with the chosen samples first. Only the final answer of each sample is a target in y
    (earlier answers of the history are context here: DPO compares the two last answers)."""
    KIND = "dpo"

    def __init__(self, chosen: SFTSamples, rejected: SFTSamples, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1337, pad_id: int = 0,
                 bucket_batches: int = DEFAULT_BUCKET_BATCHES, sources: np.ndarray | None = None):
        if len(chosen) != len(rejected):
            raise SFTDataError(f"{len(chosen)} chosen but {len(rejected)} rejected samples")
        super().__init__(chosen, micro_batch_size, rank, world_size, seed, pad_id, bucket_batches, sources)
        self.rejected = rejected
        self.lengths = np.maximum(chosen.lengths, rejected.lengths)

    def describe(self) -> str:
        return super().describe().replace("conversations", "preference pairs (x2 samples)")

    def collate(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [2B, T] int64: chosen rows then rejected rows; a rank with no pairs gets one all-ignored pair."""
        width = max(int(self.lengths[indices].max()), 1) if len(indices) else 1
        rows = max(len(indices), 1)
        x = np.full((2 * rows, width), self.pad_id, dtype=np.int64)
        y = np.full_like(x, IGNORE_INDEX)
        for half, samples in enumerate((self.samples, self.rejected)):
            for row, i in enumerate(indices):
                xi, yi = samples.xy(int(i))
                x[half * rows + row, :len(xi)] = xi
                y[half * rows + row, :len(yi)] = last_answer_targets(xi, yi)
        return torch.from_numpy(x), torch.from_numpy(y)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=8)
            digest.update((self.samples.fingerprint() + self.rejected.fingerprint()).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def last_answer_targets(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y with only the last answer's targets kept: everything up to the last ignored target before the final
    run of targets becomes IGNORE_INDEX (the final run is the last answer and its <eos>)."""
    ignored = np.flatnonzero(y == IGNORE_INDEX)
    out = y.copy()
    if len(ignored):
        out[:ignored[-1]] = IGNORE_INDEX
    return out


def build_dpo_datasets(path: str, tokenizer, max_seq_len: int, micro_batch_size: int, rank: int = 0,
                       world_size: int = 1, seed: int = 1337, val_fraction: float = 0.01,
                       bucket_batches: int = DEFAULT_BUCKET_BATCHES,
                       progress: bool = True) -> tuple[DPODataset, DPODataset | None, DPOStats]:
    """Read, tokenize and split a preference CSV; (train, val or None when the split is empty, stats)."""
    if not 0.0 <= val_fraction < 1.0:
        raise SFTDataError(f"--val_fraction={val_fraction}: must be in [0, 1)")
    if max_seq_len < 2:
        raise SFTDataError(f"max_seq_len={max_seq_len}: a DPO sample needs at least 2 positions")
    stats = DPOStats(path=path)
    chunks = iter_csv_answers(path, ("chosen", "rejected"))
    (train_c, train_r), (val_c, val_r) = tokenize_pairs(chunks, tokenizer, max_seq_len, val_fraction, stats,
                                                        progress)
    stats.train_samples, stats.val_samples = len(train_c), len(val_c)
    if len(train_c) == 0:
        raise SFTDataError(f"{path}: all {stats.rows} pairs fell in the validation split; lower --val_fraction")
    pad_id, sources = tokenizer.special_tokens["<pad>"], read_sources(path)
    train_ds = DPODataset(train_c, train_r, micro_batch_size, rank, world_size, seed, pad_id, bucket_batches,
                          sources[train_c.rows] if sources is not None else None)
    val_ds = DPODataset(val_c, val_r, micro_batch_size, rank, world_size, seed, pad_id, bucket_batches,
                        sources[val_c.rows] if sources is not None else None) if len(val_c) else None
    return train_ds, val_ds, stats
