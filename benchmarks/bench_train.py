"""CPU training speed and memory of model.Transformer against transformers.LlamaForCausalLM of the same shape.

    python benchmarks/bench_train.py                      # tiny (16 x 256) and 92m (16 x 512)
    python benchmarks/bench_train.py --presets=tiny --steps=5 --batch=16

One training step = forward + backward + AdamW step on a [batch, seq] batch of random token ids (micro batch
16 at the preset's full sequence length by default), the same for both models; ours computes its loss with the
fused output layer + cross-entropy (fused_ce.py), HF's from full fp32 logits. Speed: the two models alternate
step by step, so load from other processes on a shared machine slows both alike; the median step time counts.
Achieved FLOP/s (6N + attention per token, model.flops_per_token) is shown as a share of a torch.mm peak
measured in the same run. Memory: each model runs one step in a fresh process; its peak RSS minus its RSS with
the model built is what the step needs (gradients, AdamW state, activations, logits), with glibc set to return
every freed tensor to the OS (track_live_memory) so that the peak is that of the live tensors. Targets (issue 12):
ours >= 1.2x HF's tokens/s and <= 1/4 of HF's step memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer, model_args_from_preset  # noqa: E402
from trainer import keep_freed_memory_on_cpu  # noqa: E402

SEQ = {"tiny": 256, "92m": 512, "218m": 1024}   # preset -> full sequence length


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


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def track_live_memory() -> None:
    """Make RSS follow the live tensors: with glibc's mmap threshold fixed at 1 MiB every tensor of 1 MiB or more
    is a mapping of its own, returned to the OS when freed. By default the threshold adapts to freed blocks and
    later ones are carved out of the heap, whose freed holes stay resident: the peak then depends on the order
    of past allocations and frees (by 300-900 MB in one 92m step) rather than on what the step holds."""
    import ctypes
    m_mmap_threshold = -3   # mallopt parameter number from <malloc.h>
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 2 ** 20)


def step_memory_mb(name: str, which: str, batch: int, seq: int) -> float:
    """Peak RSS of one training step minus the RSS with the model built, measured in this (fresh) process."""
    track_live_memory()
    args = model_args_from_preset(name, max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(args).train() if which == "ours" else hf_twin(args)
    x = torch.randint(0, args.vocab_size, (batch, seq))
    built = rss_mb()
    make_step(model, which == "hf", x)()
    return peak_rss_mb() - built


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM). Not getrusage's ru_maxrss: a child started with vfork + exec (as
    subprocess does) inherits its parent's high-water mark there, so it would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure_memory(name: str, which: str, batch: int, seq: int) -> float:
    """step_memory_mb in a child process, so one model's peak never hides the other's."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_memory={name},{which},{batch},{seq}"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["step_mb"]


def bench_preset(name: str, steps: int, batch: int) -> dict:
    """Median tokens/s of our model and its HF twin on the same batch, alternating step by step, and the
    memory each one's step needs."""
    seq = SEQ[name]
    memory = {which: measure_memory(name, which, batch, seq) for which in ("ours", "hf")}
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
            "flops_per_token": ours.flops_per_token(seq), "memory": memory,
            "tok_s": {k: batch * seq / statistics.median(v) for k, v in times.items()}}


def format_row(result: dict, peak: float) -> str:
    tok_s = result["tok_s"]
    share = {k: result["flops_per_token"] * v / peak for k, v in tok_s.items()}
    return (f"{result['name']:<6}{result['batch']:>4} x {result['seq']:<5}{result['params'] / 1e6:>8.1f}M"
            f"{tok_s['ours']:>12,.0f}{tok_s['hf']:>12,.0f}{tok_s['ours'] / tok_s['hf']:>9.2f}x"
            f"{share['ours']:>10.0%}{share['hf']:>9.0%}{result['memory']['ours']:>10,.0f}"
            f"{result['memory']['hf']:>10,.0f}{result['memory']['ours'] / result['memory']['hf']:>8.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,92m", help="comma-separated model presets")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=16, help="micro batch (sequences of the full seq length)")
    parser.add_argument("--default_malloc", action="store_true",
                        help="leave glibc's malloc as it is (pretrain.py tunes it on CPU, see trainer.py)")
    parser.add_argument("--_memory", default="", help=argparse.SUPPRESS)   # child: preset,which,batch,seq
    opts = parser.parse_args(argv)
    if opts._memory:
        name, which, batch, seq = opts._memory.split(",")
        print(json.dumps({"step_mb": step_memory_mb(name, which, int(batch), int(seq))}))
        return 0
    allocator = "glibc default" if opts.default_malloc or not keep_freed_memory_on_cpu() else "freed memory kept"
    peak = mm_peak_flops()
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, malloc: {allocator}; median of {opts.steps} steps "
          f"(fwd + bwd + AdamW), the two models alternating step by step")
    results = [bench_preset(name.strip(), opts.steps, opts.batch) for name in opts.presets.split(",")]
    peak = max(peak, mm_peak_flops())   # a busy machine at the start must not inflate the shares
    print(f"fp32 torch.mm peak {peak / 1e9:.1f} GFLOP/s (best of before and after the models)")
    print(f"{'preset':<6}{'batch x seq':>12}{'params':>9}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>10}"
          f"{'ours/peak':>10}{'HF/peak':>9}{'ours MB':>10}{'HF MB':>10}{'ratio':>9}")
    for result in results:
        print(format_row(result, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
