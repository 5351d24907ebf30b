"""CPU training throughput of model.Transformer against transformers.LlamaForCausalLM of the same shape.

    python benchmarks/bench_train.py                      # tiny and 92m presets
    python benchmarks/bench_train.py --presets=tiny --steps=5

One training step = forward + backward + AdamW step on a [batch, seq] batch of random token ids, the same for
both models. The two models alternate step by step, so load from other processes on a shared machine slows
both alike; the median step time counts. Achieved FLOP/s (6N + attention per token, model.flops_per_token) is
shown as a share of a torch.mm peak measured in the same run. Target: ours >= 1.0x the HF baseline.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer, model_args_from_preset  # noqa: E402
from trainer import keep_freed_memory_on_cpu  # noqa: E402

SHAPES = {"tiny": (8, 256), "92m": (1, 512), "218m": (1, 512)}   # preset -> (batch, seq) on CPU


def mm_peak_flops(n: int = 2048, repeats: int = 8) -> float:
    """Best fp32 torch.mm FLOP/s of this machine right now (measured before and after the models: the best)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def hf_twin(args: ModelArgs) -> torch.nn.Module:
    """LlamaForCausalLM with exactly our shape (tied embedding, GQA, SwiGLU width, RoPE theta)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_seq_len,
                         rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).train()


def make_step(model: torch.nn.Module, hf: bool, x: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss if hf else model(x, x)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step


def bench_preset(name: str, steps: int) -> dict:
    """Median tokens/s of our model and its HF twin on the same batch, alternating step by step."""
    batch, seq = SHAPES[name]
    args = model_args_from_preset(name, max_seq_len=seq)
    torch.manual_seed(0)
    ours = Transformer(args).train()
    x = torch.randint(0, args.vocab_size, (batch, seq))
    runners = {"ours": make_step(ours, False, x), "hf": make_step(hf_twin(args), True, x)}
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for i in range(steps + 1):   # step 0 warms up (allocator, lazy init) and is not counted
        for key, run in runners.items():
            elapsed = run()
            if i:
                times[key].append(elapsed)
    return {"name": name, "batch": batch, "seq": seq, "params": ours.num_params(),
            "flops_per_token": ours.flops_per_token(seq),
            "tok_s": {k: batch * seq / statistics.median(v) for k, v in times.items()}}


def format_row(result: dict, peak: float) -> str:
    tok_s = result["tok_s"]
    share = {k: result["flops_per_token"] * v / peak for k, v in tok_s.items()}
    return (f"{result['name']:<6}{result['batch']:>4} x {result['seq']:<5}{result['params'] / 1e6:>8.1f}M"
            f"{tok_s['ours']:>12,.0f}{tok_s['hf']:>12,.0f}{tok_s['ours'] / tok_s['hf']:>9.2f}x"
            f"{share['ours']:>10.0%}{share['hf']:>9.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,92m", help="comma-separated model presets")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model (after 1 warm-up)")
    parser.add_argument("--default_malloc", action="store_true",
                        help="leave glibc's malloc as it is (pretrain.py tunes it on CPU, see trainer.py)")
    opts = parser.parse_args(argv)
    allocator = "glibc default" if opts.default_malloc or not keep_freed_memory_on_cpu() else "freed memory kept"
    peak = mm_peak_flops()
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, malloc: {allocator}; median of {opts.steps} steps "
          f"(fwd + bwd + AdamW), the two models alternating step by step")
    results = [bench_preset(name.strip(), opts.steps) for name in opts.presets.split(",")]
    peak = max(peak, mm_peak_flops())   # a busy machine at the start must not inflate the shares
    print(f"fp32 torch.mm peak {peak / 1e9:.1f} GFLOP/s (best of before and after the models)")
    print(f"{'preset':<6}{'batch x seq':>12}{'params':>9}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>10}"
          f"{'ours/peak':>10}{'HF/peak':>9}")
    for result in results:
        print(format_row(result, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
