"""The Llama2-style network, its presets, generation with a KV cache, and the one checkpoint loader.

Read top to bottom: ModelArgs and PRESETS, RMSNorm, rotary helpers, Attention, FeedForward, Block,
Transformer (forward, generation), then loading weights (this repo's checkpoints, LoRA ones merged into
the base weights they record, the seed project's plain state dicts, exported Hugging Face folders).

    python model.py                      # parameter and FLOP table of every preset
    python model.py --ckpt=out/pretrain/ckpt.pt   # what a checkpoint holds (kind, ModelArgs, size)

    from model import Transformer, model_args_from_preset, load_model
    model = Transformer(model_args_from_preset("tiny"))
    logits, _ = model(tokens)                       # logits [B, T, vocab_size]
    _, loss = model(tokens, targets)                # targets: [B, T] int64, -100 = ignore; no logits made
    model, meta = load_model("out/sft/ckpt.pt")     # or a seed .pth, or an exported HF folder
    new_ids = model.generate(prompt_ids[None], max_new_tokens=100, temperature=0.7, top_p=0.9)

Parameter names follow the seed project / llama2.c (tok_embeddings, layers.N.attention.wq, ...), so the
seed's `torch.save(model.state_dict())` files load unchanged. Rotary embeddings rotate interleaved pairs
(x0, x1), (x2, x3), ... as llama2.c does; export_hf.py permutes wq/wk rows for Hugging Face's
rotate-half layout. The embedding has exactly `vocab_size` rows (no padding), so logits, state dicts and
exports always have the shapes users expect and generation can only produce real token ids.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from fused_ce import linear_cross_entropy, target_log_probs
from lora import merge_state_dict, weights_sha256


@dataclass
class ModelArgs:
    """Shape of the network; stored as a plain dict (asdict) in every checkpoint."""
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None      # None = n_heads (plain multi-head attention); fewer = GQA
    vocab_size: int = 64794            # the REAL vocabulary size (tokenizer.vocab_size)
    hidden_dim: int | None = None      # None = llama2 rule: 2/3 * 4 * dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True        # output projection shares the token embedding matrix

    def __post_init__(self) -> None:
        positive = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model arg {name} must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model arg dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size dim/n_heads={self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"model arg n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model arg dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


PRESETS: dict[str, ModelArgs] = {
    # tests and the CPU demo: the 64,794-row embedding is most of it; n_kv_heads=2 exercises GQA
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # the seed's "Llama2-Chinese-92M" (92M counts the tied embedding twice; it is 58.5M)
    "92m": ModelArgs(dim=512, n_layers=8, n_heads=8, max_seq_len=512),
    # the seed's "Llama2-Chinese-218M"
    "218m": ModelArgs(dim=1024, n_layers=12, n_heads=8, max_seq_len=1024),
}


def model_args_from_preset(name: str, **overrides) -> ModelArgs:
    """A copy of PRESETS[name] with some fields replaced, e.g. model_args_from_preset("tiny", dropout=0.1)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(ModelArgs)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model arg(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """weight * normalise(x), normalised in fp32 even under bf16 autocast (the order of operations of HF's
    LlamaRMSNorm). Written out because autograd's own graph of it keeps the normalised x [B, T, dim] for the
    backward pass besides x; this keeps x and the per-position 1/rms [B, T, 1] only and recomputes the rest
    (one [B, T, dim] tensor less per norm; tests/test_activation_memory.py checks the gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))        # fp32, or fp64 in gradcheck
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)    # [B, T, 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).type_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd                                 # [B, T, dim]
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.type_as(x)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(rstd.dtype)                           # d loss / d normed
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def precompute_rope(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim // 2]: angle of pair i at position p."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, head_dim] by the angles of cos/sin: [T, head_dim/2]
    (every row at the same positions) or [B, T, head_dim/2] (positions per row, e.g. restarting in packed rows)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)             # [B, T, H, head_dim/2, 2]
    x0, x1 = pairs.unbind(-1)                                   # each [B, T, H, head_dim/2]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]                         # [1, T, head_dim/2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]           # [B or 1, T, 1, head_dim/2]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, T, H, head_dim/2, 2]
    return rotated.flatten(-2).type_as(x)                       # [B, T, H, head_dim]


class KVCache:
    """Keys and values of one layer for positions already seen, preallocated to max_seq_len."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None   # [B, n_kv_heads, max_seq_len, head_dim]
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, max_seq_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_heads, T, head_dim] at start_pos; return all keys/values up to start_pos + T."""
        if self.k is None or self.k.shape[0] != k.shape[0] or self.k.dtype != k.dtype:
            # allocated lazily so the cache takes the dtype k has under autocast
            shape = (k.shape[0], k.shape[1], max_seq_len, k.shape[3])
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# With a KV cache every decoding step has a new key length. cuDNN's attention (tried first on H100) builds a
# plan per new shape, ~65 ms each (measured: 92m decoded at 67 ms/token with it, 7 ms without), so cached
# calls use the kernels that take any shape.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.max_seq_len = args.max_seq_len
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask [B, 1, T, T] bool (True = attend) replaces the plain causal mask (packed rows, --doc_mask)."""
        return self.attend(*self.project(x), cos, sin, cache, start_pos, mask)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H * hd], k and v [B, T, KV * hd]. In training one matmul with the three weights stacked (when
        none carries LoRA adapters), which Block's activation recomputation needs (see Block.forward); without
        gradients three, so decoding does not copy the weights at every token."""
        if not (self.stacked and torch.is_grad_enabled()):
            return self.wq(x), self.wk(x), self.wv(x)
        weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
        return F.linear(x, weight).split((self.wq.out_features, self.wk.out_features, self.wv.out_features), -1)

    @property
    def stacked(self) -> bool:
        """Whether project is one matmul: wq, wk and wv are plain linear layers (no LoRA adapters)."""
        return all(type(w) is nn.Linear for w in (self.wq, self.wk, self.wv))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary embedding, attention and the output projection of projected q, k, v (see project)."""
        B, T, _ = q.shape
        q = q.reshape(B, T, self.n_heads, self.head_dim)             # [B, T, H, hd]
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)          # [B, T, KV, hd]
        # its own copy: a view would keep project's whole q|k|v output alive for attention's backward
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).contiguous()  # [B, T, KV, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H or KV, T, hd]
        if cache is not None:
            k, v = cache.update(k, v, start_pos, self.max_seq_len)    # [B, KV, start_pos + T, hd]
        if self.n_kv_heads != self.n_heads:
            # GQA: query head h reads kv head h // n_rep (the same grouping as HF's repeat_kv)
            n_rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(n_rep, dim=1)                     # [B, H, S, hd]
            v = v.repeat_interleave(n_rep, dim=1)                     # [B, H, S, hd]
        masking = {"attn_mask": mask} if mask is not None else self._mask_kwargs(T, start_pos, q.device)
        with sdpa_kernel(DECODE_BACKENDS) if cache is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, **masking,
                                                 dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H * hd]
        return self.resid_dropout(self.wo(out))

    @staticmethod
    def _mask_kwargs(T: int, start_pos: int, device: torch.device) -> dict:
        """Causal masking. is_causal aligns the mask top-left, which is only right when the queries start at
        position 0; a chunk of T > 1 queries after cached keys needs an explicit mask, one query needs none."""
        if start_pos == 0:
            return {"is_causal": T > 1}
        if T == 1:
            return {}
        key_pos = torch.arange(start_pos + T, device=device)                  # [S]
        query_pos = torch.arange(start_pos, start_pos + T, device=device)      # [T]
        return {"attn_mask": key_pos[None, :] <= query_pos[:, None]}          # [T, S], True = attend


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(*self.up(x)))

    def up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 x, w3 x) [B, T, ffn_hidden_dim] each; stacked into one matmul in training, as in Attention.project."""
        if self.stacked and torch.is_grad_enabled():
            return F.linear(x, torch.cat((self.w1.weight, self.w3.weight))).chunk(2, dim=-1)
        return self.w1(x), self.w3(x)

    @property
    def stacked(self) -> bool:
        """Whether up is one matmul: w1 and w3 are plain linear layers (no LoRA adapters)."""
        return type(self.w1) is nn.Linear and type(self.w3) is nn.Linear

    def down(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, mask)
            return x + self.feed_forward(self.ffn_norm(x))
        # Training keeps for the backward pass only what costs a matmul to recompute. Autograd alone would also
        # keep each norm's output (the input of the projections after it), silu(w1 x) and w2's input silu(w1 x)
        # * w3 x: about 40% of a block's activations. The three regions below are recomputed in backward from
        # their inputs instead; each recomputation stops before its last matmul (the one whose inputs it was
        # run for), and the projections are single matmuls (project, up), so only elementwise work is redone.
        ff = self.feed_forward
        q, k, v = _recomputed(self.attention.stacked, self._normed_qkv, x)
        x = x + self.attention.attend(q, k, v, cos, sin, cache, start_pos, mask)
        a, b = _recomputed(ff.stacked, self._normed_up, x)
        return x + ff.dropout(_recomputed(type(ff.w2) is nn.Linear, ff.down, a, b))

    def _normed_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attention.project(self.attention_norm(x))

    def _normed_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.feed_forward.up(self.ffn_norm(x))


def _recomputed(single_matmul: bool, fn, *args: torch.Tensor):
    """fn(*args), its activations recomputed in backward when its matmul is a single one (the recomputation
    stops before it). With LoRA adapters on those layers it would redo their other matmuls: computed plainly."""
    return checkpoint(fn, *args, use_reentrant=False) if single_matmul else fn(*args)


def segment_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions [B, T] restarting at 0 wherever segment_ids [B, T] changes, and the block-diagonal
    causal mask [B, 1, T, T] (True = attend: same segment, not in the future). A segment must be one contiguous
    run of positions. On CPU SDPA takes this boolean mask; on CUDA it runs the memory-efficient kernel with it
    (FlexAttention's block mask or flash-attention's varlen kernel would skip the masked blocks: see README)."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)                 # [B, T]
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]                      # a segment begins here
    first = torch.where(starts, index, 0).cummax(dim=1).values                      # [B, T] its first index
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                      # [B, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()  # [T, T]
    return index - first, (same & causal)[:, None]                                 # [B, T], [B, 1, T, T]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
        # not persistent: recomputed from ModelArgs, so state dicts hold only learned weights
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            # GPT-2 / llama2.c: scale the projections that add into the residual stream by 1/sqrt(2 * n_layers)
            if name.endswith(("attention.wo.weight", "feed_forward.w3.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Without targets: (logits [B, T, vocab_size], None). With targets [B, T] (-100 = ignore): (None, the
        cross-entropy loss), computed by fused_ce from the hidden states without materialising the logits;
        reduction "mean" averages over non-ignored targets, "sum" adds them (the caller divides by a count), "none"
        gives each position's [B, T] (0 where ignored; DPO sums them per sequence).
        segment_ids [B, T] (optional): positions with different ids never attend to each other and rotary
        positions restart at 0 where an id begins, so several samples packed in one row (dataset_sft.py) or
        documents of one window (--doc_mask) are computed exactly as if each were alone."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        hidden = self._hidden(tokens, segment_ids=segment_ids)             # [B, T, dim]
        if targets is None:
            return self.output(hidden), None
        if reduction == "none":
            return None, -target_log_probs(hidden, self.output.weight, targets)    # [B, T]
        return None, linear_cross_entropy(hidden, self.output.weight, targets, reduction)

    def _hidden(self, tokens: torch.Tensor, caches: list[KVCache] | None = None, start_pos: int = 0,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, dim] for tokens [B, T] placed at positions start_pos.. (or, with
        segment_ids, at positions counted from the start of each segment)."""
        T = tokens.shape[1]
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than max_seq_len={self.args.max_seq_len}")
        mask = None
        if segment_ids is not None:
            positions, mask = segment_positions_and_mask(segment_ids)      # [B, T], [B, 1, T, T]
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, T, head_dim/2]
        else:
            cos = self.rope_cos[start_pos:start_pos + T]                    # [T, head_dim/2]
            sin = self.rope_sin[start_pos:start_pos + T]
        x = self.dropout(self.tok_embeddings(tokens))                   # [B, T, dim]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, caches[i] if caches is not None else None, start_pos, mask)
        return self.norm(x)

    def forward_cached(self, tokens: torch.Tensor, caches: list[KVCache], start_pos: int,
                       last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab_size] of tokens [B, T] at positions start_pos.., reusing and extending the
        KV caches (one per layer, from new_caches()) that hold positions 0..start_pos-1. last_only: the last
        position's logits only, [B, 1, vocab_size] (a prefill needs no more)."""
        hidden = self._hidden(tokens, caches, start_pos)                # [B, T, dim]
        return self.output(hidden[:, -1:] if last_only else hidden)

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    # ---- counting ----

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied embedding counted once. non_embedding=True leaves out the token embedding and
        the output projection (Kaplan et al.'s N)."""
        total = sum(p.numel() for p in self.parameters())   # parameters() yields a shared tensor once
        if non_embedding:
            total -= self.tok_embeddings.weight.numel()
            if not self.args.tie_embeddings:
                total -= self.output.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT: 6 N + 12 L H Q T, where N
        counts the weights used in matmuls (every parameter but an untied input embedding, which is a lookup)."""
        return self.training_flops(1, seq_len or self.args.max_seq_len)

    def training_flops(self, positions: int, squared_lengths: int) -> float:
        """Training FLOPs of samples with `positions` tokens in all and sum of squared lengths `squared_lengths`:
        a sample of length l costs 6 N l + 12 L H Q l^2 (attention grows with its own length, not seq_len, so
        short SFT samples are not counted at the cost of full-length ones)."""
        args = self.args
        matmul_params = self.num_params(non_embedding=True) + self.output.weight.numel()
        return 6 * matmul_params * positions + 12 * args.n_layers * args.n_heads * args.head_dim * squared_lengths

    # ---- generation ----

    @torch.inference_mode()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_id: int | None = 2) -> torch.Tensor:
        """New token ids [1, n] (n <= max_new_tokens) continuing the prompt tokens [1, T] (or [T]).
        Stops before `eos_id` (the eos itself is not returned); temperature 0 = greedy."""
        new_ids = list(self.generate_stream(tokens, max_new_tokens, temperature, top_k, top_p,
                                            repetition_penalty, eos_id))
        return torch.tensor([new_ids], dtype=torch.long, device=self.tok_embeddings.weight.device)

    @torch.inference_mode()
    def generate_stream(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        eos_id: int | None = 2) -> Iterator[int]:
        """Yield new token ids one at a time (see generate). Decodes incrementally with a KV cache. When the
        context fills max_seq_len, it keeps the most recent half and recomputes the cache from it, so long
        generations slide instead of failing; the prompt's tail is kept if the prompt itself is too long."""
        _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        ids = _prompt_ids(tokens)
        if not ids:
            raise ValueError("generation needs a prompt of at least one token (e.g. just <bos>)")
        if not 0 <= min(ids) <= max(ids) < self.args.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.args.vocab_size}), got {min(ids)}..{max(ids)}")
        device = self.tok_embeddings.weight.device
        seen = torch.zeros(self.args.vocab_size, dtype=torch.bool, device=device)   # for repetition_penalty
        seen[torch.tensor(ids, device=device)] = True
        was_training = self.training
        self.eval()
        try:
            caches, window = self.new_caches(), ids[-self.args.max_seq_len:]
            logits = self.forward_cached(torch.tensor([window], device=device), caches, 0, last_only=True)[0, -1]
            pos = len(window)
            for step in range(max_new_tokens):
                next_id = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty)
                if next_id == eos_id:
                    return
                yield next_id
                ids.append(next_id)
                seen[next_id] = True
                if step + 1 == max_new_tokens:
                    return
                if pos == self.args.max_seq_len:   # cache full: slide the window, recompute from its tail
                    caches, window = self.new_caches(), ids[-max(1, self.args.max_seq_len // 2):]
                    logits = self.forward_cached(torch.tensor([window], device=device), caches, 0, True)[0, -1]
                    pos = len(window)
                else:
                    logits = self.forward_cached(torch.tensor([[next_id]], device=device), caches, pos)[0, -1]
                    pos += 1
        finally:
            self.train(was_training)


def _prompt_ids(tokens: torch.Tensor) -> list[int]:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        return tokens.tolist()
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"generation takes one prompt, tokens of shape [1, T] or [T]; got {list(tokens.shape)}")
    return tokens[0].tolist()


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                    repetition_penalty: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, repetition_penalty: float) -> int:
    """One token id from logits [vocab]. Order as in transformers: repetition penalty (CTRL: divide positive,
    multiply negative logits of every token already in the context), temperature, top-k, top-p."""
    logits = logits.float().clone()                                        # [vocab]
    if repetition_penalty != 1.0:
        penalised = logits[seen]
        logits[seen] = torch.where(penalised > 0, penalised / repetition_penalty, penalised * repetition_penalty)
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits[logits < kth_largest] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)         # [vocab] each
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p
        logits[order[drop_sorted]] = -float("inf")
    return int(torch.multinomial(logits.softmax(-1), num_samples=1))


# ---- loading weights: this repo's checkpoints, the seed's state dicts, exported HF folders ----

class CheckpointError(RuntimeError):
    """A weights file or folder that is missing, truncated, corrupt, or not a kind load_model reads."""


_WHAT_LOADS = ("expected a training checkpoint (ckpt.pt from pretrain.py/sft.py/dpo.py), a state dict .pth with "
               "tok_embeddings.weight and layers.N.attention.wq.weight, or an exported HF folder")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")             # torch.compile, DDP
_DERIVED_BUFFERS = ("freqs_cos", "freqs_sin", "freqs_cis", "rope_cos", "rope_sin", "attention.mask")

# our name suffix -> Hugging Face LlamaForCausalLM name suffix, per layer
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _strip_prefixes(state: dict) -> dict:
    stripped = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def rope_pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute wq/wk rows from interleaved rotary pairs (ours, llama2.c) to HF's rotate-half layout:
    within each head, row 2i + j moves to j * head_dim/2 + i."""
    out_dim, in_dim = w.shape
    return (w.view(n_heads, out_dim // n_heads // 2, 2, in_dim)     # [H, hd/2, 2, in]
             .transpose(1, 2).reshape(out_dim, in_dim))               # [H, 2, hd/2, in] -> [H * hd, in]


def rope_halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of rope_pairs_to_halves."""
    out_dim, in_dim = w.shape
    return (w.view(n_heads, 2, out_dim // n_heads // 2, in_dim)     # [H, 2, hd/2, in]
             .transpose(1, 2).reshape(out_dim, in_dim))               # [H, hd/2, 2, in] -> [H * hd, in]


def to_hf_state_dict(state: dict, args: ModelArgs) -> dict:
    """Our state dict -> LlamaForCausalLM names, wq/wk permuted; lm_head left out when tied."""
    hf = {}
    for key, tensor in _strip_prefixes(state).items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        if key.startswith("layers."):
            _, index, suffix = key.split(".", 2)
            if suffix == "attention.wq.weight":
                tensor = rope_pairs_to_halves(tensor, args.n_heads)
            elif suffix == "attention.wk.weight":
                tensor = rope_pairs_to_halves(tensor, args.kv_heads)
            hf[f"model.layers.{index}.{HF_LAYER_NAMES[suffix]}"] = tensor.contiguous()
        else:
            hf[_HF_TOP_NAMES[key]] = tensor.contiguous()
    return hf


def from_hf_state_dict(hf: dict, args: ModelArgs) -> dict:
    """LlamaForCausalLM weights -> our names, wq/wk rows back to interleaved pairs."""
    layer_names = {v: k for k, v in HF_LAYER_NAMES.items()}
    top_names = {v: k for k, v in _HF_TOP_NAMES.items()}
    state = {}
    for key, tensor in hf.items():
        if key.startswith("model.layers."):
            _, _, index, suffix = key.split(".", 3)
            ours = layer_names[suffix]
            if ours == "attention.wq.weight":
                tensor = rope_halves_to_pairs(tensor, args.n_heads)
            elif ours == "attention.wk.weight":
                tensor = rope_halves_to_pairs(tensor, args.kv_heads)
            state[f"layers.{index}.{ours}"] = tensor
        else:
            state[top_names[key]] = tensor
    return state


def _torch_load(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # truncated zip, random bytes, pickled objects weights_only refuses, ...
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)}); "
                              f"{_WHAT_LOADS}") from None


def _args_from_state_dict(state: dict, path: str, n_heads: int, max_seq_len: int | None) -> ModelArgs:
    """Infer ModelArgs of a seed-style state dict from tensor shapes; n_heads cannot be inferred."""
    vocab_size, dim = state["tok_embeddings.weight"].shape
    n_layers = sum(1 for k in state if k.startswith("layers.") and k.endswith(".attention.wq.weight"))
    if dim % n_heads or f"layers.{n_layers - 1}.attention.wk.weight" not in state:
        raise CheckpointError(f"{path}: cannot infer the model shape with n_heads={n_heads} "
                              f"(dim {dim}, {n_layers} layers); pass the right --n_heads")
    kv_rows = state["layers.0.attention.wk.weight"].shape[0]
    n_kv_heads = kv_rows // (dim // n_heads)
    tied = "output.weight" not in state or torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    # max_seq_len only sizes the rotary table; take it from a preset of the same shape, else the seed's 512
    same_shape = [p.max_seq_len for p in PRESETS.values() if (p.dim, p.n_layers) == (dim, n_layers)]
    try:
        return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads, vocab_size=vocab_size,
                         hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
                         max_seq_len=max_seq_len or (same_shape[0] if same_shape else 512), tie_embeddings=tied)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: inconsistent weights for n_heads={n_heads} ({_first_line(exc)})") from None


def _read_hf_folder(path: str) -> tuple[dict, ModelArgs]:
    """(our state dict, ModelArgs) of a folder written by export_hf.py (or any single-file Llama export)."""
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise CheckpointError(f"{path}: folder has no config.json + model.safetensors; {_WHAT_LOADS}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
        n_heads = config["num_attention_heads"]
        if config.get("head_dim", config["hidden_size"] // n_heads) != config["hidden_size"] // n_heads:
            raise ValueError("head_dim != hidden_size / num_attention_heads is not supported")
        kv_heads = config.get("num_key_value_heads") or n_heads
        args = ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
                         n_kv_heads=None if kv_heads == n_heads else kv_heads, vocab_size=config["vocab_size"],
                         hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-5),
                         max_seq_len=config.get("max_position_embeddings", 512), rope_theta=rope_theta,
                         tie_embeddings=config.get("tie_word_embeddings", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{config_path}: not a Llama config.json ({_first_line(exc)})") from None
    try:
        from safetensors.torch import load_file
        hf_state = load_file(weights_path)
    except Exception as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        return from_hf_state_dict(hf_state, args), args
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: not LlamaForCausalLM weights (unexpected {_first_line(exc)})") from None


def _read_weights(path: str, n_heads: int, max_seq_len: int | None) -> tuple[dict, ModelArgs, dict]:
    """(state dict with our names, ModelArgs, meta) from any of the three kinds."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) \
            and os.path.isfile(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")   # a run's out dir stands for its checkpoint
    if os.path.isdir(path):
        state, args = _read_hf_folder(path)
        tokenizer = None
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            from chatglm_tokenizer import tokenizer_identity
            tokenizer = tokenizer_identity(path)
        return state, args, {"kind": "hf", "tokenizer": tokenizer, "config": None}
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or folder; {_WHAT_LOADS}")
    obj = _torch_load(path)
    if isinstance(obj, dict) and "model" in obj and "model_args" in obj:
        try:
            args = ModelArgs(**obj["model_args"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad model_args in checkpoint ({_first_line(exc)})") from None
        meta = {"kind": "checkpoint", "tokenizer": obj.get("tokenizer"), "config": obj.get("config")}
        state = _strip_prefixes(obj["model"])
        if obj.get("lora"):
            meta["lora"] = obj["lora"]
            state = _merge_lora_checkpoint(path, obj["lora"], state, args, n_heads)
        return state, args, meta
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = _strip_prefixes(obj)
        if "tok_embeddings.weight" in state and "layers.0.attention.wq.weight" in state:
            args = _args_from_state_dict(state, path, n_heads, max_seq_len)
            return state, args, {"kind": "state_dict", "tokenizer": None, "config": None}
    raise CheckpointError(f"{path}: loaded, but holds neither a checkpoint nor model weights; {_WHAT_LOADS}")


def lora_base_path(path: str, lora: dict) -> str:
    """The base weights a LoRA checkpoint at `path` was trained on, found where it was (as given, then
    absolute), checked against its sha256. CheckpointError when missing or changed."""
    base = lora["base"]
    found = next((p for p in (base["path"], base.get("abspath", "")) if p and os.path.exists(p)), None)
    if found is None:
        raise CheckpointError(f"{path} holds LoRA adapters for the base weights {base['path']} (sha256 "
                              f"{base['sha256'][:12]}…), which are not there; put them back or export the merged "
                              f"model where they are")
    if weights_sha256(found) != base["sha256"]:
        raise CheckpointError(f"{path} holds LoRA adapters for {base['path']} with sha256 {base['sha256'][:12]}…, "
                              f"but {found} has changed since (sha256 {weights_sha256(found)[:12]}…)")
    return found


def _merge_lora_checkpoint(path: str, lora: dict, adapters: dict, args: ModelArgs, n_heads: int) -> dict:
    """A LoRA checkpoint's full weights: its base (read like any weights, itself possibly LoRA) with the
    adapters folded in."""
    base_state, base_args, _ = _read_weights(lora_base_path(path, lora), n_heads, None)
    if (base_args.dim, base_args.n_layers, base_args.vocab_size) != (args.dim, args.n_layers, args.vocab_size):
        raise CheckpointError(f"{path}: its base {lora['base']['path']} has another shape ({asdict(base_args)})")
    try:
        return merge_state_dict(_normalise_state(base_state, base_args), adapters, lora["alpha"] / lora["rank"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: adapters do not fit the base {lora['base']['path']} "
                              f"({_first_line(exc)})") from None


def _normalise_state(state: dict, args: ModelArgs) -> dict:
    """Drop derived buffers (rotary tables, causal masks) and give a tied model both embedding keys."""
    state = {k: v for k, v in state.items() if not k.endswith(_DERIVED_BUFFERS)}
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def load_state_dict_file(path: str, n_heads: int = 8) -> dict:
    """Weights of a checkpoint, seed state dict or HF folder with our names and no wrapper prefixes
    (for --init_from). Raises CheckpointError."""
    state, args, _ = _read_weights(path, n_heads, None)
    return _normalise_state(state, args)


def load_model(path: str, device: str | torch.device = "cpu", n_heads: int = 8,
               max_seq_len: int | None = None) -> tuple[Transformer, dict]:
    """(model in eval mode on device, meta) from this repo's checkpoint, a seed-style state dict (.pth, possibly
    with _orig_mod./module. prefixes; dims from tensor shapes, n_heads given) or an exported HF folder.
    meta = {"kind": "checkpoint"|"state_dict"|"hf", "tokenizer": identity or None, "model_args": dict,
    "config": training config or None}. max_seq_len overrides the stored/inferred context length."""
    state, args, meta = _read_weights(path, n_heads, max_seq_len)
    if max_seq_len is not None:
        args = replace(args, max_seq_len=max_seq_len)
    model = Transformer(args)
    try:
        model.load_state_dict(_normalise_state(state, args), strict=True)
    except (RuntimeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit ModelArgs {asdict(args)} ({_first_line(exc)})") from None
    meta["model_args"] = asdict(args)
    return model.to(device).eval(), meta


# ---- command line: preset table, checkpoint summary ----

def _preset_table() -> str:
    header = (f"{'preset':<7}{'dim':>6}{'layers':>7}{'heads':>6}{'kv':>4}{'ffn':>6}{'seq':>6}"
              f"{'params':>10}{'non-emb':>10}{'untied':>10}{'GFLOP/tok':>11}")
    rows = [header]
    for name, args in PRESETS.items():
        with torch.device("meta"):   # count without allocating the 218m weights
            model = Transformer(args)
        untied = model.num_params() + (model.tok_embeddings.weight.numel() if args.tie_embeddings else 0)
        rows.append(f"{name:<7}{args.dim:>6}{args.n_layers:>7}{args.n_heads:>6}{args.kv_heads:>4}"
                    f"{args.ffn_hidden_dim:>6}{args.max_seq_len:>6}{model.num_params() / 1e6:>9.2f}M"
                    f"{model.num_params(non_embedding=True) / 1e6:>9.2f}M{untied / 1e6:>9.2f}M"
                    f"{model.flops_per_token() / 1e9:>11.3f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Model presets and checkpoint inspection.")
    parser.add_argument("--ckpt", help="checkpoint, seed state dict or HF folder to summarise")
    parser.add_argument("--n_heads", type=int, default=8, help="heads of a seed state dict (not in its shapes)")
    opts = parser.parse_args(argv)
    if opts.ckpt is None:
        print(f"vocab {ModelArgs.vocab_size}; params count a tied embedding once; 'untied' counts it twice as "
              f"the seed's names do; GFLOP/tok = training FLOPs per token at seq")
        print(_preset_table())
        return 0
    try:
        model, meta = load_model(opts.ckpt, n_heads=opts.n_heads)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{opts.ckpt}: {meta['kind']}, {model.num_params() / 1e6:.2f}M params, tokenizer {meta['tokenizer']}")
    print(json.dumps(meta["model_args"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
