"""The trainer service: owns the one active training run.

The run itself executes in a worker process (``services/training/worker.py``) so a crash or an
out-of-memory kill never takes this service down: it keeps answering status, reports
``training.error`` with a suggestion, and (by default) resumes the run once from its last
checkpoint. The service learns the run's progress from the worker's own events on the bus.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog

from forgellm.bus import AsyncSubscriber
from forgellm.config import bus_address
from forgellm.schemas import (
    Envelope,
    ErrorCode,
    RealtimeMetrics,
    RealtimeReply,
    RealtimeRequest,
    TrainingComplete,
    TrainingError,
    TrainingStarted,
    TrainingStartReply,
    TrainingStartRequest,
    TrainingStatusReply,
    TrainingStatusRequest,
    TrainingStopReply,
    TrainingStopRequest,
    TrainingUpdate,
)
from forgellm.services.base import Service, handles
from forgellm.services.common import gpu
from forgellm.services.common.errors import ForgeError, disk_full_error, is_disk_full
from forgellm.services.common.process import signal_when_parent_dies
from forgellm.services.common.runs import current_run, read_metrics
from forgellm.services.common.workspace import Workspace
from forgellm.services.training import checkpoints as ckpt
from forgellm.services.training import cluster
from forgellm.services.training.cluster import Layout, RankExit
from forgellm.services.training.losses import worker_environment
from forgellm.services.training.runs import prepare_run

log = structlog.get_logger("trainer")


@dataclass
class ActiveRun:
    training_id: str
    training_type: str
    run_dir: Path
    output_dir: str
    max_iterations: int
    process: asyncio.subprocess.Process | None = None
    phase: str = "starting"
    last: TrainingUpdate | None = None
    finished: bool = False
    reported_error: bool = False
    resumed_after_crash: bool = False
    error: TrainingError | None = None  # the last training_error, shown by status
    auto_resume: bool = True
    started: float = field(default_factory=time.monotonic)
    warnings: list[str] = field(default_factory=list)  # dataset files skipped at start
    stop_requested: bool = False  # POST /api/training/stop was asked
    # A distributed run: its layout, this launch's id, how its ranks ended (from mlx.launch's
    # output, in the order seen) and the launcher's last lines.
    layout: Layout | None = None
    launch_id: str = ""
    rank_exits: dict[int, RankExit] = field(default_factory=dict)
    exit_order: list[int] = field(default_factory=list)
    launcher_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    relays: list[asyncio.Task] = field(default_factory=list)
    reaping: bool = False
    killed_for_stop: bool = False  # stopped before rank 0 was up: its whole group was signalled


class TrainerService(Service):
    name = "trainer"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.workspace = Workspace(settings.home)
        self.active: ActiveRun | None = None
        self._tasks: set[asyncio.Task] = set()
        self._shutting_down = False

    def state(self) -> str:
        return "training" if self.is_training() else "idle"

    def is_training(self) -> bool:
        return self.active is not None and not self.active.finished

    async def on_start(self) -> None:
        self.feed = AsyncSubscriber(self.ctx, bus_address(self.settings, "events_out"), ("training.",))
        self._spawn_task(self._follow_events())
        await self._resume_interrupted()

    async def _resume_interrupted(self) -> None:
        """A run whose worker stopped because this service died carries an ``interrupted`` event
        last in its metrics: resume it from its latest checkpoint, under the same training id."""
        run_dir = await asyncio.to_thread(current_run, self.workspace)
        if run_dir is None:
            return
        events = await asyncio.to_thread(read_metrics, run_dir)
        ends = [e for e in events if e.get("event") in ("start", "resume", "complete", "error", "interrupted")]
        latest = ckpt.latest_checkpoint(run_dir)
        if not ends or ends[-1]["event"] != "interrupted" or latest is None:
            return
        config = json.loads((run_dir / "training_config.json").read_text())
        run = ActiveRun(config["training_id"], config.get("training_type", "cpt"), run_dir,
                        self.workspace.relative(run_dir), int(config.get("max_iterations", 0)),
                        layout=Layout.from_dict(config["layout"]) if config.get("layout") else None)
        run.phase = "resuming"
        self.active = run
        log.warning("resuming_interrupted_run", training_id=run.training_id, checkpoint=latest)
        await self._launch(run, str(ckpt.adapter_file(run_dir, latest)))

    async def on_stop(self) -> None:
        run = self.active
        self._shutting_down = True
        if run and run.process and run.process.returncode is None:
            # The platform is stopping, not the user stopping the run: the worker writes a final
            # checkpoint and marks the run interrupted, and the next start resumes it (as after a
            # crash). POST /api/training/stop is how a run is ended.
            log.info("interrupting_run_for_shutdown", training_id=run.training_id)
            self._signal_run(run, signal.SIGUSR1)
            try:
                await asyncio.wait_for(run.process.wait(), self.settings.timeouts.stop_grace_s - 1)
            except TimeoutError:
                self._kill_run(run)
        self.feed.close()

    def _signal_run(self, run: ActiveRun, sig: int) -> None:
        """The worker, or a distributed run's rank 0 (which tells the others at its next step);
        a distributed run whose rank 0 is not up yet gets ``sig`` on its whole process group."""
        assert run.process is not None
        if run.layout is None:
            run.process.send_signal(sig)
            return
        pid = cluster.rank_zero_pid(run.run_dir, run.launch_id)
        with contextlib.suppress(ProcessLookupError):
            if pid is not None:
                os.kill(pid, sig)
            else:
                run.killed_for_stop = True
                os.killpg(run.process.pid, signal.SIGTERM)

    def _kill_run(self, run: ActiveRun) -> None:
        assert run.process is not None
        with contextlib.suppress(ProcessLookupError):
            if run.layout is None:
                run.process.kill()
            else:  # the launcher and every local rank (they share its session)
                os.killpg(run.process.pid, signal.SIGKILL)

    def _spawn_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- events from the worker ---------------------------------------------------------------

    async def _follow_events(self) -> None:
        async for record in self.feed:
            run, event = self.active, record.body
            if run is None or getattr(event, "training_id", None) != run.training_id:
                continue
            if isinstance(event, TrainingUpdate):
                run.phase = event.phase
                if event.phase == "training":
                    run.last = event
            elif isinstance(event, TrainingComplete):
                run.finished = True
                run.phase = "stopped" if event.stopped else ("early stopped" if "early" in event.reason
                                                             else "completed")
            elif isinstance(event, TrainingError):
                if record.header.source == "trainer-worker":
                    run.reported_error = True
                    run.error = event
                elif not run.reported_error:
                    run.error = event

    # --- start ---------------------------------------------------------------------------------

    def _prepare(self, request: TrainingStartRequest) -> ActiveRun:
        prepared = prepare_run(self.workspace, request, settings=self.settings)
        return ActiveRun(prepared.training_id, request.training_type, prepared.run_dir, prepared.output_dir,
                         request.max_iterations, warnings=prepared.warnings, layout=prepared.layout)

    async def _launch(self, run: ActiveRun, resume_from: str | None = None) -> None:
        if run.layout is not None:
            await self._launch_layout(run, resume_from)
            return
        argv = [sys.executable, "-m", "forgellm.services.training.worker", str(run.run_dir)]
        if resume_from:
            argv.append(resume_from)
        run.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, env=worker_environment(),
            preexec_fn=signal_when_parent_dies(signal.SIGUSR1))
        self._launched(run, resume_from)

    async def _launch_layout(self, run: ActiveRun, resume_from: str | None) -> None:
        """Every rank of a distributed run through mlx.launch, in a session of its own (so one
        signal reaches the launcher and every local rank). Its output is read here: it says how
        each rank ended. stdin is a pipe kept open: on /dev/null the launcher spins."""
        assert run.layout is not None
        layout = run.layout
        layout.port = cluster.free_port_run(layout.world_size if layout.backend == "ring" else 1)
        run.launch_id = uuid.uuid4().hex[:12]
        run.rank_exits, run.exit_order, run.reaping, run.killed_for_stop = {}, [], False, False
        run.launcher_tail.clear()
        env = worker_environment()
        argv = cluster.launcher_argv(layout, run.run_dir, resume_from, run.launch_id, env)
        run.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
            preexec_fn=signal_when_parent_dies(signal.SIGTERM))
        run.relays = [asyncio.ensure_future(self._relay(run, run.process, stream, out))
                      for stream, out in ((run.process.stdout, sys.stdout), (run.process.stderr, sys.stderr))]
        log.info("ranks_launched", world_size=layout.world_size, hosts=layout.hosts, backend=layout.backend,
                 port=layout.port)
        self._launched(run, resume_from)

    async def _relay(self, run: ActiveRun, process: asyncio.subprocess.Process, stream: asyncio.StreamReader,
                     out) -> None:
        """Pass the ranks' output through, and note each rank's end. When one rank fails, the
        others have a moment to end by themselves (a lost peer fails their next collective at
        once); then the whole session is killed: no rank is left spinning or stuck."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the reader's limit: pass it on in pieces
                line = await stream.read(1 << 16)
            if not line:
                break
            with contextlib.suppress(OSError, ValueError):
                out.buffer.write(line)
                out.flush()
            text = line.decode(errors="replace")
            run.launcher_tail.append(text.rstrip())
            seen = cluster.parse_launcher_line(text)
            if seen is None:
                continue
            if seen.rank not in run.exit_order:
                run.exit_order.append(seen.rank)
            if cluster.is_failure(cluster.merge_exit(run.rank_exits, seen)) and not run.reaping:
                run.reaping = True
                self._spawn_task(self._reap(run, process))

    async def _reap(self, run: ActiveRun, process: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), 2.0)
        except TimeoutError:
            log.warning("killing_remaining_ranks", training_id=run.training_id)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def _launched(self, run: ActiveRun, resume_from: str | None) -> None:
        run.finished = False
        run.reported_error = False
        run.error = None
        self._spawn_task(self._watch(run))
        log.info("worker_started", pid=run.process.pid, training_id=run.training_id, resume_from=resume_from)

    @handles(TrainingStartRequest)
    async def start_training(self, request: TrainingStartRequest, header: Envelope) -> TrainingStartReply:
        if self.is_training():
            raise ForgeError(ErrorCode.TRAINING_ALREADY_RUNNING, "Training is already running",
                             details={"training_id": self.active.training_id},
                             suggestion="Stop it with POST /api/training/stop, or wait for it to finish.")
        self.active = None
        try:
            run = await asyncio.to_thread(self._prepare, request)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error("creating the run folder", self.workspace.home, exc) from exc
            raise
        if self.is_training():  # another start won the race while we were preparing
            raise ForgeError(ErrorCode.TRAINING_ALREADY_RUNNING, "Training is already running")
        self.active = run
        await self._launch(run)
        self.publish(TrainingStarted(training_id=run.training_id, training_type=run.training_type,
                                     output_dir=run.output_dir, max_iterations=run.max_iterations),
                     header.correlation_id)
        reply = TrainingStartReply(training_id=run.training_id, output_dir=run.output_dir, warnings=run.warnings)
        if run.warnings:
            reply.message += f"; {len(run.warnings)} dataset file(s) skipped (see warnings)"
        return reply

    # --- a worker that ends -----------------------------------------------------------------

    async def _watch(self, run: ActiveRun) -> None:
        assert run.process is not None
        code = await run.process.wait()
        if run.relays:  # the launcher's last lines say how its ranks ended
            await asyncio.wait(run.relays, timeout=2.0)
        if run is not self.active or self._shutting_down:
            return
        await asyncio.sleep(0)  # let already-received events be applied first
        if run.layout is not None:
            await self._watch_layout(run, code)
            return
        if code == 0 and run.finished:
            return
        if code == -signal.SIGTERM and run.stop_requested and not run.finished:
            # Our own SIGTERM reached the worker before it set its handler (a stop asked while the
            # worker was still starting): a stop, not a failure.
            self._stopped_early(run)
            return
        for _ in range(20):  # a worker that failed by itself said why just before exiting
            if code < 0 or run.reported_error:
                break
            await asyncio.sleep(0.05)
        if code < 0:
            error = f"The training worker was killed ({cluster.signal_name(code)})"
            suggestion = ("It was probably out of memory: reduce batch_size or max_seq_length, or enable "
                          "grad_checkpoint." if code == -signal.SIGKILL else "Check the trainer log.")
        else:
            error = f"The training worker exited with code {code}"
            suggestion = "See the trainer log; resume from the last checkpoint with resume_from."
        iteration = run.last.iteration if run.last else None
        if not run.reported_error:
            self.publish(TrainingError(training_id=run.training_id, error=error, iteration=iteration,
                                       suggestion=suggestion))
        latest = ckpt.latest_checkpoint(run.run_dir)
        if code < 0 and run.auto_resume and not run.resumed_after_crash and latest is not None:
            run.resumed_after_crash = True
            run.phase = "resuming"
            log.warning("resuming_after_crash", training_id=run.training_id, checkpoint=latest)
            await self._launch(run, str(ckpt.adapter_file(run.run_dir, latest)))
            return
        run.finished = True
        run.phase = "failed"

    async def _watch_layout(self, run: ActiveRun, code: int) -> None:
        """A distributed run's launcher has exited (mlx.launch exits 0 even when ranks failed,
        so how the ranks ended decides)."""
        assert run.layout is not None
        with contextlib.suppress(ProcessLookupError):  # nothing of this launch outlives it
            os.killpg(run.process.pid, signal.SIGKILL)
        failure = cluster.rank_failure(run.exit_order, run.rank_exits, run.layout)
        if run.finished:  # rank 0 completed the run: a rank failing in teardown does not undo it
            if failure:
                log.warning("rank_failed_after_completion", training_id=run.training_id, error=failure.error)
            return
        if run.stop_requested and not run.finished and (failure is None or run.killed_for_stop):
            self._stopped_early(run)
            return
        for _ in range(20):  # rank 0's own training_error, when it failed by itself
            if run.reported_error or (failure and failure.resumable):
                break
            await asyncio.sleep(0.05)
        if failure is None:
            tail = " | ".join(line for line in list(run.launcher_tail)[-3:] if line)
            failure = cluster.Failure(
                f"The launcher ({' '.join(run.layout.launcher)}) ended with code {code} before the run finished"
                + (f": {tail}" if tail else ""),
                "Check ssh to every host, the same Python and workspace paths on each, and open ports between "
                "them (README: Training on several machines).", code < 0)
        iteration = run.last.iteration if run.last else None
        if not run.reported_error or failure.resumable:
            self.publish(TrainingError(training_id=run.training_id, error=failure.error, iteration=iteration,
                                       suggestion=failure.suggestion))
        log.warning("distributed_run_failed", training_id=run.training_id, error=failure.error)
        latest = ckpt.latest_checkpoint(run.run_dir)
        if failure.resumable and run.auto_resume and not run.resumed_after_crash and latest is not None:
            run.resumed_after_crash = True
            run.phase = "resuming"
            log.warning("resuming_layout_after_failure", training_id=run.training_id, checkpoint=latest,
                        world_size=run.layout.world_size)
            await self._launch(run, str(ckpt.adapter_file(run.run_dir, latest)))
            return
        run.finished = True
        run.phase = "failed"

    def _stopped_early(self, run: ActiveRun) -> None:
        run.finished = True
        run.phase = "stopped"
        iteration = run.last.iteration if run.last else 0
        log.info("worker_stopped_while_starting", training_id=run.training_id)
        self.publish(TrainingComplete(
            training_id=run.training_id, stopped=True, final_iteration=iteration,
            final_loss=run.last.training_loss if run.last else None,
            training_time_minutes=round((time.monotonic() - run.started) / 60, 3),
            output_dir=run.output_dir, reason="stopped before training began"))

    # --- stop and status --------------------------------------------------------------------

    @handles(TrainingStopRequest)
    async def stop_training(self, request: TrainingStopRequest, header: Envelope) -> TrainingStopReply:
        run = self.active
        if run is None or run.finished or run.process is None or run.process.returncode is not None:
            raise ForgeError(ErrorCode.NO_TRAINING_RUNNING, "No training is running",
                             suggestion="Start one with POST /api/training/start or 'forgellm train'.")
        run.auto_resume = False
        run.stop_requested = True
        run.phase = "stopping"
        self._signal_run(run, signal.SIGTERM)
        try:  # a final checkpoint takes at most one iteration; answer as soon as it is written
            await asyncio.wait_for(asyncio.shield(run.process.wait()), 3.0)
            return TrainingStopReply(message="Training stopped successfully")
        except TimeoutError:
            return TrainingStopReply(message="Training is stopping: the final checkpoint is being written")

    # On the event loop, not inline on the socket thread: a client that has just seen
    # training_complete must find the run completed here too, and the run's state follows the
    # worker's events on this loop (the same events the gateway forwards).
    @handles(TrainingStatusRequest)
    async def training_status(self, request: TrainingStatusRequest, header: Envelope) -> TrainingStatusReply:
        run = self.active
        if run is None:
            return TrainingStatusReply()
        last = run.last
        iteration = last.iteration if last else 0
        failure = run.error if run.phase == "failed" else None
        return TrainingStatusReply(
            is_training=not run.finished, training_id=run.training_id, training_type=run.training_type,
            phase=run.phase, current_iteration=iteration, max_iterations=run.max_iterations,
            progress_percentage=round(100 * iteration / run.max_iterations, 2),
            current_loss=last.training_loss if last else None,
            validation_loss=last.validation_loss if last else None,
            learning_rate=last.learning_rate if last else None,
            tokens_per_second=last.tokens_per_second if last else None,
            memory_usage_gb=last.memory_usage_gb if last else None,
            eta_minutes=last.eta_minutes if last and not run.finished else None,
            output_dir=run.output_dir,
            world_size=run.layout.world_size if run.layout else 1,
            hosts=run.layout.hosts if run.layout else [],
            host_memory_gb=last.host_memory_gb if last else {},
            error=failure.error if failure else None,
            error_code=(failure.error_code or None) if failure else None,
            suggestion=failure.suggestion if failure else None)

    @handles(RealtimeRequest)
    async def realtime(self, request: RealtimeRequest, header: Envelope) -> RealtimeReply:
        run = self.active
        if run is None or run.last is None:
            return RealtimeReply(is_training=self.is_training())
        last = run.last
        busy = await asyncio.to_thread(gpu.utilization) if not run.finished else None
        metrics = RealtimeMetrics(
            iteration=last.iteration, training_loss=last.training_loss, validation_loss=last.validation_loss,
            learning_rate=last.learning_rate, tokens_per_second=last.tokens_per_second,
            memory_usage_gb=last.memory_usage_gb, gpu_utilization=busy,
            timestamp=datetime.now().astimezone().isoformat(timespec="seconds"),
            world_size=run.layout.world_size if run.layout else 1, hosts=run.layout.hosts if run.layout else [],
            host_memory_gb=last.host_memory_gb)
        return RealtimeReply(current_metrics=metrics, is_training=not run.finished)
