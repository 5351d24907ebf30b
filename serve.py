"""Serve a model over the OpenAI API (chat and completions, streaming), with a web chat page at `/` and
optional retrieval from a knowledge file placed before each question.

    python serve.py --ckpt=out/sft/ckpt.pt                                   # http://127.0.0.1:8000/
    python serve.py --ckpt=out/sft/ckpt.pt --knowledge=data/medical_qa.jsonl --rag_top_k=3
    python serve.py --ckpt=out/hf --host=0.0.0.0 --port=8000 --api_key=$KEY  # reachable from the network
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "头痛怎么办？"}], "stream": true}'

Requests queue fairly: up to --max_active generate at once, stepped in turn by one worker thread, each
with its own KV cache (generation_queue.py); API details and extra response fields in openai_api.py;
the knowledge file format and its index cache in knowledge.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from inference import add_model_args, add_sampling_args, describe_model, load_for_inference, pick_device, run_main
from knowledge import KnowledgeBase
from openai_api import ModelServer, ServerConfig, create_app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_ckpt="out/sft/ckpt.pt")
    add_sampling_args(parser, max_new_tokens=256)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served_model_name", default=None,
                        help="the model id clients name (default: the checkpoint's folder name)")
    parser.add_argument("--api_key", default=os.environ.get("MCG_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1 (default: $MCG_API_KEY, else open)")
    parser.add_argument("--knowledge", default=None,
                        help="knowledge file for retrieval: text (a passage per paragraph) or JSON Lines")
    parser.add_argument("--rag_top_k", type=int, default=3, help="passages retrieved per question")
    parser.add_argument("--rebuild_index", action="store_true", help="rebuild the knowledge index even if cached")
    parser.add_argument("--max_tokens_limit", type=int, default=None,
                        help="the most max_tokens a request may ask for (default: the model's context)")
    parser.add_argument("--max_active", type=int, default=8, help="requests generating at once (the rest wait)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port={args.port}: must be 0-65535")
    for name in ("rag_top_k", "max_active", "max_tokens_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value}: must be >= 1")
    return args


def model_name(ckpt: str) -> str:
    path = os.path.abspath(ckpt)
    return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, tokenizer, meta = load_for_inference(args.ckpt, args.tokenizer, device, args.n_heads)
    print(describe_model(args.ckpt, model, meta), file=sys.stderr)
    knowledge = KnowledgeBase.open(args.knowledge, rebuild=args.rebuild_index) if args.knowledge else None
    config = ServerConfig(model_name=args.served_model_name or model_name(args.ckpt), temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                          max_tokens=args.max_new_tokens, max_tokens_limit=args.max_tokens_limit,
                          rag_top_k=args.rag_top_k, api_key=args.api_key, max_active=args.max_active,
                          dtype=args.dtype, seed=args.seed)
    server = ModelServer(model, tokenizer, device, config, knowledge)
    import uvicorn   # imported late: --help and argument errors stay fast
    print(f"serving '{config.model_name}' at http://{args.host}:{args.port}/ (OpenAI API under /v1)", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
