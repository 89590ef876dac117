"""agentcg-worker: the inference worker's command line.

Loads a model (a named random-weight shape or a local checkpoint directory),
starts the engine thread, the OpenAI-compatible HTTP API and the control
socket, prints one ready line with the URL, and runs until SIGINT/SIGTERM.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import threading
import time

import click

from agentcg.worker.prompts import MAX_PROMPT_BYTES  # stdlib only: --help stays fast


DEFAULT_CONTROL_SOCKET = "/run/agentcg/worker.sock"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Progress:
    """Prints the engine's loading progress to stderr, one line per step."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            click.echo(f"agentcg-worker: {msg} ({time.monotonic() - self.t0:.1f}s)", err=True)


def _blocks_option(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", default="tiny", show_default=True, metavar="NAME|PATH",
              help="A named random-weight shape (tiny, llama3-8b) or a local Hugging Face checkpoint "
                   "directory (config.json + *.safetensors, tokenizer.json if present). Nothing is "
                   "downloaded.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs; auto picks cuda when a GPU is visible.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Weights and KV dtype [default: bfloat16 on cuda, float32 on cpu].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP API binds to. The API has no authentication unless --api-key is "
                   "set: keep it on loopback.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port; 0 picks a free one (the ready line shows which).")
@click.option("--control-socket", default=DEFAULT_CONTROL_SOCKET, show_default=True, metavar="PATH",
              help="Unix socket of the control API (suspend/resume/shrink/grow/stats) used by agentcgd. "
                   "An empty string turns it off.")
@click.option("--control-socket-mode", default="660", show_default=True, metavar="OCTAL",
              help="File mode of the control socket; its permissions are its access control.")
@click.option("--block-size", type=int, default=16, show_default=True, callback=_blocks_option,
              help="Tokens per KV cache block.")
@click.option("--gpu-blocks", type=int, default=None, callback=_blocks_option,
              help="KV blocks in the device pool [default: 90% of free device memory less 4 GiB on "
                   "cuda, 512 on cpu].")
@click.option("--gpu-memory-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.9,
              show_default=True, help="Share of the device's memory the worker may use when --gpu-blocks "
                                      "is not given (cuda only).")
@click.option("--host-blocks", type=int, default=None, callback=_blocks_option,
              help="KV blocks in the (pinned) host pool that swapped-out sessions move to "
                   "[default: 8 GiB worth].")
@click.option("--max-batch", type=int, default=32, show_default=True, callback=_blocks_option,
              help="Most sequences decoded together in one step.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights of named shapes and of sampling.")
@click.option("--served-model-name", default=None, metavar="NAME",
              help="Model id reported by /v1/models and expected in requests [default: the model's name].")
@click.option("--api-key", envvar="AGENTCG_WORKER_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 and /agentcg routes "
                   "(also from $AGENTCG_WORKER_API_KEY).")
@click.option("--max-prompt-bytes", type=click.IntRange(min=1), default=MAX_PROMPT_BYTES, show_default=True,
              help="Most UTF-8 bytes of prompt text (all message contents of a chat) per request; a larger "
                   "prompt is refused with 413 before it is tokenised.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--quiet", is_flag=True, help="No loading progress lines.")
def main(model, device, dtype, host, port, control_socket, control_socket_mode, block_size, gpu_blocks,
         gpu_memory_fraction, host_blocks, max_batch, seed, served_model_name, api_key, max_prompt_bytes, log_level, quiet):
    """Serve a model with an OpenAI-compatible API and a KV-cache control socket.

    \b
    HTTP (OpenAI-compatible): POST /v1/chat/completions, POST /v1/completions,
    GET /v1/models, GET /health, GET /agentcg/stats. Send the header
    "X-Agentcg-Session: <name>" (or "X-Session-Id") on every turn of one
    agent so that its KV cache is kept and reused as the next turn's prefix.

    \b
    Control socket (JSON lines, for agentcgd): suspend, resume, shrink,
    grow, stats. See docs/worker.md.

    \b
    Examples:
      agentcg-worker --model tiny --device cpu --port 8000 --control-socket /tmp/w.sock
      agentcg-worker --model /srv/models/Llama-3-8B --device cuda --gpu-blocks 4096
    """
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="agentcg-worker: %(levelname)s %(message)s")
    try:
        socket_mode = int(control_socket_mode, 8)
    except ValueError:
        raise click.BadParameter(f"expected an octal mode like 660, got {control_socket_mode!r}",
                                 param_hint="--control-socket-mode") from None
    if not _is_loopback(host):
        click.echo(f"agentcg-worker: warning: binding to {host}, which is not loopback; "
                   + ("requests need the API key" if api_key else "anyone who can reach it can use the model"
                      " (set --api-key)"), err=True)
    if model not in ("tiny", "llama3-8b") and not os.path.isdir(model) and os.sep not in model:
        click.echo(f"agentcg-worker: note: {model!r} is not a known shape name nor an existing directory; "
                   "the engine will decide", err=True)

    # Heavy imports only now, so that --help is fast and works without torch.
    try:
        import uvicorn

        from agentcg.worker.async_engine import AsyncEngine
        from agentcg.worker.control import ControlServer
        from agentcg.worker.engine import Engine, EngineConfig
        from agentcg.worker.server import create_app
    except ImportError as e:
        raise click.ClickException(f"the worker needs its extra dependencies ({e}); install agentcg[worker]")

    try:
        cfg = EngineConfig(model=model, device=device, dtype=dtype, block_size=block_size,
                           gpu_blocks=gpu_blocks, host_blocks=host_blocks, max_batch=max_batch, seed=seed,
                           gpu_memory_fraction=gpu_memory_fraction)
    except (TypeError, ValueError) as e:
        raise click.ClickException(f"bad engine configuration: {e}")

    progress = _Progress(quiet)
    t0 = time.monotonic()
    try:
        engine = Engine(cfg, progress=progress)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as e:
        raise click.ClickException(f"cannot load model {model!r}: {e}")
    load_s = time.monotonic() - t0

    aeng = AsyncEngine(engine).start()
    control = ControlServer(aeng, control_socket, mode=socket_mode) if control_socket else None
    app = create_app(aeng, model_name=served_model_name, api_key=api_key, max_prompt_bytes=max_prompt_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5, lifespan="on")
    server = _Server(config)
    try:
        rc = asyncio.run(_serve(server, control, app.state.model_name, engine, load_s))
    finally:
        aeng.close()
    sys.exit(rc)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM/SIGINT ends in a clean exit (status 0)
        after shutdown instead of being raised again once the server stopped."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config):
    return _server_class()(config)


async def _serve(server, control, model_name: str, engine, load_s: float) -> int:
    if control is not None:
        try:
            await control.start()
        except OSError as e:
            click.echo(f"agentcg-worker: error: control socket: {e}", err=True)
            return 1
    try:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.05)
        if server.started:
            sock = server.servers[0].sockets[0].getsockname()
            host, port = sock[0], sock[1]
            shown = f"[{host}]" if ":" in host else host
            device = getattr(engine, "device", "?")
            click.echo(f"agentcg-worker ready: http://{shown}:{port}/v1 model={model_name} device={device} "
                       f"load_s={load_s:.1f} control={control.path if control else 'off'} pid={os.getpid()}")
            sys.stdout.flush()
        await task
        return 0 if server.started else 1
    finally:
        if control is not None:
            await control.close()


if __name__ == "__main__":  # pragma: no cover
    main()
