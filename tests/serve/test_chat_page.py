"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright)."""

from __future__ import annotations

import os
import threading

import httpx
import pytest

from tests.serve.live_server import (
    MODEL_ID,
    StepDelay,
    build_engine,
    metric_values,
    running_server,
    wait_until_idle,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (scripts/ci-system-deps.sh installs it)"
    ),
]


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


@pytest.fixture
def slow_server(tokenizer):
    """A server whose engine steps can be slowed down, so that replies stream over many network reads and
    are still running when the test clicks Stop."""
    engine = build_engine(tokenizer, max_model_len=512)
    delay = StepDelay(engine)
    with running_server(lambda: engine) as running:
        yield running, delay


def send(page, text: str) -> str:
    """Type a message, send it with Enter, wait for the streamed reply to finish; return its text."""
    replies_before = page.locator(".message.assistant").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    reply = page.locator(".message.assistant").nth(replies_before)
    reply.wait_for()
    page.wait_for_function(
        "n => document.querySelectorAll('.message.assistant')[n].dataset.done === 'true'", arg=replies_before
    )
    return reply.locator(".content").inner_text()


def test_chat_page_streams_a_multi_turn_conversation(page, slow_server, tmp_path):
    server, delay = slow_server
    delay.seconds = 0.01  # 48 tokens take ~0.5 s: the reply reaches the page over many network reads
    requests = []
    page.on("request", lambda r: requests.append(r))
    page.goto(server.base_url + "/")
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{MODEL_ID}'")
    page.fill("#system-prompt", "You are a tiny test model.")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max-tokens", "48")

    # Watch the reply element grow: a streamed reply changes several times before it is done.
    page.evaluate("""() => {
        window.replyLengths = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.message.assistant .content');
            if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    first = send(page, "Hello there!")
    assert len(set(page.evaluate("window.replyLengths"))) > 2  # it grew piece by piece
    # what the page shows is exactly the model's reply (the same request, not streamed)
    messages = [
        {"role": "system", "content": "You are a tiny test model."},
        {"role": "user", "content": "Hello there!"},
    ]
    reference = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 48, "temperature": 0, "top_p": 1},
    ).json()["choices"][0]["message"]["content"]
    assert first == reference
    second = send(page, "Tell me more.")
    assert page.locator(".message.user").count() == 2 and page.locator(".message.assistant").count() == 2
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 0
    assert page.locator(".message.error").all_inner_texts() == []

    chat_posts = [r for r in requests if r.url.endswith("/v1/chat/completions")]
    assert len(chat_posts) == 2
    body = chat_posts[1].post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 48
    # multi-turn: the second request carries the system prompt and the whole first exchange
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == first
    assert second
    # everything the page loaded came from this server
    assert all(r.url.startswith(server.base_url) for r in requests)
    wait_until_idle(server)


def test_stop_button_and_new_chat(page, slow_server):
    """Stop aborts the reply on the server (its KV blocks come back); New chat starts an empty conversation."""
    server, delay = slow_server
    page.goto(server.base_url + "/")
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{MODEL_ID}'")
    send(page, "Hello there!")
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    # A prompt whose greedy reply runs all 400 tokens (no EOS; the random model decides which one does): at
    # 20 ms a step it would take 8 s, so the reply is still streaming when Stop is clicked.
    candidates = ["Tell me a long story.", "Once upon a time", "Write a poem.", "Hello world!", "Go on."]
    for prompt in candidates:
        story = [{"role": "user", "content": prompt}]
        greedy = {"messages": story, "max_tokens": 400, "temperature": 0, "top_p": 1}
        full = httpx.post(f"{server.base_url}/v1/chat/completions", json=greedy, timeout=60).json()
        if full["choices"][0]["finish_reason"] == "length":
            break
    else:
        pytest.fail("no candidate prompt decodes 400 tokens without an EOS")
    before = metric_values(server.base_url)["lmforge_requests_aborted_total"]
    delay.seconds = 0.02
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max-tokens", "400")
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelector('.message.assistant .content').textContent.length > 0")
    page.click("#stop")
    page.wait_for_function("document.querySelector('.message.assistant').dataset.done === 'true'")
    assert page.locator(".message.error").count() == 0  # stopping is not an error
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    wait_until_idle(server)
    assert metric_values(server.base_url)["lmforge_requests_aborted_total"] == before + 1
    delay.seconds = 0.0

    # a refused turn shows the server's message and leaves the conversation as it was
    page.fill("#max-tokens", "100000")
    page.fill("#prompt", "This asks for too much.")
    page.press("#prompt", "Enter")
    page.locator(".message.error").wait_for()
    assert "context" in page.locator(".message.error").inner_text()  # the server's 400 message
    assert page.input_value("#prompt") == "This asks for too much."  # back in the box for another try
    assert page.locator(".message.user").count() == 1 and page.locator(".message.assistant").count() == 1


def test_page_waits_for_the_model_to_load(page, tokenizer):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return build_engine(tokenizer)

    with running_server(slow_load, wait_healthy=False) as server:
        page.goto(server.base_url + "/")
        page.wait_for_function("document.getElementById('model-name').textContent.includes('loading')")
        release.set()
        page.wait_for_function(f"document.getElementById('model-name').textContent === '{MODEL_ID}'")


def test_untouched_defaults_fit_a_short_context(page, tokenizer):
    """With the page as it loads, a message to a model whose context is short still gets a reply: the page
    asks for no fixed reply length, so the server gives what the context leaves after the prompt."""
    with running_server(lambda: build_engine(tokenizer, max_model_len=64)) as server:
        requests = []
        page.on("request", lambda r: requests.append(r))
        page.goto(server.base_url + "/")
        page.wait_for_function(f"document.getElementById('model-name').textContent === '{MODEL_ID}'")
        assert "64" in page.get_attribute("#max-tokens", "placeholder")
        reply = send(page, "Hello there!")
        assert page.locator(".message.error").all_inner_texts() == []
        assert reply
        (post,) = [r for r in requests if r.url.endswith("/v1/chat/completions")]
        assert "max_tokens" not in post.post_data_json
        wait_until_idle(server)
