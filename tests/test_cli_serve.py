"""`calm serve` on the command line: bad options fail in one line before any model loads, and a real server
process answers the openai client, then on SIGTERM lets its in-flight request finish and exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from openai import OpenAI

from helpers import assert_clean_error, invoke

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--model", "/no/such/model"], "/no/such/model"),
    ],
)
def test_bad_options_fail_in_one_line(args, fragment):
    assert_clean_error(invoke("serve", *args), fragment)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else "the server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("calm serve did not come up")


def test_calm_serve_answers_and_shuts_down_cleanly_on_sigterm(tiny_model):
    port = free_port()
    command = [sys.executable, "-m", "calm.cli.main", "serve", "--model", tiny_model, "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_healthy(port, process)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == tiny_model
        done = client.completions.create(model=tiny_model, prompt="the cat sat", max_tokens=4)
        assert done.usage.completion_tokens >= 1
        chunks: list = []
        stream = client.completions.create(
            model=tiny_model,
            prompt="team won game",
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
        )
        reader = threading.Thread(target=lambda: chunks.extend(stream))
        reader.start()
        process.send_signal(signal.SIGTERM)  # while the request runs (or just after it ended)
        reader.join(60)
        # uvicorn shuts down gracefully, then re-raises the signal: the process ends by SIGTERM, as asked
        assert process.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in (process.stderr.read() if process.stderr else "")
        assert chunks[-2].choices[0].finish_reason in ("length", "stop")  # it finished, not cut off
        assert chunks[-1].usage.completion_tokens >= 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
