"""Cross-entropy of the output layer without the full logits: linear + log-softmax + NLL fused, chunk by chunk.

    from fused_ce import linear_cross_entropy
    loss = linear_cross_entropy(hidden, weight, targets, reduction="sum")   # hidden [N, dim], weight [vocab, dim]

equals `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100, reduction=...)` (tests/
test_fused_loss.py holds it to fp32 tolerance, gradients included), but holds at most one chunk of
`chunk_rows x vocab` fp32 logits at a time instead of `N x vocab` (for 16 x 512 positions and 64,794 words:
128 MB on CPU instead of 2.1 GB of logits, and as much again for their softmax and gradient).

How. For each chunk of positions: logits = h @ W^T, their log-sum-exp and the target's logit give the loss;
softmax - onehot is the gradient of the logits, which is turned at once into the chunk's share of dL/dh
(g @ W) and of dL/dW (g^T @ h) and dropped (the softmax's 1/sum and the onehot are applied to the small
[chunk, dim] operands, so the [chunk, vocab] buffer is read and written as few times as possible). The loss is
differentiated right after the forward pass in training, so the gradients are computed in the forward pass (as
Liger-Kernel's fused linear cross-entropy does) rather than recomputing the logits in backward: the output
layer, 53-82% of a step's FLOPs at this project's sizes, then costs three matmuls, as unfused, not four.
backward() only scales the stored gradients by the incoming scalar. Without grad mode (validation) only the
loss is computed. target_log_probs (DPO's sequence log-probabilities) gets one gradient per position back, so
it does recompute the logits in backward (_TargetLogProbs).

Positions whose target is ignored (-100: SFT prompts, padding) are dropped before the matmul on CPU, where
selecting them is free; on CUDA they are masked instead, because selecting rows needs the count on the host
(a sync per micro batch) and blocks torch.compile.

Liger-Kernel's Triton kernel is used instead on CUDA when the package is installed (`pip install liger-kernel`,
an optional extra); MCG_FUSED_CE=portable forces this file's code everywhere. The portable code is the
reference the tests check.
"""
from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100
# fp32 logits per chunk: 128 MiB (~517 positions of the 64,794-word vocabulary) on CPU, where fewer, larger
# matmuls read the output weight fewer times (fwd + bwd on 2 cores, best of 3: 12.5 s at 129 positions a
# chunk, 11.0 s at 517 for 92m's 16 x 512; 1.25 s and 1.16 s for tiny's 16 x 256); 256 MiB (~1,036 positions)
# on GPUs, whose matmuls want more rows
CHUNK_ELEMENTS = {"cpu": 2 ** 25, "cuda": 2 ** 26}


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The matmul dtype autocast would use here (bf16/fp16 under autocast), else the weight's own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _chunk_rows(device: torch.device, vocab: int) -> int:
    """Positions per chunk: CHUNK_ELEMENTS fp32 logits of the vocabulary."""
    return max(1, CHUNK_ELEMENTS.get(device.type, 2 ** 26) // vocab)


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight [vocab, dim] fp32 += grad_logits [c, vocab]^T @ h [c, dim], in place when h is fp32."""
    if h.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, h)
    else:
        grad_weight += (grad_logits.T.to(h.dtype) @ h).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of hidden [N, dim] @ weight [vocab, dim]^T against targets [N]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, grad_h: bool, grad_w: bool) -> torch.Tensor:
        """grad_h / grad_w: whether hidden / weight need a gradient (a frozen output layer under LoRA needs none:
        its [vocab, dim] matmul per chunk is skipped)."""
        chunk_rows = _chunk_rows(hidden.device, weight.shape[0])
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with_grad = grad_h or grad_w
        grad_hidden = torch.zeros_like(hidden) if grad_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)          # [c, dim]
            t = targets[start:start + chunk_rows]                           # [c]
            logits = (h @ w.T).float()                                      # [c, vocab]
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)     # [c]
            # log-sum-exp in place: the chunk's one [c, vocab] buffer becomes exp(logits - max), then softmax
            row_max = logits.amax(dim=-1)                                   # [c]
            exp = logits.sub_(row_max[:, None]).exp_()                      # [c, vocab]
            total = exp.sum(dim=-1)                                         # [c]
            loss += torch.where(valid, row_max + total.log() - target_logit, 0.0).sum()
            if with_grad:
                # d loss / d logits = softmax - onehot = exp / total - onehot (zero for ignored rows). The 1 / total
                # and the mask scale the small [c, dim] operands instead of the [c, vocab] one, and the onehot
                # part is a row gather / scatter of the weight: one pass less over the chunk for each.
                scale = (valid / total)[:, None]                            # [c, 1]
            if grad_h:
                target_w = w.index_select(0, safe_t) * valid[:, None]       # [c, dim] (not w[t]: 100x slower)
                grad_hidden[start:start + chunk_rows] = ((exp.to(compute_dtype) @ w) * scale - target_w
                                                         ).to(hidden.dtype)
            if grad_w:
                _add_weight_grad(grad_weight, exp, h * scale.to(compute_dtype))   # [vocab, dim]
                grad_weight.index_add_(0, safe_t, (h * valid[:, None]).float(), alpha=-1.0)
        ctx.grads = (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return (*(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads), None, None, None, None)


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Liger-Kernel's fused linear cross-entropy (summed), or None when it is not installed or not wanted."""
    if hidden.device.type != "cuda" or os.environ.get("MCG_FUSED_CE", "auto") == "portable":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    dtype = _compute_dtype(hidden.device, weight.dtype)
    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
        weight.to(dtype), hidden.to(dtype), targets)                      # (lin_weight, input, target)
    return (out[0] if isinstance(out, tuple) else out).float()


class _TargetLogProbs(torch.autograd.Function):
    """log p(target) [N] fp32 of the logits hidden [N, dim] @ weight [vocab, dim]^T. Unlike _LinearCrossEntropy
    the gradient that comes back is one number per position (DPO weighs each sequence by its own margin), so
    it cannot be worked out in the forward pass: backward recomputes each chunk's logits from hidden and the
    saved log-sum-exp (four matmuls in all instead of three, still no [N, vocab] buffer)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype) -> torch.Tensor:
        chunk_rows = _chunk_rows(hidden.device, weight.shape[0])
        w = weight.to(compute_dtype)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[start:start + chunk_rows].to(compute_dtype) @ w.T).float()    # [c, vocab]
            lse[start:start + chunk_rows] = logits.logsumexp(dim=-1)
            target_logit[start:start + chunk_rows] = logits.gather(1, targets[start:start + chunk_rows, None])[:, 0]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.compute_dtype, ctx.chunk_rows = compute_dtype, chunk_rows
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, chunk_rows = ctx.compute_dtype, ctx.chunk_rows
        w = weight.to(dtype)
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows].to(dtype)                                  # [c, dim]
            g_out = grad_out[start:start + chunk_rows, None].float()                        # [c, 1]
            # d log p(t) / d logits = onehot(t) - softmax, times the position's incoming gradient
            grad_logits = (h @ w.T).float().sub_(lse[start:start + chunk_rows, None]).exp_().mul_(-g_out)
            grad_logits.scatter_add_(1, targets[start:start + chunk_rows, None], g_out)     # [c, vocab]
            if need_h:
                grad_hidden[start:start + chunk_rows] = (grad_logits.to(dtype) @ w).to(hidden.dtype)
            if need_w:
                _add_weight_grad(grad_weight, grad_logits, h)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each position, fp32 [...] for hidden [..., dim], targets [...] (-100: 0, no gradient),
    from the logits hidden @ weight^T without materialising them; differentiable (see _TargetLogProbs).
    Summed over a sequence's targets it is the sequence's log-probability (DPO)."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])                           # [N, dim]
    targets = targets.reshape(-1)                                           # [N]
    valid = targets != IGNORE_INDEX
    compute_dtype = _compute_dtype(hidden.device, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):   # the chunks cast explicitly
        if hidden.device.type == "cpu":   # ignored positions dropped before the matmul (see the module docstring)
            out = hidden.new_zeros(targets.shape, dtype=torch.float32)
            out[valid] = _TargetLogProbs.apply(hidden[valid], weight, targets[valid], compute_dtype)
        else:
            out = _TargetLogProbs.apply(hidden, weight, torch.where(valid, targets, 0), compute_dtype) * valid
    return out.view(shape)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits hidden [..., dim] @ weight [vocab, dim]^T against targets [...] (-100 =
    ignored), fp32, without materialising the logits. reduction "sum" adds the token losses, "mean" divides
    by the number of counted targets (nan when there is none, as F.cross_entropy)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])                           # [N, dim]
    targets = targets.reshape(-1)                                           # [N]
    loss = _liger_loss(hidden, weight, targets)
    if loss is None:
        if hidden.device.type == "cpu":   # drop ignored positions before the matmul (see the module docstring)
            keep = targets != IGNORE_INDEX
            hidden, targets = hidden[keep], targets[keep]
        grad_h, grad_w = (torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight))
        compute_dtype = _compute_dtype(hidden.device, weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):   # the chunks cast explicitly
            loss = _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, grad_h, grad_w)
    if reduction == "mean":
        loss = loss / (targets != IGNORE_INDEX).sum()
    return loss
