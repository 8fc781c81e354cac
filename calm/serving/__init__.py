"""calm serve: an OpenAI-compatible HTTP server over continuous batching (calm.engine.scheduler).

protocol (the request bodies and error shape), prepare (a body to an engine request: prompt, budget,
sampling, exit policy), text (incremental detokenization and stop strings), engine_loop (the one thread
that owns the scheduler), responses (the OpenAI response shapes and the `calm` object), app (the FastAPI
routes) and server (the scheduler, the engine loop and uvicorn together).

May import every floor below it, the model facade included; the command line imports it."""

from calm.serving.server import ServeConfig, Server, build_scheduler

__all__ = ["ServeConfig", "Server", "build_scheduler"]
