"""dpo.py / dpo_loss.py / dataset_dpo.py: exact masks, the loss and its gradients against a hand computation,
ln 2 at step 0, rewards/accuracies rising on a synthetic preference, LoRA DPO (reference = adapters off) with
bit-exact resume, and a LoRA checkpoint that chat/eval loading reads directly.

    python -m pytest -q tests/test_dpo.py

The runs use the tiny preset and a ~400-piece SentencePiece model trained here on the synthetic pairs (the
real 64,794-id vocabulary would make the output layer ~150x larger)."""
from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import dpo
from dataset_dpo import DPODataset, fit_pair
from dataset_sft import IGNORE_INDEX, SampleAccumulator, Turn, layout_sample
from dpo_loss import DPOLoss, dpo_loss, sequence_logps
from conftest import torchrun
from inference import load_for_inference
from model import Transformer, load_model, model_args_from_preset

BOS, EOS, PAD = 1, 2, 0
RUN_FLAGS = dict(preset="tiny", seq_len=64, micro_batch_size=4, grad_accum_steps=1, lr=3e-3, min_lr=3e-4,
                 warmup_iters=0, lr_decay_iters=24, max_iters=24, eval_interval=12, eval_iters=2, save_interval=12,
                 log_interval=1, val_fraction=0.1, beta=0.1, keep_last=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- masks, loss and gradients by hand

def pair_samples(pairs):
    """(chosen SFTSamples, rejected SFTSamples) of (context turns, prompt, chosen ids, rejected ids) pairs."""
    chosen, rejected = SampleAccumulator(np.int32), SampleAccumulator(np.int32)
    for key, (context, prompt, good, bad) in enumerate(pairs):
        for acc, answer in ((chosen, good), (rejected, bad)):
            acc.add(*layout_sample(context + [Turn(prompt, answer)], BOS, EOS), key, key)
    return chosen.finish(), rejected.finish()


PAIRS = [([Turn([5, 6], [7, 8, 9])], [10, 11, 12], [13, 14], [15, 16, 17, 18]),   # history: not a target
         ([], [20], [21, 22, 23, 24, 25], [26])]


def expected_targets(context, prompt, answer):
    """(ids, positions t whose target ids[t+1] is the last answer's token or its <eos>) written out by hand."""
    ids = [i for t in context for i in t.prompt + [BOS] + t.answer + [EOS]] + prompt + [BOS] + answer + [EOS]
    first = len(ids) - len(answer) - 2   # the last <bos>: it predicts the first answer token
    return ids, list(range(first, len(ids) - 1))


def test_batch_masks_are_exact():
    x, y = DPODataset(*pair_samples(PAIRS), micro_batch_size=2, pad_id=PAD).collate(np.array([0, 1]))
    rows = [(c, p, a) for c, p, a, _ in PAIRS] + [(c, p, r) for c, p, _, r in PAIRS]   # chosen rows, then rejected
    assert x.shape == y.shape == (4, max(len(expected_targets(*r)[0]) for r in rows) - 1)
    for row, spec in enumerate(rows):
        ids, targets = expected_targets(*spec)
        assert x[row, :len(ids) - 1].tolist() == ids[:-1] and (x[row, len(ids) - 1:] == PAD).all()
        assert torch.nonzero(y[row] != IGNORE_INDEX).flatten().tolist() == targets
        assert y[row, targets].tolist() == [ids[t + 1] for t in targets] and y[row, targets[-1]] == EOS


def hand_logp(model, context, prompt, answer):
    """log p(answer <eos> | context prompt <bos>) from the unpadded sequence alone, token by token."""
    ids, targets = expected_targets(context, prompt, answer)
    log_probs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)
    return sum(log_probs[t, ids[t + 1]] for t in targets)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_a_hand_computation(kind):
    args = model_args_from_preset("tiny", vocab_size=40)
    torch.manual_seed(0)
    policy = Transformer(args)
    reference = Transformer(args).requires_grad_(False)   # other weights: the log-ratios are not zero
    hand_policy = copy.deepcopy(policy)
    beta = 0.5
    x, y = DPODataset(*pair_samples(PAIRS), micro_batch_size=2, pad_id=PAD).collate(np.array([0, 1]))
    loss_fn = DPOLoss(beta=beta, kind=kind,
                      reference=lambda model, tokens, targets: sequence_logps(reference, tokens, targets))
    assert loss_fn.count(y) == 2
    loss = loss_fn(policy, x, y) / loss_fn.count(y)
    loss.backward()

    hand_losses, hand_rewards = [], []
    for context, prompt, good, bad in PAIRS:
        pc, pr = hand_logp(hand_policy, context, prompt, good), hand_logp(hand_policy, context, prompt, bad)
        with torch.no_grad():
            rc, rr = hand_logp(reference, context, prompt, good), hand_logp(reference, context, prompt, bad)
        if kind == "ipo":   # per-token averages over each answer's tokens and its <eos>
            pc, rc, pr, rr = pc / (len(good) + 1), rc / (len(good) + 1), pr / (len(bad) + 1), rr / (len(bad) + 1)
        h = (pc - rc) - (pr - rr)
        hand_losses.append(-F.logsigmoid(beta * h) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
        hand_rewards.append((beta * (pc - rc).item(), beta * (pr - rr).item(), pc.item(), pr.item()))
    hand = sum(hand_losses) / len(hand_losses)
    hand.backward()
    at_start = math.log(2) if kind == "sigmoid" else (1 / (2 * beta)) ** 2   # the loss when policy = reference
    assert abs(loss.item() - hand.item()) < 1e-5 and abs(hand.item() - at_start) > 1e-3
    for (name, p), q in zip(policy.named_parameters(), hand_policy.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    metrics = {k: v.item() / 2 for k, v in loss_fn.take_metrics().items()}
    chosen_r, rejected_r, logp_c, logp_r = (sum(col) / 2 for col in zip(*hand_rewards))
    assert metrics["rewards/chosen"] == pytest.approx(chosen_r, abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_r, abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(chosen_r - rejected_r, abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(logp_c, abs=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(logp_r, abs=1e-4)
    assert metrics["rewards/accuracies"] == sum(c > r for c, r, _, _ in hand_rewards) / 2
    assert loss_fn.take_metrics() == {}


def test_loss_variants_and_sequence_logps():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    h = (pc - rc) - (pr - rr)   # 1.5
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx((-0.9 * F.logsigmoid(0.2 * h) - 0.1 * F.logsigmoid(-0.2 * h)).item())
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, kind="ipo")
    assert ipo.item() == pytest.approx((1.5 - 1 / 0.4) ** 2)
    torch.manual_seed(0)
    net = Transformer(model_args_from_preset("tiny", vocab_size=50, max_seq_len=8))
    x = torch.randint(0, 50, (2, 8))
    y = torch.randint(0, 50, (2, 8))
    y[0, :3] = y[1, :5] = IGNORE_INDEX
    logps = sequence_logps(net, x, y)   # the fused output layer: no logits
    log_softmax = F.log_softmax(net(x)[0].float(), -1)
    expected = [sum(log_softmax[r, t, y[r, t]] for t in range(8) if y[r, t] != IGNORE_INDEX) for r in range(2)]
    torch.testing.assert_close(logps, torch.stack(expected), rtol=1e-5, atol=1e-5)
    weights = torch.tensor([0.7, -1.3])   # DPO sends each sequence its own gradient
    got = torch.autograd.grad((logps * weights).sum(), net.layers[0].attention.wq.weight)[0]
    want = torch.autograd.grad((torch.stack(expected) * weights).sum(), net.layers[0].attention.wq.weight)[0]
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_pair_truncation_keeps_one_context():
    context = [Turn([3] * 6, [4] * 6), Turn([5] * 8, [])]
    chosen, rejected, cut, chosen_cut, rejected_cut = fit_pair(context, [6] * 10, [7] * 3, 20)
    assert chosen[:-1] == rejected[:-1] and chosen[-1].prompt == rejected[-1].prompt
    assert cut.turns_dropped == 1 and not chosen_cut and not rejected_cut
    assert len(layout_sample(chosen, BOS, EOS)[0]) == 20 and rejected[-1].answer == [7] * 3
    chosen, rejected, _, chosen_cut, rejected_cut = fit_pair([Turn([5] * 8, [])], [6] * 30, [7] * 16, 20)
    assert chosen[-1].prompt == rejected[-1].prompt and chosen_cut and rejected_cut
    assert len(layout_sample(rejected, BOS, EOS, rejected_cut)[0]) == 20


# ---------------------------------------------------------------- dpo.py end to end

CHARS = list("天地人和日月山水风雨花草木石金土火光明心手口目耳足")


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory) -> str:
    """60 pairs: every chosen answer starts with the same phrase, rejected ones are random characters."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("dpo") / "pairs.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(["prompt", "chosen", "rejected", "history", "source"])
        for i in range(60):
            words = lambda n: "".join(rng.choice(CHARS, n))   # noqa: E731
            history = json.dumps([[words(5), words(6)]], ensure_ascii=False) if i % 3 == 0 else "[]"
            writer.writerow([f"问题{words(6)}", "谢谢您的提问我来回答" + words(4), words(14), history, "synthetic"])
    return str(path)


@pytest.fixture(scope="module")
def small_tokenizer(synthetic_csv, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tokenizer")
    with open(synthetic_csv, encoding="utf-8") as f:
        texts = [cell for row in csv.reader(f) for cell in row[:3]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=400, byte_fallback=True, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    return str(folder)


@pytest.fixture(scope="module")
def init_weights(small_tokenizer, tmp_path_factory) -> str:
    from chatglm_tokenizer import load_tokenizer
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "tiny.pth"
    vocab = load_tokenizer(small_tokenizer).vocab_size
    torch.save(Transformer(model_args_from_preset("tiny", vocab_size=vocab)).state_dict(), path)
    return str(path)


def flags(csv_path, tokenizer, out_dir, **overrides) -> list[str]:
    values = dict(RUN_FLAGS, data=csv_path, tokenizer=tokenizer, out_dir=str(out_dir), **overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def rows(out_dir, key):
    with open(out_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def test_full_dpo_starts_at_ln2_and_learns_the_preference(synthetic_csv, small_tokenizer, init_weights, tmp_path):
    out = tmp_path / "dpo"
    summary = dpo.main(flags(synthetic_csv, small_tokenizer, out, init_from=init_weights))
    losses, accuracies = rows(out, "loss"), rows(out, "rewards/accuracies")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and rows(out, "val_loss")[0] == pytest.approx(
        math.log(2), abs=1e-6)
    assert accuracies[0] == 0.0 and sum(accuracies[-6:]) / 6 > 0.85, accuracies
    assert sum(losses[-6:]) / 6 < 0.6 and summary["step"] == 24
    assert rows(out, "rewards/margins")[-1] > 0 and "val_rewards/accuracies" in json.loads(
        (out / "metrics.jsonl").read_text().splitlines()[0])


def test_lora_dpo_resumes_exactly_and_loads_for_inference(synthetic_csv, small_tokenizer, init_weights, tmp_path,
                                                          capsys):
    lora = dict(init_from=init_weights, lora_rank=4, lora_alpha=8, lr=1e-2, max_iters=8, eval_interval=4,
                save_interval=4)
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    dpo.main(flags(synthetic_csv, small_tokenizer, whole, **lora))
    args = model_args_from_preset("tiny")
    kv, hidden = args.kv_heads * args.head_dim, args.ffn_hidden_dim
    sizes = [(args.dim, args.dim), (args.dim, kv), (args.dim, kv), (args.dim, args.dim), (args.dim, hidden),
             (hidden, args.dim), (args.dim, hidden)]   # (in, out) of wq wk wv wo w1 w2 w3
    adapters = 4 * sum(i + o for i, o in sizes) * args.n_layers   # rank x (in + out) per linear layer
    out = capsys.readouterr().out
    assert f"training {adapters:,} of" in out and "batch: 4 pairs x" in out   # --micro_batch_size counts pairs
    dpo.main(flags(synthetic_csv, small_tokenizer, halves, **dict(lora, max_iters=4)))
    dpo.main(["--resume", f"--out_dir={halves}", "--max_iters=8"])
    assert rows(halves, "loss") == rows(whole, "loss") and rows(whole, "loss")[0] == pytest.approx(math.log(2),
                                                                                                    abs=1e-6)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (halves, whole))
    assert a["model"].keys() == b["model"].keys() and all(k.endswith(("lora_A", "lora_B")) for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["lora"]["base"]["path"] == init_weights and a["step"] == 8
    assert len(a["optimizer"]["state"]) == len(a["model"])   # AdamW state for the adapters only
    merged, meta = load_model(str(halves / "ckpt.pt"))
    base = load_model(init_weights, max_seq_len=meta["model_args"]["max_seq_len"])[0]
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(".attention." in k or ".feed_forward." in k for k in changed)
    model, _, _ = load_for_inference(str(halves / "ckpt.pt"), tokenizer=small_tokenizer)
    tokens = torch.randint(0, model.args.vocab_size, (1, 12))
    assert torch.equal(model(tokens)[0], merged(tokens)[0])


def test_two_ranks_with_lora_equal_one_rank_with_twice_the_micro_batch(synthetic_csv, small_tokenizer,
                                                                       init_weights, tmp_path):
    """torchrun (gloo): DDP over adapters only, the loss a mean over the global pairs and the metrics too."""
    one, two = tmp_path / "one", tmp_path / "two"
    # all 60 pairs train, and all validate
    common = dict(init_from=init_weights, lora_rank=4, max_iters=3, eval_interval=3, save_interval=3,
                  val_data=synthetic_csv)
    dpo.main(flags(synthetic_csv, small_tokenizer, one, **dict(common, micro_batch_size=4)))
    torchrun("dpo.py", flags(synthetic_csv, small_tokenizer, two, **dict(common, micro_batch_size=2)))
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "val_loss"):
        assert rows(two, key) == pytest.approx(rows(one, key), rel=1e-5, abs=1e-6), key
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (one, two))
    # Adam's first steps move each weight by about lr = 3e-3 whatever the gradient's size, so the float
    # differences of a summed-over-ranks gradient show up at ~1e-5 in weights that started at zero (lora_B)
    assert all(torch.allclose(a[k], b[k], atol=3e-5) for k in a) and rows(one, "loss")[-1] != rows(one, "loss")[0]


@pytest.mark.parametrize("flag", ["--beta=0", "--label_smoothing=0.5", "--loss=kto"])
def test_bad_dpo_flags_are_refused_with_the_flags_before_anything_loads(flag):
    from train_config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=r"--beta=.* --label_smoothing=.* --loss=.*: need beta > 0"):
        parse_config([flag], dpo.DEFAULTS)
