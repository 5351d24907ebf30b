"""serve.py against a real uvicorn server on 127.0.0.1 (a free port), with the official `openai` client:
answers equal inference.py's for the same prompt and settings, streaming, multi-turn, stop, seed, usage,
concurrency, bad requests, and retrieval (knowledge.py) with its recall@k on a medical Q&A file.

    python -m pytest -q tests/test_serve.py -s      # -s prints the measured recall@k
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import httpx
import openai
import pytest
import torch

from conftest import REPO
from test_eval import save_tiny_checkpoint

from generation_queue import GenerationQueue, Job, StopMatcher
from inference import document_prompt_ids, load_for_inference, prompt_budget, sft_prompt_ids, sft_turn
from knowledge import KnowledgeBase, rag_question, tokenize_zh
from openai_api import APIError, ChatRequest, ModelServer, ServerConfig, chat_prompt, fit_passages

KNOWLEDGE = os.path.join(REPO, "tests", "fixtures", "serve", "medical_qa.jsonl")
API_KEY = "sk-test-key"
SERVER_SAMPLING = {"top_p": 0.9, "repetition_penalty": 1.1, "eos_id": 2}   # serve.py's defaults
# questions asked in other words than the knowledge file's, and the line of the passage that answers them
PARAPHRASES = {"喝咖啡对高血压有影响吗": 1, "幽门螺旋杆菌阳性吃什么药": 2, "糖尿病能不能吃苹果": 3, "发烧吃布洛芬": 4,
               "贫血怎么补": 5, "胃里反酸烧心是什么病": 11, "被狗咬了要打疫苗吗": 25, "拉不出大便怎么办": 28,
               "小孩手上脚上长疹子": 15, "晚上睡不着觉能吃药吗": 14, "怀孕了能打流感疫苗吗": 9, "痛风不能吃什么": 8,
               "心口疼含什么药": 17, "骨头断了石膏打多久": 37}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(ckpt: str, *flags: str) -> Iterator[str]:
    """Run `serve.py --ckpt=ckpt flags` on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt={ckpt}", f"--port={port}", *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve.py exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "serve.py did not start within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir) -> str:
    """A random tiny model; untied, so greedy answers vary instead of repeating the prompt's last token."""
    path = str(tmp_path_factory.mktemp("serve") / "ckpt.pt")
    save_tiny_checkpoint(path, tokenizer_dir, seed=3, tie_embeddings=False)
    return path


@pytest.fixture(scope="module")
def knowledge_file(tmp_path_factory) -> str:
    """A copy of the Q&A file (the index cache is written beside it)."""
    path = str(tmp_path_factory.mktemp("kb") / "medical_qa.jsonl")
    shutil.copyfile(KNOWLEDGE, path)
    return path


@pytest.fixture(scope="module")
def server(tiny_ckpt, knowledge_file) -> Iterator[str]:
    with serve(tiny_ckpt, f"--knowledge={knowledge_file}", f"--api_key={API_KEY}", "--max_tokens_limit=200",
               "--max_new_tokens=64", "--served_model_name=serve") as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    """The same checkpoint loaded here: (model, tokenizer), the reference for the server's answers."""
    model, tok, _ = load_for_inference(tiny_ckpt)
    return model, tok


def generated(local, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
              seed: int | None = None) -> tuple[str, int]:
    """(text, new tokens) that inference.py's loop (model.generate) produces for these ids and settings."""
    model, tok = local
    if seed is not None:
        torch.manual_seed(seed)
    new = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, temperature=temperature,
                         **SERVER_SAMPLING)[0].tolist()
    return tok.decode_ids(new), len(new)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model="serve", messages=messages, extra_body={"rag": False}, **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- answers equal inference.py's

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["serve"]
    health = httpx.get(f"{server}/health").json()
    assert health["knowledge"]["passages"] == 40 and health["context"] == 256


def test_chat_equals_inference_with_usage(client, local):
    ids, _ = sft_prompt_ids(local[1], "头痛怎么办？", [], 10_000)
    text, n_new = generated(local, ids, 12)
    reply = chat(client, user("头痛怎么办？"), temperature=0, max_tokens=12)
    assert text and reply.choices[0].message.content == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n_new)
    assert reply.usage.total_tokens == len(ids) + n_new
    assert reply.choices[0].finish_reason == ("length" if n_new == 12 else "stop")
    assert reply.dropped_turns == 0 and not hasattr(reply, "sources")   # retrieval was off


def test_streaming_equals_non_streaming(client, local):
    ids, _ = sft_prompt_ids(local[1], "头痛怎么办？", [], 10_000)
    text, n_new = generated(local, ids, 12)
    chunks = list(chat(client, user("头痛怎么办？"), temperature=0, max_tokens=12, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].dropped_turns == 0
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == text            # streamed in pieces, the same text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == n_new == 12 and chunks[-1].usage.prompt_tokens == len(ids)


def test_multi_turn_and_system_are_laid_out_as_sft(client, local):
    tok = local[1]
    messages = [{"role": "system", "content": "你是医生。"}, *user("我头痛。"),
                {"role": "assistant", "content": "多久了？"}, *user("三天了。")]
    history = [sft_turn(tok, "我头痛。", "多久了？")]
    ids, _ = sft_prompt_ids(tok, "你是医生。\n三天了。", history, 10_000)
    text, _ = generated(local, ids, 10)
    reply = chat(client, messages, temperature=0, max_tokens=10)
    assert text and reply.choices[0].message.content == text and reply.usage.prompt_tokens == len(ids)


def test_long_conversation_drops_oldest_turns_and_says_so(client, local):
    tok = local[1]
    turns = [(f"第{i}个问题：最近总是觉得很累，晚上睡不好，白天没精神，这是为什么？", f"第{i}个回答：建议规律作息，适当运动。")
             for i in range(10)]
    messages = [m for q, a in turns for m in (*user(q), {"role": "assistant", "content": a})] + user("怎么办？")
    ids, dropped = sft_prompt_ids(tok, "怎么办？", [sft_turn(tok, q, a) for q, a in turns], prompt_budget(256, 16))
    assert 0 < dropped < 10
    text, _ = generated(local, ids, 16)
    reply = chat(client, messages, temperature=0, max_tokens=16)
    assert reply.dropped_turns == dropped and reply.usage.prompt_tokens == len(ids) <= 240
    assert reply.choices[0].message.content == text


def test_stop_sequence_cuts_the_answer(client, local):
    ids, _ = sft_prompt_ids(local[1], "头痛怎么办？", [], 10_000)
    text, _ = generated(local, ids, 12)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    reply = chat(client, user("头痛怎么办？"), temperature=0, max_tokens=12, stop=[stop, "不会出现的停止词"])
    assert reply.choices[0].message.content == text[:text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = chat(client, user("头痛怎么办？"), temperature=0, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.index(stop)]


def test_stop_matcher_holds_back_a_possible_stop_string():
    matcher = StopMatcher(["END", "停止"])
    assert matcher.push("abcE") == ("abc", False)         # "E" may begin "END"
    assert matcher.push("Nx") == ("ENx", False)
    assert matcher.push("停") == ("", False)
    assert matcher.push("止了") == ("", True)


def test_a_failing_generation_does_not_stop_the_queue(local):
    model, tok = local
    options = {"max_new_tokens": 3, "temperature": 0, **SERVER_SAMPLING}

    async def run() -> tuple[tuple, list[tuple]]:
        loop = asyncio.get_running_loop()
        queue = GenerationQueue(model, tok, "cpu")
        queue.start()
        bad, good = Job([10 ** 6], options, [], 0, loop), Job([5, 6, 1], options, [], 0, loop)
        queue.submit(bad)
        queue.submit(good)
        bad_event, good_events = await bad.events.get(), [await good.events.get()]
        while good_events[-1][0] == "text":
            good_events.append(await good.events.get())
        queue.close()
        return bad_event, good_events

    bad_event, good_events = asyncio.run(run())
    assert bad_event[0] == "error" and "prompt token ids must be in" in bad_event[1]
    assert good_events[-1] == ("done", "length", 3)
    assert "".join(e[1] for e in good_events[:-1]) == generated(local, [5, 6, 1], 3)[0]


def test_seed_reproduces_sampling(client, local):
    ids, _ = sft_prompt_ids(local[1], "感冒了怎么办？", [], 10_000)
    text, _ = generated(local, ids, 10, temperature=1.0, seed=42)
    first = chat(client, user("感冒了怎么办？"), temperature=1.0, max_tokens=10, seed=42).choices[0].message.content
    again = chat(client, user("感冒了怎么办？"), temperature=1.0, max_tokens=10, seed=42).choices[0].message.content
    other = chat(client, user("感冒了怎么办？"), temperature=1.0, max_tokens=10, seed=43).choices[0].message.content
    assert first == again == text and other != first


def test_completions_continue_a_document(client, local):
    ids = document_prompt_ids(local[1], "高血压的常见症状")
    text, n_new = generated(local, ids, 8)
    reply = client.completions.create(model="serve", prompt="高血压的常见症状", max_tokens=8, temperature=0)
    assert text and reply.choices[0].text == text and reply.usage.completion_tokens == n_new
    streamed = client.completions.create(model="serve", prompt="高血压的常见症状", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


# ---------------------------------------------------------------- several clients at once

QUESTIONS = ["头痛怎么办？", "感冒了怎么办？", "血压高吃什么？", "失眠怎么办？", "胃疼吃什么药？", "咳嗽不停怎么办？",
             "孩子发烧怎么办？", "腰疼怎么缓解？"]


def test_eight_concurrent_streams_each_get_their_solo_answer_and_a_dropped_client_frees_its_slot(
        client, local, server):
    solo = {q: generated(local, sft_prompt_ids(local[1], q, [], 10_000)[0], 24)[0] for q in QUESTIONS}
    assert len(set(solo.values())) == len(QUESTIONS)                  # distinct answers: cross-talk would show
    before = httpx.get(f"{server}/health").json()
    answers: dict[str, str] = {}
    started = threading.Barrier(len(QUESTIONS) + 1)

    def ask(question: str) -> None:
        started.wait()
        stream = chat(client, user(question), temperature=0, max_tokens=24, stream=True)
        answers[question] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def drop() -> None:   # a long answer whose client goes away after two chunks
        started.wait()
        with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"messages": user("讲一个很长的故事"), "max_tokens": 200, "stream": True,
                                "rag": False}) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i == 3:
                    break

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS[1:]] + [threading.Thread(target=drop)]
    threads.append(threading.Thread(target=ask, args=(QUESTIONS[0],)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == solo
    deadline = time.time() + 10
    while (health := httpx.get(f"{server}/health").json())["active"] or health["waiting"]:
        assert time.time() < deadline, f"the dropped client's generation still runs: {health}"
        time.sleep(0.2)
    assert health["cancelled"] == before["cancelled"] + 1             # stopped early, not run to 200 tokens


# ---------------------------------------------------------------- bad requests

def post(server: str, body, key: str = API_KEY) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server}/v1/chat/completions", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


BAD_REQUESTS = [   # (body or bytes, api key, status, param or code the error names)
    (b'{"messages": [{"role": "user", "content": "hi"}', API_KEY, 400, "invalid_json"),
    ({"model": "gpt-4", "messages": user("hi")}, API_KEY, 404, "model_not_found"),
    ({"messages": []}, API_KEY, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, API_KEY, 400, "messages.0.role"),
    ({"messages": user("头痛" * 400), "rag": False}, API_KEY, 413, "context_length_exceeded"),
    ({"messages": user("hi"), "max_tokens": -1}, API_KEY, 400, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": 10 ** 9}, API_KEY, 400, "max_tokens"),
    ({"messages": user("hi"), "temperature": "hot"}, API_KEY, 422, "temperature"),
    ({"messages": "hi"}, API_KEY, 422, "messages"),
    ({"messages": user("hi"), "n": 2}, API_KEY, 400, "n"),
    ({"messages": user("hi"), "seed": 2 ** 70}, API_KEY, 400, "seed"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, API_KEY, 400, "stop"),
    ({"messages": user("x" * (1 << 20))}, API_KEY, 413, "request_too_large"),
    ({"messages": user("hi")}, "sk-wrong", 401, "invalid_api_key"),
]


@pytest.mark.parametrize("body,key,status,names", BAD_REQUESTS, ids=[str(b[3]) for b in BAD_REQUESTS])
def test_bad_request_gets_its_error_and_the_server_keeps_serving(server, client, body, key, status, names):
    response = post(server, body, key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert names in (error["param"], error["code"])
    assert chat(client, user("你好"), max_tokens=2).choices[0].message.content is not None


def test_openai_client_raises_the_matching_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=user("hi"))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as too_long:
        client.completions.create(model="serve", prompt="头痛" * 400, max_tokens=8)
    assert too_long.value.status_code == 413 and too_long.value.code == "context_length_exceeded"
    assert httpx.get(f"{server}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 404


# ---------------------------------------------------------------- retrieval

def test_recall_at_3_on_the_medical_qa_file(knowledge_file):
    kb = KnowledgeBase.open(knowledge_file)
    records = [json.loads(line) for line in open(knowledge_file, encoding="utf-8")]
    questions = {r.get("问") or r["question"]: line for line, r in enumerate(records, 1)}
    own = sum(line in [p.line for p in kb.search(q, 3)] for q, line in questions.items()) / len(questions)
    reworded = sum(line in [p.line for p in kb.search(q, 3)] for q, line in PARAPHRASES.items()) / len(PARAPHRASES)
    print(f"\nrecall@3: {own:.3f} asking the file's own {len(questions)} questions, "
          f"{reworded:.3f} asking {len(PARAPHRASES)} reworded ones")
    assert own >= 0.95 and reworded >= 0.7
    hit = kb.search("幽门螺旋杆菌阳性吃什么药", 3)[0]
    assert (hit.file, hit.line) == (knowledge_file, 2) and "四联疗法" in hit.text


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, capsys):
    path = str(tmp_path / "notes.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("高血压患者应限制食盐。\n每天不超过五克。\n\n\n糖尿病患者要监测血糖。\n")
    kb = KnowledgeBase.open(path)
    assert [(p.line, p.text) for p in (kb.passage(0), kb.passage(1))] == \
        [(1, "高血压患者应限制食盐。\n每天不超过五克。"), (5, "糖尿病患者要监测血糖。")]
    assert "indexed 2 passages" in capsys.readouterr().err
    assert len(KnowledgeBase.open(path)) == 2 and "indexed" not in capsys.readouterr().err   # from the cache
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n痛风患者少吃海鲜。\n")
    kb = KnowledgeBase.open(path)
    assert "indexed 3 passages" in capsys.readouterr().err
    assert kb.search("痛风能吃海鲜吗", 1)[0].line == 7


def test_bad_records_are_skipped_counted_and_named(tmp_path, capsys):
    path = str(tmp_path / "kb.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"问": "头痛", "答": "休息"}\nnot json\n{"n": 1}\n{"question": "发烧", "answer": "退烧"}\n')
    kb = KnowledgeBase.open(path)
    err = capsys.readouterr().err
    assert f"{path}:2: malformed JSON" in err and f"{path}:3: no text" in err
    assert len(kb) == 2 and kb.info["skipped"] == {"malformed JSON": 1, "no text": 1}
    assert kb.passage(1).text == "发烧\n退烧"


def test_chinese_tokenisation_keeps_medical_terms():
    words = tokenize_zh("幽门螺杆菌感染怎么治疗？")
    assert {"幽门", "螺杆菌", "感染", "治疗"} <= set(words) and "怎么" not in words and "？" not in words


def test_passages_are_cut_to_fit_the_budget(local, knowledge_file):
    tok, question = local[1], "高血压患者能喝咖啡吗？"
    hits = KnowledgeBase.open(knowledge_file).search(question, 3)
    assert len(hits) == 3
    budget = len(tok.encode(rag_question(question, [hits[0].text]))) + 1 + 20   # room for part of the second
    text, sources = fit_passages(tok, "", question, hits, budget)
    assert len(tok.encode(text)) + 1 <= budget and text == rag_question(question, [s["text"] for s in sources])
    assert [s["line"] for s in sources] == [hits[0].line, hits[1].line]
    assert sources[0]["text"] == hits[0].text and not sources[0]["truncated"]
    assert sources[1]["truncated"] and 16 <= len(sources[1]["text"]) < len(hits[1].text)
    assert hits[1].text.startswith(sources[1]["text"])
    assert fit_passages(tok, "", question, hits, len(tok.encode(question)) + 3) == (question, [])   # no room


def test_retrieval_asked_of_a_server_without_knowledge_is_a_400(local):
    model, tok = local
    server = ModelServer(model, tok, "cpu", ServerConfig(model_name="plain"))
    request = ChatRequest(messages=user("头痛怎么办？"), rag=True)
    with pytest.raises(APIError) as error:
        chat_prompt(server, request, 8)
    assert (error.value.status, error.value.param) == (400, "rag")
    request.rag = None                                     # the default without --knowledge: off
    assert chat_prompt(server, request, 8).sources is None


def test_retrieved_passages_reach_the_prompt_and_the_response(client, local, knowledge_file):
    tok = local[1]
    question = "幽门螺旋杆菌阳性吃什么药"
    reply = client.chat.completions.create(model="serve", messages=user(question), temperature=0, max_tokens=8)
    sources = reply.sources
    assert sources[0]["line"] == 2 and sources[0]["file"] == knowledge_file and "四联疗法" in sources[0]["text"]
    ids, _ = sft_prompt_ids(tok, rag_question(question, [s["text"] for s in sources]), [], prompt_budget(256, 8))
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == generated(local, ids, 8)[0]
    first = next(iter(client.chat.completions.create(model="serve", messages=user(question), temperature=0,
                                                     max_tokens=8, stream=True)))
    assert first.sources == sources
    tight = client.chat.completions.create(model="serve", messages=user(question), temperature=0, max_tokens=200)
    assert tight.usage.prompt_tokens <= prompt_budget(256, 200) and tight.sources[-1]["truncated"]


@pytest.mark.parametrize("flag, message", [("--port=70000", "--port=70000: must be 0-65535"),
                                           ("--max_active=0", "--max_active=0: must be >= 1"),
                                           ("--max_tokens_limit=-5", "--max_tokens_limit=-5: must be >= 1"),
                                           ("--rag_top_k=0", "--rag_top_k=0: must be >= 1")])
def test_bad_server_flags_are_refused_before_the_model_loads(flag, message, capsys):
    import serve
    with pytest.raises(SystemExit) as stop:
        serve.parse_args(["--ckpt=does/not/exist.pt", flag])
    assert stop.value.code == 2 and message in capsys.readouterr().err
