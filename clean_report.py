"""The report data_clean.py writes beside its decisions: report.json and report.md.

Counts per rule per source, the near-duplicate clusters' size histogram, and a few removed documents
beside what they duplicated (or the rule they failed), so a user can judge the cleaning before training.
"""
from __future__ import annotations

import json
import os

import numpy as np

from cleaning import NEAR_DUP_CODE, REASONS, iter_documents, split_keys
from corpus_io import CorpusSource, write_atomic_text

EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 300


def pick_examples(removed: list[np.ndarray]) -> list[dict]:
    """The first EXAMPLES_PER_REASON removed documents of each reason, in --corpus order."""
    examples = []
    for code in range(1, len(REASONS)):
        for s, rows in enumerate(removed):
            for row in rows[rows["reason"] == code][:EXAMPLES_PER_REASON - sum(e["code"] == code for e in examples)]:
                example = {"code": code, "reason": REASONS[code], "source": s, "file": int(row["file"]),
                           "record": int(row["record"])}
                if code == NEAR_DUP_CODE:
                    ks, kf, kr = (int(v[0]) for v in split_keys(np.array([row["kept"]], dtype=np.uint64)))
                    example.update(kept=[ks, kf, kr], jaccard=round(float(row["jaccard"]), 3))
                examples.append(example)
    return examples


def _fill_texts(sources: list[CorpusSource], examples: list[dict]) -> None:
    wanted: dict[tuple[int, int], set] = {}
    for e in examples:
        wanted.setdefault((e["source"], e["file"]), set()).add(e["record"])
        if "kept" in e:
            wanted.setdefault((e["kept"][0], e["kept"][1]), set()).add(e["kept"][2])
    arrays = {k: np.array(sorted(v), dtype=np.int64) for k, v in wanted.items()}
    texts = {(s, f, n): t for s, f, n, t in iter_documents(sources, lambda s, f: arrays.get((s, f), np.empty(0)))}
    for e in examples:
        e["text"] = texts.get((e["source"], e["file"], e["record"]), "")[:SNIPPET_CHARS]
        if "kept" in e:
            e["kept_text"] = texts.get(tuple(e["kept"]), "")[:SNIPPET_CHARS]


def write_report(out: str, sources: list[CorpusSource], summary: dict, removed: list[np.ndarray]) -> None:
    examples = pick_examples(removed)
    _fill_texts(sources, examples)
    labels = summary["labels"]
    for e in examples:
        e["where"] = f"{sources[e['source']].paths[e['file']]} record {e['record']}"
        if "kept" in e:
            s, f, n = e["kept"]
            e["kept_where"] = f"{sources[s].paths[f]} record {n}"
    report = {**summary, "examples": examples}
    write_atomic_text(os.path.join(out, "report.json"), json.dumps(report, ensure_ascii=False, indent=1))
    write_atomic_text(os.path.join(out, "report.md"), render_markdown(report, labels))


def render_markdown(report: dict, labels: list[str]) -> str:
    reasons = REASONS[1:]
    lines = ["# Data cleaning report", "", "## Documents per source", "",
             "| source | documents | kept | " + " | ".join(reasons) + " | malformed |",
             "|---|" + "---:|" * (len(reasons) + 3)]
    for label, s in zip(labels, report["sources"]):
        lines.append(f"| {label} | {s['documents']:,} | {s['kept']:,} | "
                     + " | ".join(f"{s['removed'].get(r, 0):,}" for r in reasons)
                     + f" | {sum(s['malformed'].values()):,} |")
    cfg = report["config"]
    lines += ["", "## Settings", "", f"```\n{json.dumps(cfg, ensure_ascii=False)}\n```", "",
              "## Near-duplicate clusters", "",
              f"Candidate pairs checked: {report['candidate_pairs']:,}.", "",
              "| cluster size | clusters |", "|---:|---:|"]
    lines += [f"| {size} | {n:,} |" for size, n in report["cluster_sizes"].items()] or ["| - | 0 |"]
    lines += ["", "## Examples of removed documents", ""]
    for e in report["examples"]:
        lines.append(f"- **{e['reason']}** — {labels[e['source']]}, {e['where']}")
        lines.append(f"  - removed: {_quote(e['text'])}")
        if "kept" in e:
            lines.append(f"  - kept (Jaccard of the match {e['jaccard']}): {e['kept_where']}: {_quote(e['kept_text'])}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", " ⏎ ")[:200] + "`"
