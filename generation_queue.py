"""Runs the server's generations: one worker thread steps the active requests in turn, a token (or a
held-back multi-byte character) at a time, through inference.stream_text, the loop chat.py and eval.py use.

    queue = GenerationQueue(model, tokenizer, device="cpu", dtype="auto", max_active=8)
    queue.start()
    job = Job(prompt_ids, options, stop=["\\n\\n"], seed=7, loop=asyncio.get_running_loop())
    queue.submit(job)
    event = await job.events.get()     # ("text", piece) ... then ("done", finish_reason, n) or ("error", msg)
    job.cancelled.set()                # the client went away: its generation stops at the next step

Why round-robin and not batching: every request keeps its own KV cache inside its own generator (caches
are never shared or interleaved), so a long answer does not hold the others back, and a second, batched
decoding loop is not needed. Aggregate tokens/s equals one stream's (benchmarks/bench_serve.py). Sampling
stays reproducible per request: each job carries its own torch RNG state, swapped in around its steps,
so `seed` gives the same text however many other requests run alongside.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from inference import autocast_for, resolve_dtype, stream_text


@dataclass
class Job:
    """One generation request. `options` are Transformer.generate_stream's keyword arguments."""
    prompt_ids: list[int]
    options: dict
    stop: list[str]
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    token_ids: list[int] = field(default_factory=list)   # generated so far (the usage count)


class StopMatcher:
    """Cuts streamed text at the first stop string. Text that could be the start of a stop string is held
    back until the next piece settles it, so a stop string never leaks out in pieces."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        text = self.held + piece
        found = [text.find(s) for s in self.stops if s in text]
        if found:
            self.held = ""
            return text[:min(found)], True
        keep = next((n for n in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1)
                     if any(s.startswith(text[-n:]) for s in self.stops)), 0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass
class _Running:
    job: Job
    pieces: Iterator[str]
    rng: tuple
    matcher: StopMatcher


class GenerationQueue:
    """FIFO admission of jobs, up to `max_active` generating at once, stepped round-robin in one thread."""

    def __init__(self, model, tokenizer, device: str, dtype: str = "auto", max_active: int = 8):
        if max_active < 1:
            raise ValueError(f"--max_active must be >= 1, got {max_active}")
        # resolved once: autocast_for runs per generated token
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, resolve_dtype(device, dtype)
        self.max_active = max_active
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.active = 0
        self.completed = 0   # finished (eos, max_new_tokens, stop string or error)
        self.cancelled = 0   # dropped because the client went away

    @property
    def waiting(self) -> int:
        return self._pending.qsize()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._pending.put(job)

    def _run(self) -> None:
        active: list[_Running] = []
        while True:
            while len(active) < self.max_active:
                try:
                    job = self._pending.get(block=not active)
                except queue.Empty:
                    break
                if job is None:
                    for running in active:
                        running.pieces.close()
                    return
                if job.cancelled.is_set():
                    self.cancelled += 1
                    continue
                try:
                    active.append(self._begin(job))
                except Exception as exc:   # a bad job must not stop the worker that serves all the others
                    self._post(job, ("error", f"generation failed to start: {type(exc).__name__}: {exc}"))
                    self._finish(job, None)
            active = [running for running in active if self._step(running)]
            self.active = len(active)

    def _begin(self, job: Job) -> _Running:
        torch.manual_seed(job.seed)
        pieces = stream_text(self.model, self.tokenizer, job.prompt_ids, job.options, self.device, job.token_ids)
        return _Running(job, pieces, self._rng_state(), StopMatcher(job.stop))

    def _step(self, running: _Running) -> bool:
        """Advance one job by one piece of text; False when it has finished (or was cancelled)."""
        job = running.job
        if job.cancelled.is_set():
            running.pieces.close()
            self.cancelled += 1
            return False
        self._set_rng_state(running.rng)
        try:
            with autocast_for(self.device, self.dtype):
                piece = next(running.pieces)
        except StopIteration:
            self._post(job, ("text", running.matcher.flush()))
            cut = len(job.token_ids) >= job.options["max_new_tokens"]
            return self._finish(job, "length" if cut else "stop")
        except Exception as exc:   # one request failing (e.g. out of memory) must not stop the server
            self._post(job, ("error", f"generation failed: {type(exc).__name__}: {exc}"))
            return self._finish(job, None)
        finally:
            running.rng = self._rng_state()
        text, stopped = running.matcher.push(piece)
        self._post(job, ("text", text))
        if stopped:
            running.pieces.close()
            return self._finish(job, "stop")
        return True

    def _finish(self, job: Job, finish_reason: str | None) -> bool:
        if finish_reason is not None:
            self._post(job, ("done", finish_reason, len(job.token_ids)))
        self.completed += 1
        return False

    @staticmethod
    def _post(job: Job, event: tuple) -> None:
        if event[0] == "text" and not event[1]:
            return
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:   # the event loop is gone (server shutting down)
            job.cancelled.set()

    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.startswith("cuda") else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)
