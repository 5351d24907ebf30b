"""data_clean.py against the seed project's MinHash dedup: speed, memory, and what each removes.

    python benchmarks/bench_clean.py                        # quality; speed at 16k docs; memory at 16k and 64k
    python benchmarks/bench_clean.py --docs=2000 --big=0    # a quick look

The seed's method, reimplemented here as the baseline: datasketch MinHash with 256 permutations updated
once per character of the text (so a document is its set of single characters), MinHashLSH with
threshold 0.85, a document dropped when the index already holds a match. It gets both cores for the
signatures (a pool of 2) and the index in the main process.

(1) Speed: a JSON Lines corpus of --docs documents generated from real text (../shared/realdata) by an
    order-2 character Markov chain goes through the baseline and through `data_clean.py` with its default
    settings and --workers=2, each in its own subprocess; documents/s of each and the ratio; peak RSS of
    data_clean.py for --docs and --big documents (it should not grow with the corpus).
    It also runs datasketch at our settings (3-gram shingles, update_batch, 180 permutations,
    MinHashLSH at 0.4), to compare the engines.
(2) Quality: real documents (fever.txt paragraphs, medical Q&A, Wikipedia/Baike/WuDao records), made
    genuinely distinct (of any pair with exact 3-gram Jaccard >= 0.3 one is dropped), and planted
    near-duplicates of a third of them (5-10% of characters edited, two sentences swapped, boilerplate
    lines added or removed). Recall of the planted pairs and the share of distinct documents removed, for
    each method (data_clean.py with --quality=none, so only near-dedup is compared).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
REALDATA = os.path.join(os.path.dirname(REPO), "shared", "realdata")
BOILERPLATE = ["版权所有 © 2023 健康网 保留所有权利", "点击查看更多相关文章", "首页 > 疾病百科 > 传染病",
               "扫一扫，关注微信公众号", "上一篇：流行性感冒的预防  下一篇：麻疹的护理", "免责声明：本文仅供参考"]


# ---------------------------------------------------------------- real documents and planted copies

def real_documents(realdata: str = REALDATA) -> list[str]:
    """Real documents of at least 100 characters from ../shared/realdata."""
    from corpus_io import iter_corpus_texts
    formats = os.path.join(realdata, "formats")
    specs = [f"txt={realdata}/fever.txt",
             f"wiki={formats}/wikipedia_cn/wikipedia-cn-20230720-filtered.json",
             f"baidubaike={formats}/baidubaike_563w/563w_baidubaike.json",
             f"wudao={formats}/wudao/part-sample.json",
             f"medical={formats}/medical_pretrain/pretrain/train_encyclopedia.json",
             f"jsonl:response={formats}/chatmed_consult/ChatMed_Consult-v0.3.json"]
    docs = list(iter_corpus_texts(specs))
    with open(os.path.join(realdata, "medical_sft_1K_format.jsonl"), encoding="utf-8") as f:
        for line in f:
            turns = json.loads(line)["conversations"]
            docs.append(turns[0]["value"] + "\n" + turns[1]["value"])
    return [d for d in docs if len(d) >= 100]


def shingle_set(text: str, n: int = 3) -> set:
    from minhash import normalise
    t = normalise(text)
    return {t[i:i + n] for i in range(max(len(t) - n + 1, 1))}


def distinct(docs: list[str], below: float = 0.3) -> list[str]:
    """Drop any document whose exact 3-gram Jaccard with an earlier kept one is >= `below`."""
    kept, sets = [], []
    for doc in docs:
        s = shingle_set(doc)
        if all(len(s & o) / len(s | o) < below for o in sets):
            kept.append(doc)
            sets.append(s)
    return kept


def edit_chars(text: str, share: float, rng: random.Random) -> str:
    """Replace, delete or insert a character at `share` of the positions; new characters are drawn from
    the text itself, as a rewording mostly uses the words around it (and so the seed's character sets are
    not favoured or penalised by rare characters)."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), int(share * len(chars))):
        op = rng.random()
        chars[i] = rng.choice(text) if op < 1 / 3 else "" if op < 2 / 3 else chars[i] + rng.choice(text)
    return "".join(chars)


def swap_sentences(text: str, rng: random.Random) -> str:
    parts = [p for p in re.split(r"(?<=[。！？；\n])", text) if p]
    if len(parts) > 2:
        i = rng.randrange(len(parts) - 1)
        parts[i], parts[i + 1] = parts[i + 1], parts[i]
    return "".join(parts)


def plant(doc: str, rng: random.Random) -> tuple[str, str]:
    """(original as it appears in the corpus, its near-duplicate copy): 5-10% of the characters edited,
    two sentences swapped, and boilerplate lines added to one of the two."""
    copy = swap_sentences(edit_chars(doc, rng.uniform(0.05, 0.10), rng), rng)
    boiler = "\n".join(rng.sample(BOILERPLATE, 2))
    if rng.random() < 0.5:
        return doc, copy + "\n" + boiler
    return boiler + "\n" + doc, copy


def planted_corpus(docs: list[str], share: float, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """The documents in random order with planted copies of `share` of them; (texts, [(original, copy)])."""
    rng = random.Random(seed)
    texts = list(docs)
    pairs = []
    for i in rng.sample(range(len(docs)), int(share * len(docs))):
        texts[i], copy = plant(docs[i], rng)
        texts.append(copy)
        pairs.append((i, len(texts) - 1))
    order = list(range(len(texts)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    return [texts[i] for i in order], [(where[a], where[b]) for a, b in pairs]


def write_jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- the seed's method

# (num_perm, threshold, shingle): the seed's settings, one update per character; and datasketch at our
# settings (3-gram shingles of the normalised text, one update_batch per document), to compare engines
DATASKETCH = {"seed": (256, 0.85, None), "datasketch3": (180, 0.4, 3)}


def _datasketch_signature(text: str, num_perm: int, shingle: int | None):
    from datasketch import MinHash
    m = MinHash(num_perm=num_perm)
    if shingle is None:
        for ch in text:
            m.update(ch.encode("utf-8"))
    else:
        from minhash import normalise
        t = normalise(text)
        m.update_batch([t[i:i + shingle].encode("utf-8") for i in range(max(len(t) - shingle + 1, 1))])
    return m


def datasketch_dedup(texts: list[str], engine: str = "seed", workers: int = 2) -> list[bool]:
    """MinHash dedup with datasketch (signatures in a pool, MinHashLSH in this process): True where a
    document is removed because the index already holds a match."""
    from functools import partial
    from multiprocessing import Pool
    from datasketch import MinHashLSH
    num_perm, threshold, shingle = DATASKETCH[engine]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed = []
    with Pool(workers) as pool:
        signature = partial(_datasketch_signature, num_perm=num_perm, shingle=shingle)
        for i, m in enumerate(pool.imap(signature, texts, chunksize=16)):
            dup = bool(lsh.query(m))
            if not dup:
                lsh.insert(str(i), m)
            removed.append(dup)
    return removed


def ours_removed(corpus: str, out: str, extra: list[str]) -> list[bool]:
    """Run data_clean.py on a one-file JSON Lines corpus; True where a line's document was removed."""
    import numpy as np
    cmd = [sys.executable, os.path.join(REPO, "data_clean.py"), f"--corpus=jsonl:text={corpus}", f"--out={out}",
           "--workers=2", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "decisions.json"), encoding="utf-8") as f:
        rows = np.load(os.path.join(out, json.load(f)["sources"][0]["removed_file"]))
    with open(corpus, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    removed = [False] * n
    for record in rows["record"].tolist():
        removed[record - 1] = True
    return removed


# ---------------------------------------------------------------- measurements

# Runs the command from a small fresh interpreter and reports its peak RSS: measured directly from this
# process, a child's high-water mark would include this (large) process's pages from before its exec.
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MB, largest process of the tree) of a command."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}")
    return {"wall": time.perf_counter() - start, "rss_mb": int(done.stdout.split()[-1]) / 1024}


def speed_corpus(path: str, n_docs: int, pool: list[str], seed: int = 0) -> None:
    """n_docs documents of 202-1202 characters generated by an order-2 character Markov chain trained on
    the real documents: Chinese-like text at any scale, as different from each other as distinct real
    documents on one topic (sentences cut from a small pool would make every document a partial copy
    of hundreds of others once the corpus outgrows the pool)."""
    import numpy as np
    codes = np.frombuffer("".join(pool).encode("utf-32-le"), dtype="<u4")
    vocab, ids = np.unique(codes, return_inverse=True)
    v = len(vocab)
    context = ids[:-2].astype(np.int64) * v + ids[1:-1]
    order = np.argsort(context, kind="stable")
    contexts, starts, counts = np.unique(context[order], return_index=True, return_counts=True)
    following = ids[2:][order]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(200, 1201, n_docs)
    at = rng.integers(0, len(contexts), n_docs)          # every document walks the chain at once
    out = np.empty((n_docs, lengths.max() + 2), dtype=np.int32)
    out[:, 0], out[:, 1] = contexts[at] // v, contexts[at] % v
    for step in range(2, lengths.max() + 2):
        nxt = following[starts[at] + (rng.random(n_docs) * counts[at]).astype(np.int64)]
        out[:, step] = nxt
        state = out[:, step - 1].astype(np.int64) * v + nxt
        pos = np.minimum(np.searchsorted(contexts, state), len(contexts) - 1)
        at = np.where(contexts[pos] == state, pos, rng.integers(0, len(contexts), n_docs))  # dead end: jump
    write_jsonl(path, [vocab[row[:n + 2]].astype("<u4").tobytes().decode("utf-32-le")
                       for row, n in zip(out, lengths.tolist())])


def ours(corpus: str, out: str) -> dict:
    """data_clean.py with its defaults and --workers=2, run as its signature pass and then its merge, so
    each phase's peak RSS shows."""
    cmd = [sys.executable, os.path.join(REPO, "data_clean.py"), f"--corpus=jsonl:text={corpus}", f"--out={out}",
           "--workers=2"]
    signatures, merge = measure(cmd + ["--shard=0/1"]), measure(cmd + ["--merge"])
    return {"wall": signatures["wall"] + merge["wall"], "pass_mb": signatures["rss_mb"], "merge_mb": merge["rss_mb"]}


def run_speed(tmp: str, n_docs: int, big: int, pool: list[str]) -> None:
    corpus = os.path.join(tmp, "speed.jsonl")
    speed_corpus(corpus, n_docs, pool)
    with open(corpus, encoding="utf-8") as f:
        chars = sum(len(json.loads(line)["text"]) for line in f)
    seed = measure([sys.executable, __file__, "--engine-only=seed", corpus])
    engine = measure([sys.executable, __file__, "--engine-only=datasketch3", corpus])
    small = ours(corpus, f"{tmp}/speed_out")
    print(f"speed on {n_docs:,} documents ({chars / n_docs:.0f} characters each on average), 2 cores:")
    print(f"  seed (datasketch 256 perm, per-character, LSH 0.85): {n_docs / seed['wall']:8.0f} docs/s  "
          f"peak RSS {seed['rss_mb']:.0f} MB")
    print(f"  datasketch, our shingles (180 perm, 3-grams, 0.4):   {n_docs / engine['wall']:8.0f} docs/s  "
          f"peak RSS {engine['rss_mb']:.0f} MB (near-dedup only, no exact check)")
    print(f"  data_clean.py (defaults, --workers=2):              {n_docs / small['wall']:8.0f} docs/s  "
          f"= {seed['wall'] / small['wall']:.1f}x the seed")
    print(f"  peak RSS of data_clean.py on {n_docs:,} documents: signature pass {small['pass_mb']:.0f} MB, "
          f"merge {small['merge_mb']:.0f} MB")
    if big:
        speed_corpus(corpus, big, pool, seed=1)
        large = ours(corpus, f"{tmp}/big_out")
        print(f"  on {big:,} documents: {big / large['wall']:.0f} docs/s; peak RSS signature pass "
              f"{large['pass_mb']:.0f} MB, merge {large['merge_mb']:.0f} MB")


def run_quality(tmp: str) -> None:
    docs = distinct(real_documents())
    texts, pairs = planted_corpus(docs, share=1 / 3)
    corpus = os.path.join(tmp, "quality.jsonl")
    write_jsonl(corpus, texts)
    copies = {b for _, b in pairs}
    originals = [i for i in range(len(texts)) if i not in copies]
    print(f"quality: {len(docs):,} distinct real documents, {len(pairs):,} planted near-duplicates")
    for name, removed in (("seed (datasketch, chars, 0.85)", datasketch_dedup(texts, "seed")),
                          ("datasketch, 3-grams, 0.4", datasketch_dedup(texts, "datasketch3")),
                          ("data_clean.py (--quality=none)", ours_removed(corpus, f"{tmp}/q_out", ["--quality=none"]))):
        recall = sum(removed[a] or removed[b] for a, b in pairs) / len(pairs)
        # a pair counts once one of its two is gone; a distinct document wrongly removed is an original
        # removed although its planted copy (if any) was kept, or a document that never had a copy
        partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
        false = sum(1 for i in originals if removed[i] and (i not in partner or removed[partner[i]]))
        print(f"  {name:32s} recall {recall:.3f}   distinct documents removed {false} "
              f"({100 * false / len(originals):.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=16000)
    parser.add_argument("--big", type=int, default=64000)
    parser.add_argument("--engine-only", default=None, choices=list(DATASKETCH), help=argparse.SUPPRESS)
    parser.add_argument("corpus", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_only:
        with open(args.corpus, encoding="utf-8") as f:
            datasketch_dedup([json.loads(line)["text"] for line in f], args.engine_only)
        return
    pool = real_documents()
    with tempfile.TemporaryDirectory() as tmp:
        run_quality(tmp)
        run_speed(tmp, args.docs, args.big, pool)


if __name__ == "__main__":
    main()
