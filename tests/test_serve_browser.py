"""The chat page of serve.py in a real browser: headless Debian Chromium driven by Selenium loads `/`,
sends a message, sees the answer stream in and, with retrieval on, its sources; a second message carries the
first turn; reset clears the conversation.

    python -m pytest -q tests/test_serve_browser.py      # needs: apt-get install chromium chromium-driver
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

import openai
import pytest

from test_serve import KNOWLEDGE, serve

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        reason = f"{CHROMIUM} / {CHROMEDRIVER} missing (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("MCG_REQUIRE_SHARED") == "1":
            pytest.fail(f"CI must run the browser test, but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, tokenizer_dir) -> Iterator[str]:
    from test_eval import save_tiny_checkpoint
    folder = tmp_path_factory.mktemp("page")
    save_tiny_checkpoint(str(folder / "ckpt.pt"), tokenizer_dir, seed=3, tie_embeddings=False)
    shutil.copyfile(KNOWLEDGE, folder / "medical_qa.jsonl")
    with serve(str(folder / "ckpt.pt"), f"--knowledge={folder / 'medical_qa.jsonl'}", "--max_new_tokens=64",
               "--served_model_name=page") as url:
        yield url


# records every text the answer element shows while it streams (the page replaces it at each chunk)
WATCH_ANSWER = """
window.answerTexts = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant');
  if (answers.length) window.answerTexts.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


def test_page_streams_an_answer_with_its_sources(browser, page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "page" in d.find_element(By.ID, "title").text)          # /health answered
    assert "not medical advice" in browser.find_element(By.ID, "notice").text
    assert browser.find_element(By.ID, "rag").is_selected()                      # on: the server has --knowledge
    for field, value in (("temperature", "0"), ("max_tokens", "24")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.execute_script(WATCH_ANSWER)
    question = "幽门螺旋杆菌阳性吃什么药"
    browser.find_element(By.ID, "input").send_keys(question + "\n")
    sources = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".sources li"))
    answer = browser.execute_script("return [...document.querySelectorAll('.msg.assistant')].pop().textContent")

    client = openai.OpenAI(base_url=f"{page_server}/v1", api_key="none", max_retries=0)
    expected = client.chat.completions.create(model="page", messages=[{"role": "user", "content": question}],
                                              temperature=0, top_p=0.9, max_tokens=24)
    assert answer and answer == expected.choices[0].message.content
    seen = [t for t in browser.execute_script("return window.answerTexts") if t]
    assert len(set(seen)) > 1 and all(answer.startswith(t) for t in seen)   # it grew piece by piece
    assert len(sources) == len(expected.sources)
    assert "四联疗法" in sources[0].text and "medical_qa.jsonl:2" in sources[0].text

    follow_up = "需要复查吗？"                                                 # a second turn: the page sends the first
    browser.find_element(By.ID, "input").send_keys(follow_up + "\n")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".sources")) == 2)
    second = browser.execute_script("return [...document.querySelectorAll('.msg.assistant')].pop().textContent")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                {"role": "user", "content": follow_up}]
    expected = client.chat.completions.create(model="page", messages=messages, temperature=0, top_p=0.9,
                                              max_tokens=24)
    alone = client.chat.completions.create(model="page", messages=messages[2:], temperature=0, top_p=0.9,
                                           max_tokens=24)
    assert second == expected.choices[0].message.content != alone.choices[0].message.content

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert "reset" in browser.find_element(By.ID, "status").text
