"""Near-duplicate detection in numpy: character n-gram shingles, MinHash signatures, LSH bands, exact checks.

    from minhash import shingle_hashes, signatures, band_keys, shingle_tokens, lsh_params
    doc, h = shingle_hashes(texts, n=3)            # one 64-bit hash per shingle, and which text it came from
    bands, rows = lsh_params(threshold=0.4)        # 60 bands of 3 rows
    keys = band_keys(signatures(doc, h, len(texts), bands * rows), bands, rows)   # [texts, bands] uint64
    tokens, counts = shingle_tokens(doc, h, len(texts))   # each text's 32-bit shingle tokens, for exact checks

Every step works on a whole batch of documents at once (one numpy call per step, no Python loop per
character or per permutation), which is what makes it ~100x faster than datasketch's per-update MinHash.

- Shingles: the text is normalised (NFKC, so full-width letters and digits become ASCII; lower case; all
  whitespace, punctuation and symbols removed, so editing those changes nothing), then every run of n
  characters is one shingle, hashed to 64 bits (splitmix64 over the code points).
- Signatures: one-permutation MinHash (Li, Owen & Zhang 2012) with rotation densification (Shrivastava &
  Li 2014): one hash per shingle splits the shingles into K bins, each bin keeps its minimum; an empty bin
  borrows from the next non-empty bin to its right. Two texts agree on a bin with probability equal to
  their Jaccard similarity, like K independent permutations, at the cost of one hash per shingle.
- Bands: r consecutive bins hashed together; texts sharing any band key are candidates
  (P = 1 - (1 - J^r)^b). Candidates are then checked against their exact shingle overlap, so the bands
  only need recall, and lsh_params picks them for 98% recall at the threshold.
"""
from __future__ import annotations

import math
import re
import unicodedata

import numpy as np

_NOT_CONTENT = re.compile(r"[\W_]+")
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LOW32 = np.uint64(0xFFFFFFFF)
EMPTY = np.uint64(np.iinfo(np.uint64).max)


def normalise(text: str) -> str:
    """NFKC, lower case, and only letters and digits kept (whitespace, punctuation, symbols dropped)."""
    return _NOT_CONTENT.sub("", unicodedata.normalize("NFKC", text).lower())


_TABLE: np.ndarray | None = None


def _char_table() -> np.ndarray:
    """normalise() of every BMP character as one code point (0: dropped; a character whose NFKC form is
    several characters, like ㈱, is kept as it is). Built once per process, ~0.1 s."""
    global _TABLE
    if _TABLE is None:
        table = np.arange(1 << 16, dtype=np.uint32)
        for c in range(1 << 16):
            ch = chr(c)
            if 0xD800 <= c < 0xE000:
                table[c] = 0
            elif not unicodedata.is_normalized("NFKC", ch) or not ch.isalnum() or ch != ch.lower():
                mapped = normalise(ch)   # the slow path, for the few characters that change
                table[c] = ord(mapped) if len(mapped) == 1 else 0 if not mapped else c
        _TABLE = table
    return _TABLE


def normalised_codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """normalise() of each text as code points (uint64), concatenated, and the lengths: one table lookup
    per character instead of Python string work. Characters beyond the BMP (rare CJK, emoji) are kept."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    mapped = np.where(codes < (1 << 16), _char_table()[np.minimum(codes, (1 << 16) - 1)], codes)
    keep = mapped != 0
    doc = np.repeat(np.arange(len(texts)), lengths)
    return mapped[keep].astype(np.uint64), np.bincount(doc[keep], minlength=len(texts)).astype(np.int64)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (a bijection that spreads every input bit)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every n-character shingle of each normalised text, and the index of its text.
    A normalised text shorter than n is one shingle; an empty one has none."""
    content, lengths = normalised_codes(texts)
    # each text followed by n-1 zeros, so a short text is one zero-padded shingle
    doc_of = np.repeat(np.arange(len(texts)), lengths)
    codes = np.zeros(len(content) + len(texts) * (n - 1), dtype=np.uint64)
    codes[np.arange(len(content)) + doc_of * (n - 1)] = content
    starts = np.concatenate([[0], np.cumsum(lengths + n - 1)[:-1]]) if len(texts) else np.zeros(0, np.int64)
    counts = np.where(lengths > 0, np.maximum(lengths - n + 1, 1), 0)
    doc = np.repeat(np.arange(len(texts)), counts)
    # position of each shingle in `codes`: its text's start plus its offset within the text
    pos = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
    h = codes[pos]
    for k in range(1, n):
        h = h * _GOLDEN + codes[pos + k]
    return doc, mix64(h)


def signatures(doc: np.ndarray, h: np.ndarray, n_docs: int, n_bins: int) -> np.ndarray:
    """[n_docs, n_bins] one-permutation MinHash signatures (densified); rows of texts without shingles
    are all EMPTY."""
    bins = (((h >> np.uint64(32)) * np.uint64(n_bins)) >> np.uint64(32)).astype(np.int64)
    sig = np.full(n_docs * n_bins, EMPTY, dtype=np.uint64)
    np.minimum.at(sig, doc * n_bins + bins, h & _LOW32)
    sig = sig.reshape(n_docs, n_bins)
    return _densify(sig)


def _densify(sig: np.ndarray) -> np.ndarray:
    """Fill each empty bin from the next non-empty bin to its right (circularly), offset by the distance,
    so two texts' bins still agree with probability equal to their Jaccard similarity."""
    n_docs, k = sig.shape
    filled = sig != EMPTY
    if filled.all():
        return sig
    cols = np.arange(2 * k)
    idx = np.where(np.concatenate([filled, filled], axis=1), cols, 4 * k)
    nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, :k]   # next filled column at or after j
    has_any = filled.any(axis=1)
    nxt = np.where(has_any[:, None], nxt, np.arange(k))
    distance = (nxt - np.arange(k)).astype(np.uint64)
    out = np.take_along_axis(sig, nxt % k, axis=1) + (distance << np.uint64(32))
    out[~has_any] = EMPTY
    return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n_docs, bands] uint64: each band's `rows` bins hashed into one key."""
    grouped = sig[:, :bands * rows].reshape(len(sig), bands, rows)
    key = np.zeros((len(sig), bands), dtype=np.uint64)
    for r in range(rows):
        key = mix64(key * _GOLDEN + grouped[:, :, r])
    return key


def shingle_tokens(doc: np.ndarray, h: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text's shingles as 32-bit tokens (the low half of the hash), in text order and concatenated,
    and their number per text: what the exact check of a candidate pair compares (sorting them into sets
    is left to that check, which only candidates reach)."""
    return (h & _LOW32).astype(np.uint32), np.bincount(doc, minlength=n_docs)


def token_set(tokens: np.ndarray) -> np.ndarray:
    """The sorted unique values of a token array (a sort and a neighbour compare: for the few hundred
    tokens of a document several times faster than np.unique)."""
    ordered = np.sort(tokens)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) else ordered


def jaccard(a: np.ndarray, b: np.ndarray, as_sets: bool = False) -> float:
    """Exact Jaccard similarity of two token arrays as sets (`as_sets`: both already token_set()s)."""
    if not as_sets:
        a, b = token_set(a), token_set(b)
    if len(a) == 0 or len(b) == 0:
        return 0.0
    if len(a) > len(b):
        a, b = b, a
    idx = np.searchsorted(b, a)
    inter = int((b[np.minimum(idx, len(b) - 1)] == a).sum())
    return inter / (len(a) + len(b) - inter)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The share of signature bins on which two texts agree: an estimate of their Jaccard similarity."""
    return float((sig_a == sig_b).mean())


def candidate_probability(jaccard_value: float, bands: int, rows: int) -> float:
    """P(two texts of this Jaccard similarity share at least one band key)."""
    return 1.0 - (1.0 - jaccard_value ** rows) ** bands


def lsh_params(threshold: float, recall: float = 0.98, max_bands: int = 64) -> tuple[int, int]:
    """(bands, rows) for `recall` at `threshold` with at most `max_bands` bands: the most rows per band
    (fewest candidates among dissimilar texts) that still allows it."""
    best = (max_bands, 1)
    for rows in range(1, 64):
        p = threshold ** rows
        if p >= 1.0:
            return 1, rows
        bands = math.ceil(math.log(1.0 - recall) / math.log(1.0 - p))
        if bands > max_bands:
            break
        best = (bands, rows)
    return best


def band_pairs(hashes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Candidate pairs [m, 2] (smaller key first) among documents sharing a band hash: in each group of
    equal hashes (ordered by key) every member is paired with the group's first and with the member just
    before it, so pairs stay linear in the group size while each group stays connected."""
    order = np.lexsort((keys, hashes))
    hs, ks = hashes[order], keys[order]
    same = np.concatenate([[False], hs[1:] == hs[:-1]])
    group_start = np.maximum.accumulate(np.where(~same, np.arange(len(hs)), 0))
    members = np.flatnonzero(same)
    prev = np.stack([ks[members - 1], ks[members]], axis=1)
    first = np.stack([ks[group_start[members]], ks[members]], axis=1)
    first = first[group_start[members] != members - 1]
    return np.concatenate([prev, first]).astype(np.uint64)


def components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph whose edges are `pairs` (uint64 keys): (nodes sorted, the
    smallest node of each node's component)."""
    nodes = np.unique(pairs)
    a = np.searchsorted(nodes, pairs[:, 0])
    b = np.searchsorted(nodes, pairs[:, 1])
    label = np.arange(len(nodes))
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:  # pointer jumping: every node points at its label's label until that settles
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new
