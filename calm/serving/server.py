"""Running the server: the scheduler a model serves with, the engine loop around it, and uvicorn.

    server = Server(model, ServeConfig(port=8000))
    server.run()                 # blocks; SIGTERM or Ctrl-C stops it cleanly

Shutdown (SIGTERM): uvicorn stops taking connections, lets in-flight requests finish for up to
`shutdown_timeout` seconds, then cancels what is left; the engine thread ends last."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from calm.engine.scheduler import Scheduler
from calm.errors import InputError
from calm.serving.app import create_app
from calm.serving.engine_loop import EngineLoop
from calm.speculative.cycle import LosslessDrafter, lossless_drafter

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from calm.model import CalmModel


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # requests decoding together
    max_queue: int = 64  # requests waiting for a slot; beyond that a 429
    model_name: str = "smollm2"  # the name /v1/models lists and requests give
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise InputError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"port must be in [0, 65535], got {self.port}")


def build_scheduler(model: CalmModel, max_batch: int) -> Scheduler:
    """The one place the server builds its scheduler: lossless rows draft while the stored measurement says
    drafting pays for the rows live (calm.speculative.cycle), the full model's step runs otherwise."""
    drafter = lossless_drafter(model, max_batch)
    return Scheduler(model.network, max_batch=max_batch, eos_token_ids=model.eos_token_ids, drafter=drafter)


def lossless_decoding(scheduler: Scheduler) -> str:
    """What a lossless request runs, in words."""
    drafter = scheduler.drafter
    if not isinstance(drafter, LosslessDrafter):
        return "lossless: full model (exact; no stored measurement finds speculative decoding faster)"
    return f"lossless: {drafter.describe()} while at most {drafter.most_rows} rows are live, else the full model"


class Server:
    """A model behind the OpenAI API: the app, its engine loop, and the uvicorn server that runs them."""

    def __init__(self, model: CalmModel, config: ServeConfig) -> None:
        if model.tokenizer is None:
            raise InputError("calm serve answers with text: load the model with its tokenizer")
        self.model, self.config = model, config
        self.engine = EngineLoop(lambda: build_scheduler(model, config.max_batch), config.max_batch, config.max_queue)
        self.app: FastAPI = create_app(model, self.engine, config.model_name, lossless_decoding(self.engine.scheduler))
        self.uvicorn = uvicorn_server(self.app, config)

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (in the main thread) or `stop()`."""
        self.uvicorn.run()

    def stop(self) -> None:
        """Ask the server to shut down, as SIGTERM does (from any thread)."""
        self.uvicorn.should_exit = True

    @property
    def started(self) -> bool:
        return bool(self.uvicorn.started)

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose when config.port is 0)."""
        servers = getattr(self.uvicorn, "servers", None) or []
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.config.port


def uvicorn_server(app: FastAPI, config: ServeConfig) -> uvicorn.Server:
    import uvicorn

    settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=int(config.shutdown_timeout),
        lifespan="on",
    )
    return uvicorn.Server(settings)
