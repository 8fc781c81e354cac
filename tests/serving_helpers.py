"""What the calm serve tests share: a tiny model with a chat template, a server running in a thread on a
free loopback port, and a way to slow its engine down (so that a test can act while a request runs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from calm import CalmModel
from calm.serving import ServeConfig, Server
from helpers import build_tiny_model

MODEL = "tiny"
# One user turn per message, then the assistant's turn; words the tiny tokenizer knows (the rest is [UNK]).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> a{% endif %}"
)


def tiny_chat_model(root: Path) -> CalmModel:
    """The tiny Llama with peaked distributions (so that softmax exits happen), and a chat template."""
    path = root / "tiny-serve"
    if not path.exists():
        build_tiny_model(path, initializer_range=0.2)
    model = CalmModel.from_pretrained(str(path))
    assert model.tokenizer is not None
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


@contextmanager
def running(model: CalmModel, **config: object) -> Iterator[Server]:
    """A server on a free 127.0.0.1 port in a thread; stopped (and its engine thread joined) on exit."""
    server = Server(model, ServeConfig(port=0, model_name=MODEL, **config))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        assert not server.engine.alive, "the engine thread did not stop"


def slow_down(server: Server, seconds: float) -> None:
    """Each scheduler step takes at least `seconds` (the tiny model decodes a token in about a millisecond)."""
    scheduler = server.engine.scheduler
    step = scheduler.step

    def slow_step() -> list:
        time.sleep(seconds)
        return step()

    scheduler.step = slow_step  # type: ignore[method-assign]


def base_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


def wait_until(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def post(server: Server, path: str, body: bytes | dict, timeout: float = 30.0) -> tuple[int, dict, dict]:
    """POST raw bytes (or a dict as JSON) to the server: (status, headers, JSON body)."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


def get(server: Server, path: str) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
