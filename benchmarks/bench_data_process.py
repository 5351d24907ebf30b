"""Throughput and memory of data_process.py against the seed project's way and the raw tokenizer limit.

    python benchmarks/bench_data_process.py                       # 50 MB corpus, plus the 200 MB RSS check
    python benchmarks/bench_data_process.py --size-mb=10 --flatness-mb=0    # a quick look

Builds a JSON Lines {"text"} corpus of --size-mb from real text (../shared/realdata/fever.txt cut into
documents of random length at random offsets, so no two are alike and dedup drops nothing), then measures,
each in its own subprocess so peak RSS is that method's alone:
  (a) the seed's way: ChatGLMTokenizer.encode per document, appended to one Python list, one np.array(uint16)
  (b) data_process.py with --workers=1 and --workers=2 (its start-up, measured on a one-document corpus,
      is subtracted)
  (c) the raw limit: sentencepiece batch encode on all cores, streamed to a uint16 file
and prints tokens/s, the ratio to (a), and peak RSS. Then it runs (b) with 2 workers on a --flatness-mb
corpus: peak RSS should not grow with corpus size. Targets (issue 3): (b, 2 workers) >= 0.8x (c) on a
2-core machine; RSS flat. Numbers on a shared machine are noisy: run it when the machine is quiet.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FEVER = os.path.join(os.path.dirname(REPO), "shared", "realdata", "fever.txt")


def build_corpus(path: str, size_mb: float, fever: str, seed: int = 0) -> int:
    """Write ~size_mb of JSON Lines documents cut from fever.txt; the number of documents."""
    with open(fever, encoding="utf-8") as f:
        text = "".join(line.strip() for line in f if line.strip())
    rng = random.Random(seed)
    target, written, docs = size_mb * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            length = rng.randint(200, 2000)
            start = rng.randrange(0, len(text) - length)
            line = json.dumps({"text": text[start:start + length]}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def measure(cmd: list[str]) -> dict:
    """Run `cmd`; its wall seconds, peak RSS in MB (largest process of its tree) and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}")
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


# ---------------------------------------------------------------- the methods, each run in a subprocess

def seed_way(corpus: str, out: str) -> dict:
    """(a) as the seed's data_process.py: per-document encode into one Python list."""
    import numpy as np
    from chatglm_tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    start = time.perf_counter()
    doc_ids: list[int] = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            text_id = tokenizer.encode(json.loads(line)["text"], add_special_tokens=False)
            text_id.append(tokenizer.special_tokens["<eos>"])
            if len(text_id) > 5:
                doc_ids += text_id
    arr = np.array(doc_ids, dtype=np.uint16)
    with open(out, "wb") as f:
        f.write(arr.tobytes())
    return {"tokens": len(arr), "seconds": time.perf_counter() - start}


def raw_limit(corpus: str, out: str, docs_per_batch: int = 2048) -> dict:
    """(c) sentencepiece batch encode with every core, streamed to a uint16 file."""
    import numpy as np
    from chatglm_tokenizer import load_tokenizer
    sp = load_tokenizer().tokenizer.sp_model
    threads = os.cpu_count() or 1
    start, tokens = time.perf_counter(), 0

    def flush(texts: list[str], f) -> int:
        flat: list[int] = []
        for ids in sp.encode(texts, num_threads=threads):
            flat += ids
            flat.append(2)
        f.write(np.array(flat, dtype="<u2").tobytes())
        return len(flat)
    with open(corpus, encoding="utf-8") as src, open(out, "wb") as f:
        texts: list[str] = []
        for line in src:
            texts.append(json.loads(line)["text"])
            if len(texts) == docs_per_batch:
                tokens += flush(texts, f)
                texts = []
        tokens += flush(texts, f)
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def run_data_process(corpus: str, out: str, workers: int) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "data_process.py"), f"--corpus=c4_zh={corpus}", f"--out={out}",
           f"--workers={workers}"]
    result = measure(cmd)
    result["tokens"] = 0
    for manifest in (os.path.splitext(out)[0] + ".json", os.path.splitext(out)[0] + "_val.json"):
        if os.path.exists(manifest):  # a tiny corpus has no val split
            with open(manifest, encoding="utf-8") as f:
                result["tokens"] += json.load(f)["tokens"]
    return result


# ---------------------------------------------------------------- the report

def bench(args: argparse.Namespace, work: str) -> None:
    corpus, tiny = os.path.join(work, "corpus.jsonl"), os.path.join(work, "tiny.jsonl")
    docs = build_corpus(corpus, args.size_mb, args.fever)
    build_corpus(tiny, 0.0001, args.fever)
    mb = os.path.getsize(corpus) / 1e6
    print(f"corpus: {mb:.1f} MB, {docs:,} documents (from {args.fever}); {os.cpu_count()} CPU cores")
    rows = []
    for label, mode in (("(a) seed: encode per doc + list", "seed"), ("(c) raw: sp batch encode, all cores", "raw")):
        r = measure([sys.executable, __file__, f"--mode={mode}", f"--corpus={corpus}",
                     f"--out={os.path.join(work, mode + '.bin')}"])
        inner = json.loads(r["stdout"].strip().splitlines()[-1])
        rows.append((label, inner["tokens"], r["wall"], r["wall"] - inner["seconds"], r["rss_mb"]))
    for workers in (1, 2):
        # start-up (imports, tokenizer load and check, pool start): the best of two one-document runs
        startup = min((run_data_process(tiny, os.path.join(work, f"tiny{workers}_{i}.bin"), workers)
                       for i in range(2)), key=lambda r: r["wall"])
        r = run_data_process(corpus, os.path.join(work, f"dp{workers}.bin"), workers)
        rows.append((f"(b) data_process --workers={workers}", r["tokens"], r["wall"], startup["wall"], r["rss_mb"],
                     startup["rss_mb"]))
    print_table(rows)
    if args.flatness_mb:
        flatness(args, work, rows)


def print_table(rows: list[tuple]) -> None:
    rate = {r[0]: r[1] / max(r[2] - r[3], 1e-9) for r in rows}
    seed = rate[rows[0][0]]
    print(f"{'method':<38}{'tokens':>13}{'wall s':>9}{'start-up s':>11}{'tokens/s':>12}{'x (a)':>8}"
          f"{'peak RSS MB':>13}")
    for r in rows:
        extra = f"  (start-up RSS {r[5]:.0f} MB)" if len(r) > 5 else ""
        print(f"{r[0]:<38}{r[1]:>13,}{r[2]:>9.1f}{r[3]:>11.1f}{rate[r[0]]:>12,.0f}{rate[r[0]] / seed:>8.2f}"
              f"{r[4]:>13.0f}{extra}")
    raw = rate["(c) raw: sp batch encode, all cores"]
    dp2 = rate["(b) data_process --workers=2"]
    print(f"data_process --workers=2 / raw limit (c), start-up subtracted: {dp2 / raw:.2f} (target >= 0.8)")


def flatness(args: argparse.Namespace, work: str, rows: list[tuple]) -> None:
    big = os.path.join(work, "big.jsonl")
    build_corpus(big, args.flatness_mb, args.fever, seed=1)
    r = run_data_process(big, os.path.join(work, "big.bin"), 2)
    small = next(row for row in rows if row[0] == "(b) data_process --workers=2")
    print(f"peak RSS, data_process --workers=2: {args.size_mb:g} MB corpus {small[4]:.0f} MB, "
          f"{args.flatness_mb:g} MB corpus {r['rss_mb']:.0f} MB (start-up {small[5]:.0f} MB); "
          f"{r['tokens'] / r['wall']:,.0f} tokens/s on the big one, start-up included")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=50.0, help="corpus size for the comparison")
    parser.add_argument("--flatness-mb", type=float, default=200.0, help="second corpus for the RSS check (0: skip)")
    parser.add_argument("--fever", default=FEVER, help="the real text the corpus is cut from")
    parser.add_argument("--workdir", default=None, help="where to build the corpora (default: a temp folder)")
    parser.add_argument("--mode", choices=["seed", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps((seed_way if args.mode == "seed" else raw_limit)(args.corpus, args.out)))
        return
    if not os.path.isfile(args.fever):
        raise SystemExit(f"error: {args.fever} not found (it lives in ../shared/realdata); pass --fever=PATH")
    work = tempfile.mkdtemp(prefix="bench_dp_", dir=args.workdir)
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
