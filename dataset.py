"""Pretraining batches from token .bin files: memory-mapped, windowed, shuffled per epoch, sharded per rank.

    python dataset.py data/pretrain_data.bin            # summary: files, tokens, windows, tokenizer
    python dataset.py "data/part_*.bin" --seq_len=1024

    from dataset import PretrainDataset, resolve_bin_paths
    ds = PretrainDataset(resolve_bin_paths("data/pretrain_data.bin"), max_seq_len=512, micro_batch_size=16,
                         rank=0, world_size=1, seed=1337)
    x, y = ds.next_batch()          # [16, 512] int64 each; y[:, t] = x[:, t + 1] (the next token)

A .bin is raw little-endian uint16 token ids (DESIGN.md); `x/foo.json` beside `x/foo.bin` is its manifest,
written by data_process.py, naming the tokenizer (sha256, vocab size) that made it. Files are np.memmap'ed,
never read into RAM, so a corpus larger than memory trains fine.

Windows. File f is cut into windows of max_seq_len + 1 tokens starting every max_seq_len tokens, so
consecutive windows share one token: the last input token of a window predicts the first token of the next
window, and no next-token target is lost at a window edge. Windows never span two files. The < max_seq_len + 1
tokens left at a file's end are reported (`tail_tokens`), not trained on.

Order. Epoch e is a permutation of all N windows seeded by (seed, e); the epochs are laid end to end into one
global stream. A micro batch of W ranks x B windows takes the next W * B stream positions, rank r those with
p % W == r, so ranks read disjoint windows that together cover each epoch exactly once, and an epoch boundary
can fall inside a batch (nothing is dropped or repeated to make epochs divide evenly). The position is one
number, `position` (stream positions all ranks have read together), the same on every rank and for any world
size: a run resumed on another number of ranks continues the stream exactly, each window still once per epoch.

Validation. eval_batches(n) scores about n windows chosen by eval_windows: per source (the manifest records
where each data_process.py --corpus sits in the file; a window counts for the source of its first token), a
share proportional to the source's size, spread evenly over it. The choice depends on the file only, so every
world size scores the same windows, and every source is scored.

Manifest policy. A .bin whose manifest names another tokenizer than the run's is refused (one line naming both).
A .bin without a manifest (e.g. made by the seed project) is accepted with a warning when the run names its
tokenizer (--tokenizer): its largest token id is then checked against that vocabulary instead. Without either,
it is refused: nothing would say which tokenizer the ids belong to.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Iterator

import numpy as np
import torch

from tokenfile import (DataError, data_tokenizer, max_token, open_tokens, read_manifest, resolve_bin_paths,
                       source_layout)

class PretrainDataset:
    """BatchSource (see trainer.py) of next-token windows over one or many .bin files, for one rank."""

    def __init__(self, paths: list[str] | str, max_seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1337, tokenizer: dict | None = None, log: bool = True):
        if max_seq_len < 1 or micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad batch geometry: max_seq_len={max_seq_len} micro_batch_size={micro_batch_size} "
                            f"rank={rank} world_size={world_size}")
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self.seq_len, self.micro_batch_size = max_seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.tokenizer = data_tokenizer(self.paths, tokenizer, log=log and rank == 0)
        self._tokens = [open_tokens(p, read_manifest(p)) for p in self.paths]
        self._check_ids()
        per_file = np.array([max(len(t) - 1, 0) // max_seq_len for t in self._tokens], dtype=np.int64)
        self._first_window = np.concatenate([[0], np.cumsum(per_file)])   # [files + 1]
        self.n_windows = int(self._first_window[-1])
        self.n_tokens = sum(len(t) for t in self._tokens)
        self.tail_tokens = sum(len(t) - (n * max_seq_len + 1 if n else 0) for t, n in zip(self._tokens, per_file))
        if self.n_windows == 0:
            raise DataError(f"{', '.join(self.paths)}: {self.n_tokens} tokens make no window of max_seq_len+1="
                            f"{max_seq_len + 1} tokens; use more data or a smaller --seq_len")
        self.position = 0   # stream positions all ranks together have read; identical on every rank
        self._orders: dict[int, np.ndarray] = {}
        self._source_windows: dict[str, np.ndarray] | None = None

    def _check_ids(self) -> None:
        """A manifest-less file has not been vouched for: its ids must fit the vocabulary."""
        vocab = self.tokenizer["vocab_size"]
        for path, tokens in zip(self.paths, self._tokens):
            highest = max_token(tokens) if read_manifest(path) is None and len(tokens) else 0
            if highest >= vocab:
                raise DataError(f"{path}: token id {highest} >= vocab {vocab} of "
                                f"{self.tokenizer.get('path')}: the file was made with another tokenizer")

    def __len__(self) -> int:
        """Micro batches per epoch on this rank."""
        return math.ceil(self.n_windows / (self.world_size * self.micro_batch_size))

    @property
    def num_samples(self) -> int:
        """Windows per epoch, all ranks together."""
        return self.n_windows

    @property
    def consumed(self) -> int:
        """Windows this rank has read (the same on every rank)."""
        return self.position // self.world_size

    @property
    def epoch(self) -> int:
        """The epoch the next window of this rank comes from (0-based)."""
        return (self.position + self.rank) // self.n_windows

    def _order(self, epoch: int) -> np.ndarray:
        """Window indices of `epoch` in training order (cached: the current epoch and the next)."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            index_dtype = np.int32 if self.n_windows < 2 ** 31 else np.int64
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = rng.permutation(self.n_windows).astype(index_dtype)
        return self._orders[epoch]

    def window(self, index: int) -> np.ndarray:
        """Window `index` (0 <= index < n_windows): max_seq_len + 1 consecutive tokens of one file."""
        f = int(np.searchsorted(self._first_window, index, side="right")) - 1
        start = (index - int(self._first_window[f])) * self.seq_len
        return self._tokens[f][start:start + self.seq_len + 1]

    def _collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.window(i) for i in indices]).astype(np.int64)   # [B, T + 1]
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # [B, T] each

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [micro_batch_size, max_seq_len] int64: this rank's next windows of the global stream."""
        indices = []
        for k in range(self.micro_batch_size):
            position = self.position + k * self.world_size + self.rank     # in the global stream
            indices.append(int(self._order(position // self.n_windows)[position % self.n_windows]))
        self.position += self.micro_batch_size * self.world_size
        return self._collate(indices)

    def source_windows(self) -> dict[str, np.ndarray]:
        """Window indices of each source, in file order (the manifest says where each source's tokens sit; a
        file without sources is one source named after it). A window counts for the source of its first token."""
        if self._source_windows is None:
            found: dict[str, list[np.ndarray]] = {}
            for f, (path, tokens) in enumerate(zip(self.paths, self._tokens)):
                first_window = int(self._first_window[f])
                starts = np.arange(int(self._first_window[f + 1]) - first_window, dtype=np.int64) * self.seq_len
                for name, start, end in source_layout(path, len(tokens)):
                    inside = np.nonzero((starts >= start) & (starts < end))[0] + first_window
                    if len(inside):
                        found.setdefault(name, []).append(inside)
            self._source_windows = {name: np.concatenate(parts) for name, parts in found.items()}
        return self._source_windows

    def eval_windows(self, n_samples: int) -> dict[str, np.ndarray]:
        """The windows an evaluation of about `n_samples` windows scores, per source: a share proportional to the
        source's windows (at least one), spread evenly over it, so the whole file is seen, every source is scored,
        and the choice is the same for any world size."""
        chosen = {}
        for name, windows in self.source_windows().items():
            k = min(len(windows), max(1, round(n_samples * len(windows) / self.n_windows)))
            chosen[name] = windows[((np.arange(k) + 0.5) * len(windows) / k).astype(np.int64)]
        return chosen

    def eval_batches(self, n_samples: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(source, x, y) micro batches of this rank's share of eval_windows(n_samples): each source's windows cut
        into world_size contiguous parts. Every rank yields the same sources in the same order and as many
        batches; a rank whose part is shorter gets a batch without targets, which adds nothing to the loss."""
        for name, windows in self.eval_windows(n_samples).items():
            mine = np.array_split(windows, self.world_size)[self.rank]
            for start in range(0, -(-len(windows) // self.world_size), self.micro_batch_size):
                part = mine[start:start + self.micro_batch_size].tolist()
                if part:
                    yield (name, *self._collate(part))
                else:
                    yield name, torch.zeros((1, 1), dtype=torch.int64), torch.full((1, 1), -100, dtype=torch.int64)

    def describe(self) -> str:
        """One line for the start-of-run summary."""
        return (f"{self.n_tokens:,} tokens in {len(self.paths)} file(s) -> {self.n_windows:,} windows of "
                f"{self.seq_len}+1 ({self.tail_tokens:,} tail tokens unused); tokenizer "
                f"{self.tokenizer.get('path')} (vocab {self.tokenizer['vocab_size']})")

    def state_dict(self) -> dict:
        return {"kind": "pretrain", "position": self.position, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken, on any world size (the saved seed wins: it defines the
        order). Other data is refused."""
        if state.get("kind") != "pretrain" or (state.get("n_windows"), state.get("seq_len")) != \
                (self.n_windows, self.seq_len):
            raise DataError(f"the checkpoint's data position is for other data ({state.get('n_windows')} windows "
                            f"of {state.get('seq_len')}) than this run's ({self.n_windows} of {self.seq_len}): "
                            f"resume with the same --data and --seq_len, or start a new run with --init_from")
        self.seed, self._orders = int(state["seed"]), {}
        # checkpoints written before `position` counted this rank's windows, `consumed`, of `world_size` ranks
        self.position = int(state["position"] if "position" in state else state["consumed"] * state["world_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise pretraining .bin files.")
    parser.add_argument("data", help="one or more .bin files or globs, comma-separated")
    parser.add_argument("--seq_len", type=int, default=512)
    opts = parser.parse_args(argv)
    try:
        ds = PretrainDataset(resolve_bin_paths(opts.data), opts.seq_len, micro_batch_size=1)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(ds.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
