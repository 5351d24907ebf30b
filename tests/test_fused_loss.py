"""fused_ce.py and the model's loss: the fused linear + cross-entropy equals the plain F.cross_entropy over fp32
logits, loss and every gradient, with ignored targets, several chunks, uneven micro batches, tied and untied
output weights, and under DDP on 2 ranks (gloo); the per-position log-probabilities (DPO) equal log_softmax's,
gradients included, for any gradient coming back per position.

    python -m pytest -q tests/test_fused_loss.py
"""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from conftest import torchrun
from fused_ce import linear_cross_entropy, target_log_probs
from model import Transformer, model_args_from_preset

SMALL = dict(vocab_size=1000, max_seq_len=32)


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_and_gradients_equal_plain_cross_entropy_across_chunks(monkeypatch, reduction):
    monkeypatch.setattr(fused_ce, "CHUNK_ELEMENTS", {"cpu": 7 * 1000})   # 7 positions a chunk: 6, the last short
    torch.manual_seed(0)
    hidden = torch.randn(3, 13, 48, requires_grad=True)
    weight = (torch.randn(1000, 48) * 0.3).requires_grad_()
    targets = torch.randint(0, 1000, (3, 13))
    targets[0, :5] = -100          # a prompt
    targets[2, 9:] = -100          # padding
    targets[1, :] = -100           # a whole row without targets
    fused = linear_cross_entropy(hidden, weight, targets, reduction)
    plain = reference_loss(hidden, weight, targets, reduction)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    fused_grads = grads(fused, hidden, weight)
    for got, want in zip(fused_grads, grads(plain, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fused_grads[0][1].abs().max() == 0 and fused_grads[0][0].abs().max() > 0   # ignored rows: none


def test_target_log_probs_and_their_gradients_equal_log_softmax(monkeypatch):
    """Each position's log p(target), and the gradients for a different weight on every position (what DPO's
    per-sequence margins send back): recomputed in backward, chunk by chunk."""
    monkeypatch.setattr(fused_ce, "CHUNK_ELEMENTS", {"cpu": 7 * 1000})
    torch.manual_seed(0)
    hidden = torch.randn(4, 9, 48, requires_grad=True)
    weight = (torch.randn(1000, 48) * 0.3).requires_grad_()
    targets = torch.randint(0, 1000, (4, 9))
    targets[:, :3] = -100
    targets[2] = -100              # a row with no target at all
    upstream = torch.randn(4, 9)
    got = target_log_probs(hidden, weight, targets)
    logp = F.log_softmax((hidden @ weight.T).float(), dim=-1)
    expected = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got[2].abs().sum() == 0 and got[[0, 1, 3], 3:].abs().min() > 0
    got_grads = grads((got * upstream).sum(), hidden, weight)
    for g_got, g_ref in zip(got_grads, grads((expected * upstream).sum(), hidden, weight)):
        assert g_ref.abs().max() > 0
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(target_log_probs(hidden, weight, targets), expected.detach(), rtol=1e-5, atol=1e-5)


def test_no_grad_gives_the_same_loss_and_all_ignored_gives_zero():
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 9, 16), torch.randn(1000, 16)
    targets = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, "sum"),
                                   reference_loss(hidden, weight, targets, "sum"))
    none = torch.full_like(targets, -100)
    assert linear_cross_entropy(hidden, weight, none, "sum").item() == 0.0
    assert torch.isnan(linear_cross_entropy(hidden, weight, none, "mean"))   # as F.cross_entropy


def model_pair(tie: bool) -> tuple[Transformer, Transformer]:
    torch.manual_seed(2)
    model = Transformer(model_args_from_preset("tiny", tie_embeddings=tie, **SMALL))
    twin = Transformer(model.args)
    twin.load_state_dict(model.state_dict())
    return model, twin


def plain_model_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)                                          # the inference path: full logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("tie", [True, False])
def test_model_gradients_over_uneven_micro_batches_equal_the_plain_path(tie):
    """Two micro batches of different shapes and target counts, accumulated as trainer.py does (summed token
    losses divided by the step's target count): every parameter's gradient matches the unfused model's."""
    fused_model, plain_model = model_pair(tie)
    torch.manual_seed(3)
    batches = []
    for rows, width in ((3, 20), (1, 7)):
        x, y = torch.randint(0, 1000, (rows, width)), torch.randint(0, 1000, (rows, width))
        y[:, : width // 3] = -100
        batches.append((x, y))
    n_targets = sum(int((y != -100).sum()) for _, y in batches)
    total_fused = total_plain = 0.0
    for x, y in batches:
        logits, loss = fused_model(x, y, reduction="sum")
        assert logits is None                                     # training never builds the logits
        (loss / n_targets).backward()
        plain = plain_model_loss(plain_model, x, y)
        (plain / n_targets).backward()
        total_fused, total_plain = total_fused + loss.item(), total_plain + plain.item()
    assert total_fused == pytest.approx(total_plain, rel=1e-5)
    plain_params = dict(plain_model.named_parameters())
    for name, param in fused_model.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        torch.testing.assert_close(param.grad, plain_params[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_real_vocabulary_loss_matches():
    """The 64,794-word output layer (several chunks at the default chunk size): same loss, same gradient."""
    torch.manual_seed(4)
    model = Transformer(model_args_from_preset("tiny", max_seq_len=600))
    x, y = torch.randint(0, 64794, (2, 600)), torch.randint(0, 64794, (2, 600))
    _, fused = model(x, y, reduction="mean")
    fused_grad = grads(fused, model.tok_embeddings.weight)[0]
    plain = plain_model_loss(model, x, y) / y.numel()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, grads(plain, model.tok_embeddings.weight)[0], rtol=1e-4, atol=1e-8)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.getcwd())
    import torch, torch.distributed as dist, torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from model import Transformer, model_args_from_preset

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("tiny", vocab_size=1000, max_seq_len=32))
    reference = Transformer(model.args)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 1000, (4, 24)), torch.randint(0, 1000, (4, 24))
    y[0, :10] = -100
    y[3, 5:] = -100
    n_targets = int((y != -100).sum())
    ddp = DDP(model, broadcast_buffers=False)
    mine = slice(2 * rank, 2 * rank + 2)   # rank r: rows 2r, 2r + 1 (uneven target counts)
    _, loss = ddp(x[mine], y[mine], reduction="sum")
    (loss * world / n_targets).backward()   # DDP averages over ranks: the trainer's scaling
    logits, _ = reference(x)
    plain = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum") / n_targets
    plain.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / n_targets, plain.detach(), rtol=1e-5, atol=1e-6)
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    print(f"rank {rank}: fused DDP gradients match", flush=True)
    dist.destroy_process_group()
""")


def test_fused_loss_under_ddp_equals_one_process_plain_loss(tmp_path):
    script = tmp_path / "ddp_fused.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    done = torchrun(str(script), [])
    assert done.stdout.count("fused DDP gradients match") == 2, done.stdout
