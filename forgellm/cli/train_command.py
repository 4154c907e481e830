"""``forgellm train``: start a run and watch it with a live progress line.

Through the running platform when one answers (REST to start, Socket.IO to watch), otherwise
standalone: the same run folder and the same worker process, watched through its
``metrics.jsonl``. Ctrl-C asks whether to stop the run (gracefully, with a final checkpoint) or
to detach and leave it running.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import click
import msgspec

from forgellm.client import ForgeLLMClient, ForgeLLMError, ServiceUnavailableError
from forgellm.config import load_settings
from forgellm.schemas import TrainingStartRequest

FIELDS = [f for f in msgspec.structs.fields(TrainingStartRequest)
          if f.name not in ("model_name", "dataset", "distributed")]  # distributed: --processes, --hosts...


def _click_type(annotation: Any) -> Any:
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
    if typing.get_origin(base) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(base)])
    if base in (int, float, str):
        return base
    if base is bool:
        return click.BOOL
    if typing.get_origin(base) is list:
        return str  # comma-separated
    return str  # str | None


def _options(function):
    for field in reversed(FIELDS):
        flag = "--" + field.name.replace("_", "-")
        default = None if field.default is msgspec.NODEFAULT else field.default
        function = click.option(flag, field.name, type=_click_type(field.type), default=None,
                                help=f"(default: {default!r})")(function)
    return function


class ProgressLine:
    """One line, rewritten in place: iteration, bar, loss, validation loss, tokens/s, ETA."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stdout.isatty()

    def show(self, data: dict[str, Any]) -> None:
        it = data.get("iteration") or 0
        width = 24
        filled = int(width * it / max(self.total, 1))
        parts = [f"iter {it}/{self.total}", "[" + "#" * filled + "." * (width - filled) + "]",
                 f"{100 * it / max(self.total, 1):5.1f}%"]
        for key, label, fmt in (("training_loss", "loss", "{:.3f}"), ("validation_loss", "val", "{:.3f}"),
                                ("tokens_per_second", "tok/s", "{:.0f}"), ("eta_minutes", "ETA", "{:.1f} min")):
            if data.get(key) is not None:
                parts.append(f"{label} {fmt.format(data[key])}")
        if data.get("phase") and data["phase"] != "training":
            parts.append(f"({data['phase']})")
        line = "  ".join(parts)
        if self.tty:
            click.echo("\r\x1b[2K" + line, nl=False)
        else:
            click.echo(line)

    def finish(self, text: str) -> None:
        if self.tty:
            click.echo("")
        click.echo(text)


def _ask_stop() -> bool:
    if not sys.stdin.isatty():
        return True
    click.echo("")
    answer = click.prompt("Stop the run (a final checkpoint is written) or detach and leave it running?",
                          type=click.Choice(["stop", "detach"]), default="detach")
    return answer == "stop"


def _request(model: str, dataset: str, config: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if config is not None:
        text = config.read_text()
        if config.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise click.ClickException(f"{config}: expected a mapping of training fields")
    data.update({"model_name": model, "dataset": dataset})
    layout = {k: flags.pop(k) for k in ("processes", "hosts", "backend", "hostfile")}
    if any(v is not None for v in layout.values()):
        distributed = dict(data.get("distributed") or {})
        if layout["processes"] is not None:
            distributed["processes"] = layout["processes"]
        if layout["hosts"]:
            distributed["hosts"] = [h.strip() for h in layout["hosts"].split(",") if h.strip()]
        if layout["backend"]:
            distributed["backend"] = layout["backend"]
        if layout["hostfile"]:
            distributed["hostfile"] = layout["hostfile"]
        data["distributed"] = distributed
    for name, value in flags.items():
        if value is None:
            continue
        field = next(f for f in FIELDS if f.name == name)
        if typing.get_origin(field.type) is list or field.type == list[str]:
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        data[name] = value
    try:
        msgspec.convert(data, TrainingStartRequest)
    except msgspec.ValidationError as exc:
        raise click.ClickException(f"invalid training settings: {exc}") from None
    return data


async def _watch_platform(client: ForgeLLMClient, training_id: str, total: int) -> tuple[str, dict[str, Any]]:
    import socketio

    progress = ProgressLine(total)
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    sio = socketio.AsyncClient(reconnection=True)
    sio.on("training_update", lambda data: progress.show(data))
    sio.on("training_complete", lambda data: done.done() or done.set_result(("complete", data)))
    sio.on("training_error", lambda data: progress.finish(f"error: {data.get('error')} — {data.get('suggestion')}"))
    await sio.connect(client.base_url, transports=["websocket"], wait_timeout=10)
    # Ctrl-C ends the watch (not the run); the caller then asks what to do with the run. Set after
    # connect: python-socketio installs a SIGINT handler of its own when it connects.
    loop.add_signal_handler(signal.SIGINT, lambda: done.done() or done.set_result(("interrupted", {})))
    await sio.call("subscribe_training", {"training_id": training_id}, timeout=10)
    try:
        while not done.done():  # the socket says when it ends; status covers a missed event
            await asyncio.wait({done}, timeout=5)
            if not done.done():
                status = await asyncio.to_thread(client.get_training_status)
                if status.training_id == training_id and not status.is_training:
                    done.set_result(("status", msgspec.to_builtins(status)))
        return done.result()
    finally:
        await sio.disconnect()


def _run_on_platform(client: ForgeLLMClient, request: dict[str, Any]) -> None:
    reply = client.start_training(request)
    click.echo(f"training {reply.training_id} -> {reply.output_dir}")
    for warning in reply.warnings:
        click.echo(f"warning: {warning}", err=True)
    total = int(request.get("max_iterations") or 500)
    how, result = asyncio.run(_watch_platform(client, reply.training_id, total))
    if how == "interrupted":
        if _ask_stop():
            click.echo(client.stop_training().message)
        else:
            click.echo("detached; follow it with GET /api/training/status or 'forgellm bus tail --topic training.'")
        return
    click.echo("")
    click.echo(f"finished: {result.get('reason') or result.get('phase')}; best checkpoints "
               f"{result.get('best_checkpoints', [])} in {reply.output_dir}")


def _run_standalone(request: dict[str, Any]) -> None:
    from forgellm.services.common.errors import ForgeError
    from forgellm.services.common.workspace import Workspace
    from forgellm.services.training.losses import worker_environment
    from forgellm.services.training.runs import prepare_run

    settings = load_settings()
    try:
        prepared = prepare_run(Workspace(settings.home), msgspec.convert(request, TrainingStartRequest),
                               settings=settings)
    except ForgeError as exc:
        raise click.ClickException(f"{exc}" + (f"\n  {exc.suggestion}" if exc.suggestion else "")) from None
    click.echo(f"no platform running: training standalone ({prepared.training_id}) -> {prepared.output_dir}")
    for warning in prepared.warnings:
        click.echo(f"warning: {warning}", err=True)
    log_path = prepared.run_dir / "worker.log"
    argv = [sys.executable, "-m", "forgellm.services.training.worker", str(prepared.run_dir)]
    launch_id, env = "", worker_environment()
    if prepared.layout is not None:  # every rank through mlx.launch (stdin a pipe: on /dev/null it spins)
        from forgellm.services.training.cluster import launcher_argv

        launch_id = f"cli-{os.getpid()}"
        argv = launcher_argv(prepared.layout, prepared.run_dir, None, launch_id, env)
        click.echo(f"{prepared.layout.world_size} ranks on {', '.join(prepared.layout.hosts)} "
                   f"({prepared.layout.backend})")
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True, env=env,
                                  stdin=subprocess.PIPE if launch_id else subprocess.DEVNULL)
    progress = ProgressLine(int(request.get("max_iterations") or 500))
    metrics = prepared.run_dir / "metrics.jsonl"
    position, last_val, started = 0, None, time.monotonic()
    try:
        while True:
            if metrics.exists():
                with open(metrics) as handle:
                    handle.seek(position)
                    for line in handle:
                        if not line.endswith("\n"):
                            break
                        position += len(line.encode())
                        event = json.loads(line)
                        if event["event"] == "eval":
                            last_val = event["val_loss"]
                        elif event["event"] == "train":
                            done_share = event["iteration"] / progress.total
                            eta = (time.monotonic() - started) * (1 - done_share) / done_share / 60
                            progress.show({**event, "training_loss": event.get("train_loss"),
                                           "validation_loss": last_val, "eta_minutes": eta})
                        elif event["event"] == "complete":
                            progress.finish(f"finished: {event['reason']}; best checkpoints "
                                            f"{event['best_checkpoints']} in {prepared.output_dir}")
                        elif event["event"] == "error":
                            progress.finish(f"error: {event['error']} — {event.get('suggestion', '')}")
            if worker.poll() is not None:
                if worker.returncode:
                    raise click.ClickException(f"the training worker exited with code {worker.returncode}; "
                                               f"see {log_path}")
                return
            time.sleep(0.25)
    except KeyboardInterrupt:
        if _ask_stop():
            from forgellm.services.training.cluster import rank_zero_pid

            rank_zero = rank_zero_pid(prepared.run_dir, launch_id) if launch_id else None
            os.kill(rank_zero or worker.pid, signal.SIGTERM)  # rank 0 tells the other ranks
            worker.wait()
            click.echo("stopped; the final checkpoint is written")
        else:
            click.echo(f"detached; the worker (pid {worker.pid}) goes on, logging to {log_path}")


@click.command()
@click.option("--model", "model", required=True, help="The model to train (any name 'forgellm cli info' takes).")
@click.option("--dataset", "dataset", required=True, help="A folder under dataset/ (or a workspace path).")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A YAML or JSON file of training fields; flags override it.")
@click.option("--url", default=None, help="The platform's web API (default http://localhost:<web port>).")
@click.option("--standalone", is_flag=True, help="Train in this terminal even if a platform is running.")
@click.option("--processes", type=click.IntRange(1, 64), default=None,
              help="Ranks of a distributed run on each host (on this machine alone without --hosts).")
@click.option("--hosts", default=None, help="Hosts of a distributed run, comma-separated, this machine first "
              "(IP addresses for the ring backend; default: the config's training.hosts).")
@click.option("--backend", type=click.Choice(["ring", "nccl", "mpi", "auto"]), default=None,
              help="mlx.distributed backend (default: the config's training.backend, auto).")
@click.option("--hostfile", default=None, help="An mlx.launch hostfile in the workspace, instead of --hosts.")
@_options
def train(model: str, dataset: str, config: Path | None, url: str | None, standalone: bool, **flags: Any) -> None:
    """Continue pre-training (cpt) or instruction-tune (ift) a model, with a live progress line."""
    request = _request(model, dataset, config, flags)
    if not standalone:
        settings = load_settings()
        client = ForgeLLMClient(url or f"http://localhost:{settings.gateway.web_port}", timeout=60,
                                api_token=settings.security.api_token or None)
        try:
            client.health()
        except ServiceUnavailableError:
            client = None
        if client is not None:
            try:
                _run_on_platform(client, request)
            except ForgeLLMError as exc:
                raise click.ClickException(str(exc)) from None
            return
    _run_standalone(request)
