"""The OpenAI-compatible HTTP API serve.py runs: request checking, prompt layout (with retrieved passages),
responses and server-sent-event streams, over a GenerationQueue.

    app = create_app(ModelServer(model, tokenizer, device="cpu", config=ServerConfig(model_name="sft")))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET / (the chat page), GET /health, GET /v1/models[/{id}], POST /v1/chat/completions,
POST /v1/completions; with an API key, the /v1 routes need `Authorization: Bearer KEY`. Errors are `{"error": {"message", "type", "param", "code"}}`: 400 a bad value,
401 a missing or wrong API key, 404 an unknown model or route, 413 a body or prompt too large for the
server or the model's context, 422 a field of the wrong type; the server keeps serving after each.

Extra response fields (beside OpenAI's): `dropped_turns` (oldest turns left out so the conversation fits
the context, as SFT training and chat.py do) and, with retrieval on, `sources` (the passages placed before
the question: text, file, line, score, truncated) — in the completion and in the first stream chunk.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from generation_queue import GenerationQueue, Job
from inference import document_prompt_ids, prompt_budget, sft_prompt_ids, sft_turn, special_ids
from knowledge import KnowledgeBase, Passage, rag_question

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")
SYSTEM_ROLES = ("system", "developer")
MIN_PASSAGE_CHARS = 16      # a passage cut shorter than this to fit the context is left out instead


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------- requests

class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]   # developer: newer SDKs' system
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields both endpoints take; unknown fields (user, logprobs, ...) are ignored as OpenAI's SDKs send them."""
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                       # extra, as vLLM takes it
    repetition_penalty: float | None = None        # extra, as vLLM takes it
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = 1                              # null, as some clients send it, means 1


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    rag: bool | None = None                        # retrieval for this request (default: on with --knowledge)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


# ---------------------------------------------------------------- the server's state

@dataclass
class ServerConfig:
    model_name: str
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int | None = None
    repetition_penalty: float = 1.1
    max_tokens: int = 256                  # when a request names none
    max_tokens_limit: int | None = None    # the most a request may ask for (default: the model's context)
    rag_top_k: int = 3
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_active: int = 8
    dtype: str = "auto"
    seed: int = 1337                       # seeds the per-request seeds of requests that name none


class ModelServer:
    """The model, its tokenizer, the knowledge base and the generation queue behind the routes."""

    def __init__(self, model, tokenizer, device: str, config: ServerConfig, knowledge: KnowledgeBase | None = None):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.config, self.knowledge = config, knowledge
        self.queue = GenerationQueue(model, tokenizer, device, config.dtype, config.max_active)
        self.seeds = random.Random(config.seed)
        self.created = int(time.time())
        self.context = model.args.max_seq_len
        self.max_tokens_limit = self.context if config.max_tokens_limit is None else config.max_tokens_limit
        if not 1 <= config.max_tokens <= self.max_tokens_limit:
            raise ValueError(f"--max_new_tokens={config.max_tokens} must be between 1 and the max_tokens limit "
                             f"{self.max_tokens_limit} (--max_tokens_limit, default the model's context)")


@dataclass
class Prompt:
    ids: list[int]
    dropped_turns: int = 0
    sources: list[dict] | None = None      # None: retrieval off for this request


def check_key(server: ModelServer, request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer KEY` when the server has --api_key."""
    key = server.config.api_key
    if key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
        raise APIError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)", None,
                       "invalid_api_key")


def check_model(server: ModelServer, name: str | None) -> None:
    if name is not None and name != server.config.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves "
                            f"'{server.config.model_name}'", "model", "model_not_found")


def generation_options(server: ModelServer, req: SamplingRequest) -> tuple[dict, list[str], int]:
    """(generate_stream keyword arguments, stop strings, seed) of a request, each value checked."""
    cfg = server.config
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = next((v for v in (req.max_completion_tokens, req.max_tokens) if v is not None), cfg.max_tokens)
    if not 1 <= max_tokens <= server.max_tokens_limit:
        raise APIError(400, f"max_tokens must be between 1 and {server.max_tokens_limit}, got {max_tokens}",
                       "max_tokens")
    temperature = cfg.temperature if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = cfg.top_p if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = cfg.top_k if req.top_k is None else req.top_k
    if top_k is not None and top_k < 1:
        raise APIError(400, f"top_k must be >= 1, got {top_k}", "top_k")
    penalty = cfg.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
    if penalty <= 0:
        raise APIError(400, f"repetition_penalty must be > 0, got {penalty}", "repetition_penalty")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"at most 4 stop sequences, got {len(stop)}", "stop")
    seed = req.seed if req.seed is not None else server.seeds.getrandbits(63)
    if not -2 ** 63 <= seed < 2 ** 64:   # what torch.manual_seed takes
        raise APIError(400, f"seed must be in [-2**63, 2**64), got {seed}", "seed")
    options = {"max_new_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
               "repetition_penalty": penalty, "eos_id": special_ids(server.tokenizer)[1]}
    return options, stop, seed


# ---------------------------------------------------------------- prompts

def split_messages(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]], str]:
    """(system text, earlier (user, assistant) turns, the question). System messages come first; then
    user and assistant alternate, ending with the user's question."""
    if not messages:
        raise APIError(400, "messages must not be empty", "messages")
    lead = next((i for i, m in enumerate(messages) if m.role not in SYSTEM_ROLES), len(messages))
    system, rest = [m.text() for m in messages[:lead]], messages[lead:]
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(400, f"messages[{lead + i}]: expected a {expected} message (system messages first, "
                                f"then user and assistant alternate), got {message.role}", f"messages.{lead + i}.role")
    if not rest or rest[-1].role != "user":
        raise APIError(400, "the last message must be the user's question", "messages")
    turns = [(rest[i].text(), rest[i + 1].text()) for i in range(0, len(rest) - 1, 2)]
    return "\n".join(s for s in system if s), turns, rest[-1].text()


def chat_prompt(server: ModelServer, req: ChatRequest, max_tokens: int) -> Prompt:
    """SFT's layout: earlier turns `prompt <bos> answer <eos>`, then `question <bos>`, where the question
    carries the system text and the retrieved passages before it; the oldest turns go first when it does
    not fit the context minus the room for the answer."""
    system, turns, question = split_messages(req.messages)
    rag = server.knowledge is not None if req.rag is None else req.rag
    if rag and server.knowledge is None:
        raise APIError(400, "retrieval was asked for, but the server was started without --knowledge", "rag")
    tok, budget = server.tokenizer, prompt_budget(server.context, max_tokens)
    prefix = f"{system}\n" if system else ""
    if len(tok.encode(prefix + question)) + 1 > budget:
        raise APIError(413, f"the question takes more than the {budget} tokens the context ({server.context}) "
                            f"leaves beside max_tokens={max_tokens}; shorten it or ask for fewer tokens",
                       "messages", "context_length_exceeded")
    sources = None
    if rag:
        hits = server.knowledge.search(question, server.config.rag_top_k)
        question, sources = fit_passages(tok, prefix, question, hits, budget)
    history = [sft_turn(tok, user, answer) for user, answer in turns]
    ids, dropped = sft_prompt_ids(tok, prefix + question, history, budget)
    return Prompt(ids, dropped, sources)


def fit_passages(tok, prefix: str, question: str, hits: list[Passage], budget: int) -> tuple[str, list[dict]]:
    """(question with as many retrieved passages before it as fit `budget` tokens, the sources used). A
    passage that does not fit whole is cut to the part that does, and the rest are left out."""
    def fits(texts: list[str]) -> bool:
        return len(tok.encode(prefix + rag_question(question, texts))) + 1 <= budget

    texts, sources = [], []
    for hit in hits:
        text, truncated = hit.text, False
        if not fits(texts + [text]):
            low, high = 0, len(text)            # the longest start of the passage that fits
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits(texts + [text[:mid]]) else (low, mid - 1)
            text, truncated = text[:low], True
            if len(text) < MIN_PASSAGE_CHARS:
                break
        texts.append(text)
        sources.append({"text": text, "file": hit.file, "line": hit.line, "score": round(hit.score, 4),
                        "truncated": truncated})
        if truncated:
            break
    return rag_question(question, texts), sources


def completion_prompt(server: ModelServer, req: CompletionRequest, max_tokens: int) -> Prompt:
    """Pretraining layout: a document start (`<eos>`) then the prompt text, continued."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise APIError(400, f"exactly one prompt per request is supported, got {len(prompts)}", "prompt")
    ids = document_prompt_ids(server.tokenizer, prompts[0])
    budget = prompt_budget(server.context, max_tokens)
    if len(ids) > budget:
        raise APIError(413, f"the prompt is {len(ids)} tokens; the context ({server.context}) leaves {budget} "
                            f"beside max_tokens={max_tokens}", "prompt", "context_length_exceeded")
    return Prompt(ids)


# ---------------------------------------------------------------- responses

@dataclass
class Reply:
    """What one request became: its prompt, its job, and how to shape its chunks."""
    kind: Literal["chat", "text"]
    prompt: Prompt
    job: Job
    include_usage: bool
    model: str
    id: str
    created: int

    def extras(self) -> dict:
        extra = {"dropped_turns": self.prompt.dropped_turns} if self.kind == "chat" else {}
        if self.prompt.sources is not None:
            extra["sources"] = self.prompt.sources
        return extra

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = len(self.prompt.ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def head(self) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def completion(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self.head(), "choices": [choice], "usage": self.usage(completion_tokens), **self.extras()}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        head = {**self.head(), "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion"}
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **(self.extras() if first else {})}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def job_events(job: Job, request: Request) -> AsyncIterator[tuple]:
    """The job's events until done or error; a client gone away cancels the job (checked every second
    while nothing arrives, e.g. while queued)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield event
            if event[0] != "text":
                return
    finally:
        job.cancelled.set()


async def collect(reply: Reply, request: Request) -> JSONResponse:
    pieces = []
    async for event in job_events(reply.job, request):
        if event[0] == "text":
            pieces.append(event[1])
        elif event[0] == "done":
            return JSONResponse(reply.completion("".join(pieces), event[1], event[2]))
        else:
            return APIError(500, event[1], kind="server_error").response()
    return APIError(499, "client closed the request").response()


async def stream(reply: Reply, request: Request) -> AsyncIterator[str]:
    try:
        async for line in _stream_lines(reply, request):
            yield line
    finally:   # the client went away (this generator was closed early): stop its generation
        reply.job.cancelled.set()


async def _stream_lines(reply: Reply, request: Request) -> AsyncIterator[str]:
    if reply.kind == "chat":
        yield sse(reply.chunk(None, first=True))
    async for event in job_events(reply.job, request):
        if event[0] == "text":
            yield sse(reply.chunk(event[1]))
        elif event[0] == "done":
            yield sse(reply.chunk(None, finish_reason=event[1]))
            if reply.include_usage:
                yield sse({**reply.head(), "object": "chat.completion.chunk" if reply.kind == "chat"
                           else "text_completion", "choices": [], "usage": reply.usage(event[2])})
        else:
            yield sse(error_body(event[1], "server_error"))
    yield sse("[DONE]")


# ---------------------------------------------------------------- the app

async def read_body(request: Request, limit: int, schema: type[BaseModel]) -> BaseModel:
    """The request body parsed against `schema`: 413 over `limit` bytes, 400 not JSON, 422 wrong fields."""
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body over {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise APIError(400, f"malformed JSON body ({exc})", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", None, "invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(422, f"field {param or 'body'}: {first['msg']} ({exc.error_count()} error(s))", param,
                       "invalid_type") from None


async def answer(server: ModelServer, request: Request, kind: Literal["chat", "text"]):
    check_key(server, request)
    req = await read_body(request, server.config.max_body_bytes, ChatRequest if kind == "chat" else CompletionRequest)
    check_model(server, req.model)
    options, stop, seed = generation_options(server, req)
    # tokenising and retrieval run in a worker thread, so the streams being served are not held up
    layout = chat_prompt if kind == "chat" else completion_prompt
    prompt = await run_in_threadpool(layout, server, req, options["max_new_tokens"])
    job = Job(prompt.ids, options, stop, seed, asyncio.get_running_loop())
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    reply = Reply(kind, prompt, job, bool(req.stream_options and req.stream_options.include_usage),
                  server.config.model_name, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))
    server.queue.submit(job)
    if req.stream:
        return StreamingResponse(stream(reply, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(reply, request)


def model_card(server: ModelServer) -> dict:
    return {"id": server.config.model_name, "object": "model", "created": server.created,
            "owned_by": "mini-chinese-gpt", "max_model_len": server.context}


def create_app(server: ModelServer) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.queue.start()
        yield
        server.queue.close()

    app = FastAPI(title="Mini-Chinese-GPT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return APIError(exc.status_code, message, None, "not_found" if exc.status_code == 404 else None).response()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_PAGE, media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health():
        kb = server.knowledge
        return {"status": "ok", "model": server.config.model_name, "context": server.context,
                "active": server.queue.active, "waiting": server.queue.waiting,
                "completed": server.queue.completed, "cancelled": server.queue.cancelled,
                "knowledge": None if kb is None else {"file": kb.path, "passages": len(kb),
                                                       "top_k": server.config.rag_top_k}}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(server, request)
        return {"object": "list", "data": [model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        check_key(server, request)
        check_model(server, name)
        return model_card(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(server, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(server, request, "text")

    return app
