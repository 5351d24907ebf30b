"""chat.py: driven through a pipe, multi-turn layout, history trimming, Ctrl-C, streaming decode.

    python -m pytest -q tests/test_chat.py
"""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_eval import save_tiny_checkpoint

import chat
from dataset_sft import layout_sample
from inference import StreamDecoder, load_for_inference, sft_prompt_ids, sft_turn


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir) -> str:
    path = str(tmp_path_factory.mktemp("chat") / "ckpt.pt")
    save_tiny_checkpoint(path, tokenizer_dir, seed=3)
    return path


def greedy_answer(ckpt: str, question: str, max_new_tokens: int) -> str:
    """The answer as chat.py should print it: greedy text, marked when it reached max_new_tokens."""
    model, tok, _ = load_for_inference(ckpt)
    ids, _ = sft_prompt_ids(tok, question, [], 10_000)
    new = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=0, eos_id=2)[0].tolist()
    cut = f" [cut at --max_new_tokens={max_new_tokens}]" if len(new) == max_new_tokens else ""
    return tok.decode_ids(new) + cut


def test_chat_through_a_pipe(tiny_ckpt):
    stdin = "你好\n/reset\n\n头痛怎么办？\n/help\n/exit\n这一行不该被回答\n"
    proc = subprocess.run([sys.executable, "chat.py", f"--ckpt={tiny_ckpt}", "--max_new_tokens=6",
                           "--temperature=0"], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count(chat.ASSISTANT) == 2 and "这一行不该被回答" not in out
    assert out.index("你：你好") < out.index("(conversation reset)") < out.index("你：头痛怎么办？")
    assert "commands: /reset" in out
    first_answer = out.split(chat.ASSISTANT)[1].split("\n\n")[0]
    assert first_answer == greedy_answer(tiny_ckpt, "你好", 6)   # the streamed text is the whole answer


class RecordingModel:
    """Stands in for a Transformer: records each prompt, answers with fixed ids, or is interrupted."""

    def __init__(self, max_seq_len: int, answer_ids: list[int], interrupt_on: int | None = None):
        self.args = type("Args", (), {"max_seq_len": max_seq_len})()
        self.answer_ids, self.interrupt_on = answer_ids, interrupt_on
        self.prompts: list[list[int]] = []

    def generate_stream(self, tokens, max_new_tokens, **options):
        self.prompts.append(tokens[0].tolist())
        for i, token_id in enumerate(self.answer_ids[:max_new_tokens]):
            if len(self.prompts) == self.interrupt_on and i == 1:
                raise KeyboardInterrupt   # the user pressed Ctrl-C while this answer was being written
            yield token_id


def session_for(model, tokenizer, max_new_tokens: int = 4) -> tuple[chat.ChatSession, io.StringIO]:
    notices = io.StringIO()
    options = {"max_new_tokens": max_new_tokens, "temperature": 0, "eos_id": 2}
    return chat.ChatSession(model, tokenizer, options, "cpu", notice=notices), notices


def feed(lines: list[str]):
    it = iter(lines)
    return lambda: next(it, None)


def test_turns_are_laid_out_as_sft_trains_and_reset_forgets(tokenizer):
    answer = tokenizer.encode("多休息")
    model = RecordingModel(512, answer)
    session, _ = session_for(model, tokenizer)
    out = io.StringIO()
    chat.chat_loop(session, feed(["头痛怎么办？", "还要注意什么？", "/reset", "你好"]), out, echo=False)
    first, second, after_reset = model.prompts
    assert first == tokenizer.encode("头痛怎么办？") + [1]
    turn_ids, _ = layout_sample([sft_turn(tokenizer, "头痛怎么办？", answer[:4])], 1, 2)
    assert second == turn_ids + tokenizer.encode("还要注意什么？") + [1]
    assert after_reset == tokenizer.encode("你好") + [1]
    assert out.getvalue().count(chat.ASSISTANT + "多休息") == 3


def test_history_is_trimmed_oldest_first_to_fit_the_context(tokenizer):
    answer = tokenizer.encode("这是一个比较长的回答内容")
    model = RecordingModel(48, answer)
    session, notices = session_for(model, tokenizer, max_new_tokens=8)
    questions = [f"第{i}个问题是什么意思呢？" for i in range(6)]
    chat.chat_loop(session, feed(questions), io.StringIO(), echo=False)
    assert session.budget == 40                                  # 48 minus room for 8 new tokens
    turns = [sft_turn(tokenizer, q, answer[:8]) for q in questions]
    for i, prompt in enumerate(model.prompts):
        question = tokenizer.encode(questions[i]) + [1]
        kept = max(k for k in range(i + 1) if len(layout_sample(turns[i - k:i], 1, 2)[0]) + len(question) <= 40)
        assert prompt == layout_sample(turns[i - kept:i], 1, 2)[0] + question   # the newest turns that fit
    assert 1 <= kept < 5 and "dropped the oldest" in notices.getvalue()


def test_ctrl_c_stops_the_answer_but_not_the_program(tokenizer):
    model = RecordingModel(512, tokenizer.encode("先量血压再说"), interrupt_on=1)
    session, _ = session_for(model, tokenizer, max_new_tokens=8)
    out = io.StringIO()
    chat.chat_loop(session, feed(["血压高怎么办？", "你好"]), out, echo=True)
    text = out.getvalue()
    assert "[stopped]" in text and "你：你好" in text
    assert model.prompts[1] == tokenizer.encode("你好") + [1]    # the stopped turn was not remembered
    assert len(session.history) == 1


def test_an_answer_cut_by_max_new_tokens_is_marked(tokenizer):
    model = RecordingModel(512, tokenizer.encode("多喝水，注意休息，按时吃药"))
    session, _ = session_for(model, tokenizer, max_new_tokens=3)
    out = io.StringIO()
    chat.chat_loop(session, feed(["感冒了怎么办？"]), out, echo=False)
    assert out.getvalue().endswith(" [cut at --max_new_tokens=3]\n\n")
    model.answer_ids = tokenizer.encode("多喝水")[:2]               # ends (at <eos>) before the limit
    out = io.StringIO()
    chat.chat_loop(session, feed(["还有呢？"]), out, echo=False)
    assert "[cut" not in out.getvalue() and len(session.history) == 2


def test_an_answer_cut_by_max_new_tokens_joins_the_history_without_eos(tokenizer):
    """Before: the cut answer was laid out with an <eos> the model never produced, teaching the next prompt a
    conversation that never happened."""
    answer = tokenizer.encode("多喝水，注意休息，按时吃药")
    model = RecordingModel(512, answer)
    session, _ = session_for(model, tokenizer, max_new_tokens=3)
    chat.chat_loop(session, feed(["感冒了怎么办？", "还有呢？"]), io.StringIO(), echo=False)
    first, second = (tokenizer.encode(q) + [1] for q in ("感冒了怎么办？", "还有呢？"))
    assert model.prompts[1] == first + answer[:3] + second                # no <eos> (2) after the cut answer
    model.answer_ids = answer[:2]                                         # this one ends before the limit
    chat.chat_loop(session, feed(["好的", "谢谢"]), io.StringIO(), echo=False)
    third, fourth = (tokenizer.encode(q) + [1] for q in ("好的", "谢谢"))
    assert model.prompts[3] == first + answer[:3] + second + answer[:3] + third + answer[:2] + [2] + fourth
    assert session.cut == [True, True, False, False]


def test_stream_decoder_never_splits_a_multibyte_character(tokenizer):
    text = "罕见字𠀀和龘，还有表情😀。"
    ids = tokenizer.encode(text)
    assert any(tokenizer.tokenizer.sp_model.id_to_piece(i).startswith("<0x") for i in ids)   # byte pieces
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode_ids(ids) == text
    assert sum(1 for p in pieces if p) < len(ids)                # byte pieces were held back until complete
