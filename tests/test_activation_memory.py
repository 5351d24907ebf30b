"""What training keeps for the backward pass (model.Block, model._RMSNormFunction): the same gradients as plain
autograd, and only the activations that cost a matmul to recompute.

    pytest tests/test_activation_memory.py -q
"""
from __future__ import annotations

import pytest
import torch

import model
from lora import apply_lora
from model import Transformer, _RMSNormFunction, model_args_from_preset


def test_rmsnorm_backward_matches_numerical_gradients_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, weight))


def spread(m: Transformer, seed: int = 1) -> Transformer:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return m


def loss_and_grads(m: Transformer, x: torch.Tensor, y: torch.Tensor, **kwargs) -> tuple[float, dict]:
    m.zero_grad(set_to_none=True)
    _, loss = m(x, y, **kwargs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_kv_heads,lora,packed", [(None, False, False), (2, False, True), (None, True, False)])
def test_recomputed_training_step_equals_plain_autograd(monkeypatch, n_kv_heads, lora, packed):
    """The checkpointed regions of Block.forward and the stacked projections give the loss and every gradient
    of the same network run through plain autograd (checkpoint replaced by a direct call)."""
    torch.manual_seed(0)
    net = spread(Transformer(model_args_from_preset("tiny", vocab_size=300, max_seq_len=32, dim=32,
                                                    n_heads=4, n_kv_heads=n_kv_heads))).train()
    if lora:
        apply_lora(net, rank=4, alpha=8.0, dropout=0.0, targets="wq,wo")   # q|k|v computed plainly, up recomputed
        with torch.no_grad():   # non-zero adapters, so their gradients and outputs count
            for name, p in net.named_parameters():
                if "lora_" in name:
                    p.copy_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 300, (3, 32))
    y = torch.where(torch.rand(3, 32) < 0.2, -100, torch.randint(0, 300, (3, 32)))
    kwargs = {"segment_ids": torch.arange(32).div(11, rounding_mode="floor").expand(3, 32)} if packed else {}
    loss, grads = loss_and_grads(net, x, y, **kwargs)
    monkeypatch.setattr(model, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    plain_loss, plain_grads = loss_and_grads(net, x, y, **kwargs)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) > 5
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def saved_activation_bytes(net: Transformer, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, parameters and buffers left out."""
    kept = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept |= {b.untyped_storage().data_ptr() for b in net.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in kept:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, x)
    return sum(seen.values())


def test_training_keeps_only_what_a_matmul_would_recompute():
    """Per block: its input, the rotated q and k, v, attention's output (and log-sum-exp), the residual stream
    after attention, and w1 x | w3 x; not the norms' outputs, silu(w1 x) or w2's input. Plus the loss's own
    (embedding ids, final norm input, fused_ce's gradients)."""
    B, T, dim, layers = 2, 64, 64, 2
    args = model_args_from_preset("tiny", vocab_size=1000, max_seq_len=T, dim=dim, n_layers=layers, n_heads=4,
                                  n_kv_heads=None)
    net = Transformer(args).train()
    x = torch.randint(0, 1000, (B, T))
    f32 = 4
    per_block = f32 * B * T * (dim + 3 * dim + dim + dim + 2 * args.ffn_hidden_dim) + f32 * B * args.n_heads * T
    loss_side = B * T * 8 + f32 * B * T * (dim + 1) + f32 * B * T * dim + f32 * 1000 * dim
    saved = saved_activation_bytes(net, x)
    assert saved <= layers * per_block + loss_side, (saved, layers * per_block + loss_side)
    # plain autograd of the same network keeps at least the two norm outputs and silu(w1 x) more per block
    import unittest.mock
    with unittest.mock.patch.object(model, "checkpoint", lambda fn, *a, use_reentrant: fn(*a)):
        plain = saved_activation_bytes(net, x)
    assert plain - saved >= layers * f32 * B * T * (2 * dim + args.ffn_hidden_dim)


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """trainer.wrap_model compiles each block on CUDA (and on CPU with --compile=true): the recomputed regions
    must trace and give the same step."""
    torch.manual_seed(0)
    net = spread(Transformer(model_args_from_preset("tiny", vocab_size=300, max_seq_len=16, dim=32, n_layers=1,
                                                    n_heads=4))).train()
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    loss, grads = loss_and_grads(net, x, y)
    for block in net.layers:
        block.compile()
    compiled_loss, compiled_grads = loss_and_grads(net, x, y)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
