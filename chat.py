"""Chat with a fine-tuned model in the terminal, the answer streaming as it is generated (KV cache).

    python chat.py --ckpt=out/sft/ckpt.pt
    python chat.py --ckpt=out/hf --temperature=0.3 --max_new_tokens=512        # an exported HF folder
    printf '头痛怎么办？\\n需要去医院吗？\\n' | python chat.py --ckpt=out/sft/ckpt.pt   # one question a line

Commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves, /help lists them; Ctrl-C stops the
answer being written and keeps the program running (that unfinished turn is not remembered). An answer
that reached --max_new_tokens before `<eos>` ends with a `[cut at --max_new_tokens=N]` mark.

Each question is laid out as SFT trained on: the earlier turns `prompt <bos> answer <eos>` oldest first,
then `question <bos>`; the answer runs to `<eos>` or --max_new_tokens (a cut answer stays in the conversation
without an `<eos>`: the model never wrote one). When the conversation no longer
fits the model's context (minus the room kept for the answer), the oldest turns are dropped, and a note
says so. With stdin from a pipe or file, each line is a question, echoed before its answer.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator, TextIO

import torch

from dataset_sft import Turn
from inference import (add_model_args, add_sampling_args, autocast_for, describe_model, load_for_inference,
                       pick_device, prompt_budget, run_main, sampling_kwargs, sft_prompt_ids, sft_turn,
                       special_ids, stream_text)

HELP = "commands: /reset forget the conversation, /exit leave (or Ctrl-D); Ctrl-C stops an answer"
USER, ASSISTANT = "你：", "助手："


class ChatSession:
    """A conversation: the finished turns (as token ids, exactly as generated) and how to answer the next."""

    def __init__(self, model, tokenizer, options: dict, device: str,
                 autocast: contextlib.AbstractContextManager | None = None, notice: TextIO = sys.stderr):
        self.model, self.tokenizer, self.options, self.device = model, tokenizer, options, device
        self.autocast = autocast or contextlib.nullcontext()
        self.budget = prompt_budget(model.args.max_seq_len, options["max_new_tokens"])
        self.notice = notice
        self.history: list[Turn] = []
        self.cut: list[bool] = []      # per turn of history: its answer stopped at max_new_tokens, not at <eos>
        self.last_answer_cut = False

    def reset(self) -> None:
        self.history, self.cut = [], []

    def reply(self, question: str) -> Iterator[str]:
        """Text pieces of the answer as generated. The turn joins the history only when the answer is
        complete: a generator closed early (Ctrl-C) leaves the history as it was."""
        ids, dropped = sft_prompt_ids(self.tokenizer, question, self.history, self.budget, self.cut)
        if dropped:
            self.history, self.cut = self.history[dropped:], self.cut[dropped:]
            print(f"(dropped the oldest {dropped} turn(s): the conversation no longer fits "
                  f"{self.budget} tokens)", file=self.notice)
        answer_ids: list[int] = []
        with self.autocast:
            yield from stream_text(self.model, self.tokenizer, ids, self.options, self.device, answer_ids)
        self.last_answer_cut = len(answer_ids) >= self.options["max_new_tokens"]
        self.history.append(sft_turn(self.tokenizer, question, answer_ids))
        self.cut.append(self.last_answer_cut)   # a cut answer is remembered without the <eos> it never had


def stdin_reader(interactive: bool) -> Callable[[], str | None]:
    """A function returning the next line of input, or None at end of input."""
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        def read() -> str | None:
            try:
                return input(USER)
            except EOFError:
                return None
        return read
    return lambda: sys.stdin.readline() or None


def answer(session: ChatSession, question: str, out: TextIO) -> None:
    out.write(ASSISTANT)
    out.flush()
    pieces = session.reply(question)
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()
        out.write(" [stopped]")
    else:
        if session.last_answer_cut:
            out.write(f" [cut at --max_new_tokens={session.options['max_new_tokens']}]")
    out.write("\n\n")
    out.flush()


def chat_loop(session: ChatSession, read_line: Callable[[], str | None], out: TextIO, echo: bool) -> None:
    """Read questions and commands until /exit or end of input; `echo` repeats each question (pipes)."""
    while True:
        try:
            line = read_line()
        except KeyboardInterrupt:
            out.write(f"\n({HELP})\n")
            continue
        if line is None:
            return
        question = line.strip()
        if not question:
            continue
        if question == "/exit":
            return
        if question == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
        elif question.startswith("/"):
            out.write(f"({HELP})\n")
        else:
            if echo:
                out.write(f"{USER}{question}\n")
            answer(session, question, out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_ckpt="out/sft/ckpt.pt")
    add_sampling_args(parser, max_new_tokens=256)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, tokenizer, meta = load_for_inference(args.ckpt, args.tokenizer, device, args.n_heads)
    print(describe_model(args.ckpt, model, meta), file=sys.stderr)
    torch.manual_seed(args.seed)
    session = ChatSession(model, tokenizer, sampling_kwargs(args, eos_id=special_ids(tokenizer)[1]), device,
                          autocast_for(device, args.dtype))
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    chat_loop(session, stdin_reader(interactive), sys.stdout, echo=not interactive)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
