"""`calm serve`: the OpenAI-compatible server (calm.serving) on a host and port."""

from __future__ import annotations

import click

from calm.cli.common import load_model
from calm.cli.options import FiniteFloat, model_options


def host_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An address or host name to bind: not empty, no spaces, no URL."""
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise click.BadParameter(f"expected an address such as 127.0.0.1, 0.0.0.0 or localhost, got {value!r}")
    return value


@click.command(
    "serve",
    epilog="""\b
Examples:
  calm serve                                   # smollm2 on http://127.0.0.1:8000/v1
  calm serve --port 8080 --max-batch 16 --max-queue 128
  calm serve --model ./my-heads --host 0.0.0.0 # listen on every interface (put a proxy in front)
""",
)
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, callback=host_name, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests decoding together (continuous batching).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Requests waiting for a slot; beyond that a request gets 429 with Retry-After.",
)
@click.option(
    "--shutdown-timeout",
    type=FiniteFloat(min=0.0),
    default=30.0,
    show_default=True,
    help="Seconds in-flight requests get to finish on SIGTERM before they are cancelled.",
)
def serve_command(
    model_name: str,
    device: str,
    dtype: str | None,
    weights: str | None,
    host: str,
    port: int,
    max_batch: int,
    max_queue: int,
    shutdown_timeout: float,
) -> None:
    """Serve MODEL over the OpenAI API with continuous batching.

    Endpoints: /v1/completions, /v1/chat/completions, /v1/models and /health. Each request picks lossless
    (the default) or early-exit decoding in its `calm` object. SIGTERM lets in-flight requests finish.
    Docs: docs/serving.md."""
    try:
        from calm.serving import ServeConfig, Server
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"calm serve needs {exc.name}: pip install 'calm[serve]'") from None

    config = ServeConfig(host, port, max_batch, max_queue, model_name, shutdown_timeout)
    server = Server(load_model(model_name, device, dtype, weights), config)
    click.echo(f"calm serve: {model_name} on http://{host}:{port}/v1 (max batch {max_batch})", err=True)
    server.run()
