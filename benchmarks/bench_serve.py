"""Serving throughput of serve.py at 1 and 8 concurrent streams, against model.generate called directly.

    python benchmarks/bench_serve.py                          # tiny preset, random weights, 64 tokens a stream
    python benchmarks/bench_serve.py --preset=92m --max_tokens=128 --device=cuda

serve.py runs as its own process on a free loopback port, on a randomly initialised (untied) checkpoint of
the preset; clients stream chat completions (greedy, distinct questions) through httpx. The baseline is
model.generate in this process on the same prompt and thread count, measured in rounds alternating with
the server's (medians count). The server does not batch: it steps the active requests in turn, so the
aggregate tokens/s at 8 streams should stay near one stream's, and the time to the first token shows that
all eight progress together instead of waiting for each other.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from chatglm_tokenizer import DEFAULT_TOKENIZER, resolve_tokenizer_dir, tokenizer_identity  # noqa: E402
from inference import load_for_inference, sft_prompt_ids  # noqa: E402
from model import Transformer, model_args_from_preset  # noqa: E402
from test_serve import serve  # noqa: E402  (starts serve.py on a free port and stops it)

QUESTIONS = ["头痛怎么办？", "感冒了怎么办？", "血压高吃什么？", "失眠怎么办？", "胃疼吃什么药？", "咳嗽不停怎么办？",
             "孩子发烧怎么办？", "腰疼怎么缓解？"]


def stream_once(url: str, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, completion tokens) of one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return first if first is not None else total, total, tokens


def concurrent(url: str, streams: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    threads = [threading.Thread(target=lambda q=q: results.append(stream_once(url, q, max_tokens)))
               for q in (QUESTIONS * streams)[:streams]]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return {"streams": streams, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_median_s": statistics.median(r[0] for r in results), "ttft_max_s": max(r[0] for r in results)}


def direct(model, tok, device: str, max_tokens: int) -> float:
    """tokens/s of model.generate on one prompt, greedy (the loop the server runs, without the server)."""
    ids, _ = sft_prompt_ids(tok, QUESTIONS[0], [], 10_000)
    start = time.perf_counter()
    new = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_tokens, temperature=0,
                         repetition_penalty=1.1)
    return new.shape[1] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max_tokens", type=int, default=64, help="tokens each stream asks for")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of direct, 1 stream, 8 streams (medians)")
    opts = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(opts.threads)   # the server process inherits it
    torch.set_num_threads(opts.threads)
    tokenizer_dir = resolve_tokenizer_dir(DEFAULT_TOKENIZER)
    tokenizer_identity(tokenizer_dir)   # fails early, with its own message, when the tokenizer is missing
    baselines, rows = [], {1: [], 8: []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt.pt")
        save_random_checkpoint(ckpt, tokenizer_dir, opts.preset)
        model, tok, _ = load_for_inference(ckpt, device=opts.device)
        direct(model, tok, opts.device, 4)                              # warm-up
        with serve(ckpt, f"--device={opts.device}", f"--max_new_tokens={opts.max_tokens}") as url:
            stream_once(url, QUESTIONS[0], 4)                           # warm-up
            for _ in range(opts.rounds):   # alternating, so a busy machine slows all three alike
                baselines.append(direct(model, tok, opts.device, opts.max_tokens))
                for streams in rows:
                    rows[streams].append(concurrent(url, streams, opts.max_tokens))
    baseline = statistics.median(baselines)
    print(f"preset {opts.preset}, {opts.device}, {opts.max_tokens} tokens a stream, {opts.threads} thread(s), "
          f"medians of {opts.rounds} rounds")
    print(f"model.generate directly: {baseline:.1f} tokens/s")
    for streams, runs in rows.items():
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        print(f"{streams} stream(s): {rate:.1f} tokens/s in all ({rate / baseline:.2f}x direct), time to first "
              f"text median {statistics.median(r['ttft_median_s'] for r in runs):.3f} s, "
              f"max {statistics.median(r['ttft_max_s'] for r in runs):.3f} s")


def save_random_checkpoint(path: str, tokenizer_dir: str, preset: str) -> None:
    """Random weights, untied (a tied random model greedily repeats the prompt's last token)."""
    torch.manual_seed(3)
    model = Transformer(model_args_from_preset(preset, tie_embeddings=False))
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.args), "config": {}, "step": 0,
                "tokenizer": tokenizer_identity(tokenizer_dir)}, path)


if __name__ == "__main__":
    main()
