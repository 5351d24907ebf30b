"""Quality filtering and near-duplicate removal for the pretraining corpora: decisions + report, no copies.

    python data_clean.py --corpus wiki=/d/wikipedia-cn-20230720-filtered.json \\
      --corpus baidubaike=/d/563w_baidubaike.json --corpus wudao='/d/WuDaoCorpus2.0_base_200G/*.json' \\
      --workers 32 --out data/clean/                       # decisions + report, default rules
    python data_clean.py ... --near_dedup=none --quality=none   # each part can be turned off
    python data_clean.py ... --shard 3/8                  # signature pass of shard 3 of 8 (one per machine)
    python data_clean.py ... --merge --shards 8           # after all 8: the decisions
    python data_process.py --corpus ... --clean=data/clean/    # tokenizes only the kept documents

Reads the same `--corpus NAME=PATH` registry as data_process.py (bad records skipped, counted and shown
as `file:line: reason`; --strict stops instead). Each document is edited (boilerplate lines dropped,
punctuation runs collapsed), judged by the quality rules (quality.py; each threshold is a flag below),
and the survivors are deduplicated across all corpora together: MinHash over character 3-gram shingles,
LSH bands, every candidate pair checked against its exact shingle Jaccard (>= --near_dedup), clusters
joined, the first document of each cluster in --corpus order kept (minhash.py, cleaning.py).

Output in --out: decisions.json (inputs' sizes and fingerprints, settings, counts), one
source-N-NAME.removed.npy per source (removed documents: file, record, reason, the kept document of its
cluster, the document it matched and their Jaccard), report.md / report.json, and shards/ (the resumable
signature pass; kill -9 and the same command continues). --write_jsonl also writes kept.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys

import cleaning
import quality
from corpus_io import CorpusError, ensure_output_folder, parse_corpus_spec

RULE_FLAGS = {"min_chars": int, "min_chinese": float, "max_dup_line_chars": float, "max_dup_5gram_chars": float,
              "max_dup_10gram_chars": float, "max_symbols": float, "max_digits": float, "max_url_chars": float,
              "max_boilerplate": float}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH_OR_GLOB", required=True,
                        help="a corpus to clean (repeatable; python data_process.py --list-corpora)")
    parser.add_argument("--out", default=os.path.join("data", "clean"), help="decisions folder (%(default)s)")
    parser.add_argument("--near_dedup", default="0.4",
                        help="Jaccard of 3-gram shingle sets at or above which documents are near-duplicates, "
                             "or none (default %(default)s)")
    parser.add_argument("--quality", default="all",
                        help="quality rules: all, none (also no edits), or a comma list of " + ", ".join(quality.RULE_NAMES))
    defaults = quality.QualityConfig()
    for name, kind in RULE_FLAGS.items():
        rule = next(r for r in quality.RULES if f"--{name} " in r.about + " ")
        parser.add_argument(f"--{name}", type=kind, default=getattr(defaults, name),
                            help=f"rule {rule.name}: removed when {rule.about} (default %(default)s)")
    parser.add_argument("--shingle", type=int, default=3, help="characters per shingle (default %(default)s)")
    parser.add_argument("--workers", type=int, default=_usable_cpus(), help="processes (default %(default)s)")
    parser.add_argument("--batch_docs", type=int, default=cleaning.BATCH_DOCS,
                        help="documents per worker task (default %(default)s)")
    parser.add_argument("--shard", default=None, metavar="I/N", help="run only the signature pass of shard I of N")
    parser.add_argument("--merge", action="store_true", help="merge the finished shards into decisions")
    parser.add_argument("--shards", type=int, default=None, help="with --merge: how many shards there were")
    parser.add_argument("--write_jsonl", action="store_true", help="also write the kept documents to OUT/kept.jsonl")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    return parser.parse_args(argv)


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_config(args: argparse.Namespace) -> cleaning.CleanConfig:
    """The settings from the flags; CorpusError naming the flag when one is out of range."""
    from minhash import lsh_params
    threshold = None
    if args.near_dedup != "none":
        try:
            threshold = float(args.near_dedup)
        except ValueError:
            threshold = -1.0
        if not 0 < threshold <= 1:
            raise CorpusError(f"--near_dedup must be a Jaccard in (0, 1] or none, got {args.near_dedup!r}")
    if args.quality == "none":
        rules: tuple[str, ...] = ()
    elif args.quality == "all":
        rules = tuple(quality.RULE_NAMES)
    else:
        rules = tuple(r.strip() for r in args.quality.split(",") if r.strip())
        unknown = [r for r in rules if r not in quality.RULE_NAMES]
        if unknown:
            raise CorpusError(f"--quality: unknown rule {unknown[0]!r}; known: {', '.join(quality.RULE_NAMES)}")
    if min(args.shingle, args.workers, args.batch_docs) < 1:
        raise CorpusError("--shingle, --workers and --batch_docs must be at least 1")
    for name, kind in RULE_FLAGS.items():
        value = getattr(args, name)
        if value < 0 or (kind is float and value > 1):
            allowed = "at least 0" if kind is int else "a fraction in [0, 1]"
            raise CorpusError(f"--{name}={value}: must be {allowed}")
    qcfg = quality.QualityConfig(**{name: getattr(args, name) for name in RULE_FLAGS}) if rules else None
    bands, rows = lsh_params(threshold) if threshold else (1, 1)
    return cleaning.CleanConfig(qcfg, rules, threshold, args.shingle, bands, rows)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise CorpusError(f"--shard must be I/N (like 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise CorpusError(f"--shard {text}: I must be in 0..N-1")
    return index, count


def run(args: argparse.Namespace) -> dict | None:
    cfg = build_config(args)
    sources = [parse_corpus_spec(spec) for spec in args.corpus]
    cleaning.check_limits(sources)
    ensure_output_folder(os.path.join(args.out, "decisions.json"))
    described = cleaning.describe_sources(sources)
    key = cleaning.run_key(described, cfg)
    shard = parse_shard(args.shard)
    if not args.merge:
        shard_run = cleaning.signature_pass(sources, cfg, key, args.out, shard, args.workers, args.strict,
                                              args.batch_docs)
        if args.shard is not None:
            judged = sum(sum(c.values()) for c in shard_run.counts)
            print(f"shard {shard[0]}/{shard[1]} done: {judged:,} documents judged; merge with "
                  f"--merge --shards {shard[1]} once every shard is done")
            return None
    n_shards = args.shards or shard[1]
    summary = cleaning.merge(sources, cfg, key, described, args.out, n_shards, args.workers)
    if args.write_jsonl:
        plan = cleaning.CleanPlan.load(args.out, sources)
        written = cleaning.write_kept_jsonl(sources, plan, os.path.join(args.out, "kept.jsonl"))
        print(f"wrote {os.path.join(args.out, 'kept.jsonl')}: {written:,} documents")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (CorpusError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last commit", file=sys.stderr)
        return 130
    if summary is None:
        return 0
    documents = sum(s["documents"] for s in summary["sources"])
    if documents == 0:
        print("error: no readable document in any --corpus", file=sys.stderr)
        return 1
    kept = sum(s["kept"] for s in summary["sources"])
    print(f"kept {kept:,} of {documents:,} documents ({documents - kept:,} removed); "
          f"decisions and report in {args.out} (report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
