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
global stream. Rank r of W takes the stream positions p with p % W == r, so ranks read disjoint windows that
together cover each epoch exactly once, and an epoch boundary can fall inside a batch (nothing is dropped or
repeated to make epochs divide evenly). The position is one number, `consumed` (windows this rank has read, the
same on every rank), so a checkpoint's data state is rank-independent and restoring it continues exactly.

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

from tokenfile import DataError, data_tokenizer, max_token, open_tokens, read_manifest, resolve_bin_paths

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
        self.consumed = 0   # windows this rank has read; identical on every rank
        self._orders: dict[int, np.ndarray] = {}

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
    def epoch(self) -> int:
        """The epoch the next window of this rank comes from (0-based)."""
        return (self.consumed * self.world_size + self.rank) // self.n_windows

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
            position = (self.consumed + k) * self.world_size + self.rank     # in the global stream
            indices.append(int(self._order(position // self.n_windows)[position % self.n_windows]))
        self.consumed += self.micro_batch_size
        return self._collate(indices)

    def eval_batches(self, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Up to `max_batches` batches of this rank's share in file order (rank r: windows r, r + W, ...).
        Every rank yields the same number of batches of the same sizes."""
        per_rank = self.n_windows // self.world_size
        for start in range(0, min(per_rank, max_batches * self.micro_batch_size), self.micro_batch_size):
            count = min(self.micro_batch_size, per_rank - start)
            yield self._collate([(start + k) * self.world_size + self.rank for k in range(count)])

    def describe(self) -> str:
        """One line for the start-of-run summary."""
        return (f"{self.n_tokens:,} tokens in {len(self.paths)} file(s) -> {self.n_windows:,} windows of "
                f"{self.seq_len}+1 ({self.tail_tokens:,} tail tokens unused); tokenizer "
                f"{self.tokenizer.get('path')} (vocab {self.tokenizer['vocab_size']})")

    def state_dict(self) -> dict:
        return {"kind": "pretrain", "consumed": self.consumed, "world_size": self.world_size,
                "seed": self.seed, "n_windows": self.n_windows, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (the saved seed wins: it defines the order). Other data
        is refused; another world size keeps the global stream position (exact when it divides evenly)."""
        if state.get("kind") != "pretrain" or (state.get("n_windows"), state.get("seq_len")) != \
                (self.n_windows, self.seq_len):
            raise DataError(f"the checkpoint's data position is for other data ({state.get('n_windows')} windows "
                            f"of {state.get('seq_len')}) than this run's ({self.n_windows} of {self.seq_len}): "
                            f"resume with the same --data and --seq_len, or start a new run with --init_from")
        self.seed, self._orders = int(state["seed"]), {}
        global_position = int(state["consumed"]) * int(state["world_size"])
        self.consumed = global_position // self.world_size
        if state["world_size"] != self.world_size and self.rank == 0:
            print(f"note: data position saved with world_size={state['world_size']}, resumed with "
                  f"{self.world_size}: continuing at global window {self.consumed * self.world_size:,} "
                  f"of the stream (saved: {global_position:,})", file=sys.stderr)


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
