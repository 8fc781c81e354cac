"""calm serve refuses bad input and overload with the right status and an OpenAI-style error body naming
the field, and stays healthy: /health answers 200 and a good request still runs after each of them."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

from serving_helpers import MODEL, base_url, get, post, running, slow_down, tiny_chat_model, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"model": MODEL, "prompt": "the cat sat", "max_tokens": 3}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("serving-errors"))


@pytest.fixture(scope="module")
def server(model, one_thread):
    with running(model, max_batch=2) as server:
        yield server


# (path, body, status, param): the body is bytes as sent, or a change to GOOD / CHAT (None deletes a key)
CASES = [
    ("/v1/completions", b'{"prompt": "the cat", "max_tokens": ', 400, None),  # malformed JSON
    ("/v1/completions", b"[1, 2]", 400, None),  # not an object
    ("/v1/completions", b"\xff\xfe", 400, None),  # not UTF-8
    ("/v1/completions", {"prompt": None}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": "5"}, 400, "max_tokens"),  # strict: no coercion
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"seed": "x"}, 400, "seed"),
    ("/v1/completions", {"stop": 5}, 400, "stop"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"n": 2}, 400, "n"),
    ("/v1/completions", {"logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"echo": True}, 400, "echo"),
    ("/v1/completions", {"best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"temperature_x": 1}, 400, "temperature_x"),  # unknown field
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),  # a batch of prompts
    ("/v1/completions", {"prompt": [3, 10**6]}, 400, "prompt"),  # token id outside the vocabulary
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "the " * 300}, 400, "prompt"),  # longer than the context (256)
    ("/v1/completions", {"max_tokens": 256}, 400, "max_tokens"),  # no room for the prompt
    ("/v1/completions", {"model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"calm": {"mode": "fast"}}, 400, "calm.mode"),
    ("/v1/completions", {"calm": {"threshold": 1.5}}, 400, "calm.threshold"),
    ("/v1/completions", {"calm": {"speed": 0.5}}, 400, "calm.speed"),  # the tiny model is not calibrated
    ("/v1/completions", {"calm": {"mode": "lossless", "threshold": 0.5}}, 400, "calm.threshold"),
    ("/v1/completions", {"calm": {"threshold": 0.5, "speed": 0.5}}, 400, "calm"),
    ("/v1/completions", {"calm": {"budget": 3}}, 400, "calm.budget"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"max_tokens": 3, "max_completion_tokens": 4}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the " * 300}]}, 400, "messages"),
]


def request_body(path: str, change: bytes | dict) -> bytes | dict:
    if isinstance(change, bytes):
        return change
    body = dict(GOOD if path.endswith("/completions") and "chat" not in path else CHAT)
    body.update(change)
    return body


@pytest.mark.parametrize(("path", "change", "status", "param"), CASES)
def test_bad_input_gets_its_status_and_an_openai_error(server, path, change, status, param):
    code, _, body = post(server, path, request_body(path, change))
    assert code == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[-1] in error["message"] or param == "calm.speed", error


def test_the_server_stays_healthy_after_bad_input(server):
    for path, change, _, _ in CASES:
        post(server, path, request_body(path, change))
    assert get(server, "/health")[0] == 200
    assert wait_until(lambda: server.engine.in_flight == 0)
    code, _, body = post(server, "/v1/completions", GOOD)
    assert code == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert post(server, "/v1/chat/completions", CHAT)[0] == 200


def test_the_openai_client_raises_bad_request_with_the_message(server):
    client = OpenAI(base_url=base_url(server), api_key="none", max_retries=0)
    with pytest.raises(BadRequestError, match="n=3 is not supported"):
        client.completions.create(model=MODEL, prompt="the cat", n=3)


def test_truncation_when_asked_keeps_the_prompt_s_end(server, model):
    long = "the " * 300 + "cat sat"
    code, _, body = post(server, "/v1/completions", {**GOOD, "prompt": long, "calm": {"truncate": True}})
    assert code == 200, body
    assert body["usage"]["prompt_tokens"] == 256 - 3
    ids = model.tokenizer(long)["input_ids"][-(256 - 3) :]
    assert body["choices"][0]["text"].strip() == model.generate(ids, max_new_tokens=3).texts[0]


def test_a_full_queue_gets_429_with_retry_after_and_recovers(model):
    with running(model, max_batch=1, max_queue=1) as server:
        slow_down(server, 0.01)
        client = OpenAI(base_url=base_url(server), api_key="none", max_retries=0)
        streams = [
            client.completions.create(model=MODEL, prompt="team won game", max_tokens=100, stream=True)
            for _ in range(2)
        ]  # one running, one waiting: the server is full
        code, headers, body = post(server, "/v1/completions", GOOD)
        assert code == 429 and int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "rate_limit_error" and "limit" in body["error"]["message"]
        assert get(server, "/health")[0] == 200
        for stream in streams:
            stream.close()
        assert wait_until(lambda: server.engine.in_flight == 0, 3)
        assert post(server, "/v1/completions", GOOD)[0] == 200


def test_a_failing_step_ends_its_requests_with_500_and_the_engine_recovers(model):
    with running(model, max_batch=2) as server:
        scheduler = server.engine.scheduler

        def broken() -> list:
            raise RuntimeError("a step that fails")

        scheduler.step = broken  # type: ignore[method-assign]
        code, _, body = post(server, "/v1/completions", GOOD)
        assert code == 500 and "a step that fails" in body["error"]["message"], body
        assert body["error"]["type"] == "server_error"
        assert server.engine.scheduler is not scheduler  # built afresh
        assert get(server, "/health")[0] == 200
        assert post(server, "/v1/completions", GOOD)[0] == 200
        assert wait_until(lambda: server.engine.in_flight == 0)
