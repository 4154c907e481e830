"""The training worker: one process per run, spawned by the trainer service.

    python -m forgellm.services.training.worker RUN_DIR

It reads ``RUN_DIR/training_config.json``, trains, and reports on the bus (``training.update``
every ``steps_per_report`` steps, ``training.checkpoint``, ``training.complete``,
``training.error``) and in ``metrics.jsonl``. SIGTERM asks it to stop: it finishes the step in
hand, writes a final checkpoint and reports ``training.complete`` with ``stopped: true``.
Resuming (``resume_from`` in the config) restores weights, optimizer state, iteration and the
data order, so a resumed run continues exactly where it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

from forgellm.bus import EventPublisher
from forgellm.bus_security import secure_bus
from forgellm.config import bus_address, load_settings
from forgellm.logs import configure_logging
from forgellm.schemas import (
    ErrorCode,
    TrainingCheckpoint,
    TrainingComplete,
    TrainingError,
    TrainingStartRequest,
    TrainingUpdate,
)
from forgellm.services.common.errors import ForgeError, disk_full_error, is_disk_full
from forgellm.services.common.process import die_with_parent
from forgellm.services.mlx_runtime import preload_blas
from forgellm.services.training import checkpoints as ckpt
from forgellm.services.training.data import (
    BatchOrder,
    Rows,
    input_token_count,
    load_chat_examples,
    load_documents,
    make_batch,
    pack,
    split_documents,
    tokenize_chat,
)
from forgellm.services.training.distributed import (
    EXIT_PEER_LOST,
    RankGroup,
    detach_from_dead_launcher,
    is_peer_lost,
    report_exit,
    watchdog_for,
)
from forgellm.services.training.schedule import learning_rate_at

log = structlog.get_logger("trainer.worker")
GB = 1e9


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Metrics:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed at once)."""

    def __init__(self, run_dir: Path) -> None:
        path = run_dir / "metrics.jsonl"
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._file = open(path, "a")
        if torn:  # a line cut short (a full disk, a kill): the next one must start on its own line
            self.write_raw("\n")

    def write_raw(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()

    def write(self, event: str, **fields: Any) -> None:
        self.write_raw(json.dumps({"event": event, **fields, "timestamp": now_iso()}) + "\n")


class NoMetrics:
    """Ranks other than 0 keep no record: rank 0 writes the run's."""

    def write_raw(self, text: str) -> None:
        pass

    def write(self, event: str, **fields: Any) -> None:
        pass


class NoEvents:
    def publish(self, message: Any) -> None:
        pass

    def close(self) -> None:
        pass


def read_config(run_dir: Path) -> tuple[dict[str, Any], TrainingStartRequest]:
    raw = json.loads((run_dir / "training_config.json").read_text())
    meta = {k: raw.pop(k) for k in ("training_id", "model_path", "dataset_path", "general_dataset_path",
                                    "output_dir", "workspace", "created_at", "layout") if k in raw}
    return meta, msgspec.convert(raw, TrainingStartRequest)


class Run:
    def __init__(self, run_dir: Path, events: EventPublisher | NoEvents, group: RankGroup | None = None) -> None:
        self.run_dir = run_dir
        self.meta, self.config = read_config(run_dir)
        self.training_id = self.meta["training_id"]
        self.group = group or RankGroup(None)
        self.events = events
        self.metrics = Metrics(run_dir) if self.group.is_main else NoMetrics()
        self.watchdog = None
        self.stop_requested = False
        self.stopping = False
        self.interrupted = False  # stopping because the trainer service died (SIGUSR1)
        self.iteration = 0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.last_val: float | None = None
        self.trained_tokens = 0
        self.started = time.monotonic()
        self.hang_timeout_s = 600.0

    # --- setup ------------------------------------------------------------------------------

    def load_model(self) -> None:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.tuner.utils import linear_to_lora_layers

        cfg = self.config
        mx.random.seed(cfg.seed)
        self.model, self.tokenizer = mlx_lm.load(self.meta["model_path"])
        self.model.freeze()
        n_layers = len(self.model.layers)
        layers = n_layers if cfg.lora_layers < 0 else min(cfg.lora_layers, n_layers)
        lora = {"rank": cfg.lora_rank, "scale": cfg.lora_alpha / cfg.lora_rank, "alpha": cfg.lora_alpha,
                "dropout": cfg.lora_dropout, "keys": cfg.lora_targets or None}
        if cfg.fine_tune_type == "full":
            self.model.unfreeze()
        else:
            linear_to_lora_layers(self.model, layers, lora, use_dora=cfg.fine_tune_type == "dora")
        if cfg.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(self.model.layers[0])
        adapter_config = {"fine_tune_type": cfg.fine_tune_type, "num_layers": layers, "lora_parameters": lora,
                          "model": cfg.model_name, "base_model_path": self.meta["model_path"],
                          "training_id": self.training_id}
        if self.group.is_main:
            ckpt.atomic_write_text(self.run_dir / "adapter_config.json", json.dumps(adapter_config, indent=2))

    def prepare_data(self) -> None:
        cfg = self.config
        dataset = Path(self.meta["dataset_path"])
        tok = self.tokenizer
        if cfg.training_type == "cpt":
            train_docs, valid_docs = split_documents(load_documents(dataset), cfg.validation_split, cfg.seed)
            encode = tok.encode
            train = Rows.packed(pack([encode(d) for d in train_docs], cfg.max_seq_length, tok.eos_token_id))
            valid = Rows.packed(pack([encode(d) for d in valid_docs], cfg.max_seq_length, tok.eos_token_id))
            if cfg.data_mixture_ratio < 1.0:
                want = round(len(train) * (1 - cfg.data_mixture_ratio) / cfg.data_mixture_ratio)
                general = self.group.broadcast_rows(self.general_rows(want) if self.group.is_main else None)
                if len(general) and want:
                    picks = np.asarray([general[i % len(general)] for i in range(want)])
                    extra = Rows.packed(picks)
                    train = Rows(train.ids + extra.ids, train.masks + extra.masks)
        else:
            examples = load_chat_examples(dataset)
            order = np.random.default_rng(cfg.seed).permutation(len(examples))
            n_valid = min(len(examples) - 1, max(1, math.ceil(len(examples) * cfg.validation_split)))
            tokenized = [tokenize_chat(tok, examples[i][1]) for i in order]
            valid = Rows.chats(tokenized[:n_valid], cfg.max_seq_length)
            train = Rows.chats(tokenized[n_valid:], cfg.max_seq_length)
        if len(valid) == 0:
            raise ForgeError(ErrorCode.INVALID_REQUEST,
                             "No validation rows: the held-out part is shorter than one sequence",
                             suggestion="Lower max_seq_length, raise validation_split or add data.")
        self.train, self.valid = train, valid
        self.order = BatchOrder(len(train), cfg.batch_size, cfg.seed)
        n_val = min(cfg.val_batches, math.ceil(len(valid) / cfg.batch_size))
        self.val_batches = [list(range(b * cfg.batch_size, min(len(valid), (b + 1) * cfg.batch_size)))
                            for b in range(n_val)]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        log.info("data_ready", train_rows=len(train), valid_rows=len(valid), val_batches=n_val)

    def general_rows(self, rows_wanted: int) -> np.ndarray:
        """Packed rows of general text: the named general_dataset, else the base model's own
        replay text (self-synthesized rehearsal, cached per base model)."""
        cfg, tok = self.config, self.tokenizer
        if self.meta.get("general_dataset_path"):
            texts = [t for _, t in load_documents(Path(self.meta["general_dataset_path"]))]
        else:
            from forgellm.services.training.replay import replay_texts

            self.phase("preparing replay text")
            home = Path(self.meta.get("workspace") or self.run_dir.parents[2])
            self.model.eval()  # no dropout while the (still untouched) base model writes
            texts = replay_texts(self.model, tok, Path(self.meta["model_path"]), home / ".forgellm" / "replay",
                                 rows_wanted * (cfg.max_seq_length + 1), cfg.seed)
            self.model.train()
        return pack([tok.encode(t) for t in texts], cfg.max_seq_length, tok.eos_token_id)

    def build_step(self) -> None:
        from functools import partial

        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim

        cfg = self.config
        self.optimizer = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)

        from forgellm.services.training.losses import cross_entropy

        # (summed cross-entropy × scale, target tokens). Training scales by world / the global
        # batch's target tokens, so that averaging the ranks' gradients gives exactly the gradient
        # of the global batch's mean loss, however its tokens fall between ranks; eval scales by 1.
        def loss_fn(model, inputs, targets, mask, scale):
            ce = cross_entropy(model(inputs).astype(mx.float32), targets)[0] * mask
            return ce.sum() * scale, mask.sum()

        self.loss_fn = loss_fn
        if cfg.resume_from:  # before compiling: the compiled step captures the state objects
            self.resume(Path(cfg.resume_from))
        self.group.broadcast_trainable(self.model)
        value_and_grad = nn.value_and_grad(self.model, loss_fn)
        state = [self.model.state, self.optimizer.state, mx.random.state]
        group = self.group

        @partial(mx.compile, inputs=state, outputs=state)
        def step(inputs, targets, mask, scale):
            (loss, ntoks), grads = value_and_grad(self.model, inputs, targets, mask, scale)
            self.optimizer.update(self.model, group.average_gradients(grads))
            return loss, ntoks

        self.step = step

    # --- checkpoints and resume -------------------------------------------------------------

    def save_checkpoint(self, val_loss: float | None) -> Path:
        """Optimizer state, counters, then the adapter file: its presence means the whole
        checkpoint is on disk. A write that fails (a full disk) removes this checkpoint's files
        and leaves the earlier checkpoints as they were."""
        from mlx.utils import tree_flatten

        it = self.iteration
        path = ckpt.adapter_file(self.run_dir, it)
        if not self.group.is_main:  # rank 0 writes; the others only keep in step
            self.reseed()
            self.last_checkpoint = it
            return path
        try:
            (self.run_dir / "optimizer").mkdir(exist_ok=True)
            opt_state = dict(tree_flatten(self.optimizer.state))
            ckpt.atomic_save_safetensors(ckpt.optimizer_file(self.run_dir, it), opt_state)
            ckpt.atomic_write_text(ckpt.state_file(self.run_dir, it), json.dumps({
                "iteration": it, "best_val": self.best_val, "bad_evals": self.bad_evals,
                "last_val": self.last_val, "trained_tokens": self.trained_tokens}))
            adapters = dict(tree_flatten(self.model.trainable_parameters()))
            ckpt.atomic_save_safetensors(path, adapters, {"iteration": str(it), "training_id": self.training_id})
            ckpt.atomic_save_safetensors(self.run_dir / "adapters.safetensors", adapters)  # mlx-lm's "latest"
        except BaseException as exc:
            if not path.exists():
                ckpt.optimizer_file(self.run_dir, it).unlink(missing_ok=True)
                ckpt.state_file(self.run_dir, it).unlink(missing_ok=True)
            if is_disk_full(exc, self.run_dir):
                raise disk_full_error(f"writing the checkpoint at iteration {it}", self.run_dir, exc) from exc
            raise
        self.metrics.write("checkpoint", iteration=it, file=path.name, val_loss=val_loss)
        self.reseed()
        self.events.publish(TrainingCheckpoint(training_id=self.training_id, iteration=it,
                                               path=str(path), validation_loss=val_loss))
        self.last_checkpoint = it
        return path

    def reseed(self) -> None:
        """Random streams (dropout) restart from a known seed at every checkpoint, so a run
        resumed from checkpoint N draws exactly what the uninterrupted run drew after N."""
        import mlx.core as mx

        mx.random.seed(self.config.seed * 7919 + self.iteration)

    def resume(self, source: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        run_dir = source if source.is_dir() else source.parent
        iteration = ckpt.latest_checkpoint(run_dir) if source.is_dir() else ckpt.checkpoint_iteration(source)
        if iteration is None:
            raise ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, f"No checkpoint to resume from in {run_dir}")
        self.model.load_weights(str(ckpt.adapter_file(run_dir, iteration)), strict=False)
        opt_path = ckpt.optimizer_file(run_dir, iteration)
        if opt_path.is_file():
            self.optimizer.state = tree_unflatten(list(mx.load(str(opt_path)).items()))
        else:
            log.warning("resume_without_optimizer_state", iteration=iteration)
        state = ckpt.read_state(run_dir, iteration) or {}
        self.best_val = state.get("best_val")
        self.bad_evals = state.get("bad_evals", 0)
        self.last_val = state.get("last_val")
        self.trained_tokens = state.get("trained_tokens", 0)
        self.iteration = iteration
        self.reseed()
        self.last_checkpoint = iteration
        self.metrics.write("resume", iteration=iteration, source=str(source))
        log.info("resumed", iteration=iteration, source=str(source))

    # --- the loop -----------------------------------------------------------------------------

    def evaluate(self) -> float:
        import mlx.core as mx

        total, count = 0.0, 0.0
        one = mx.array(1.0, dtype=mx.float32)
        for batch in self.val_batches:
            indices = self.group.shard(batch)  # a short last batch may leave a rank none
            if indices:
                inputs, targets, mask = make_batch(self.valid, indices, self.pad_id)
                ce_sum, ntoks = self.loss_fn(self.model, mx.array(inputs), mx.array(targets), mx.array(mask), one)
                mx.eval(ce_sum, ntoks)
                total += ce_sum.item()
                count += ntoks.item()
            if self.watchdog:
                self.watchdog.beat()
        total, count = self.group.sum([total, count])
        return total / max(count, 1.0)

    def phase(self, name: str) -> None:
        self.events.publish(TrainingUpdate(training_id=self.training_id, iteration=self.iteration, phase=name,
                                           progress_percentage=0.0, world_size=self.group.size,
                                           hosts=self.group.hosts()))
        self.metrics.write("phase", iteration=self.iteration, phase=name)

    def train(self) -> None:
        import mlx.core as mx

        cfg = self.config
        self.last_checkpoint = 0
        self.phase("loading model")
        self.load_model()
        self.phase("preparing data")
        self.prepare_data()
        self.build_step()
        self.metrics.write("start", iteration=self.iteration, train_rows=len(self.train),
                           valid_rows=len(self.valid))
        window_tokens, window_started, window_losses = 0, time.perf_counter(), []
        stop_reason = ""
        speed_history: list[float] = []
        group = self.group
        self.watchdog = watchdog_for(group, self.hang_timeout_s)
        if self.watchdog:
            self.watchdog.arm()
        # stop_requested is what a signal asked of this rank; stopping is what every rank agreed
        # on in the last reduction, so that all leave the loop at the same iteration.
        self.stopping = group.sum([float(self.stop_requested)])[0] > 0
        while self.iteration < cfg.max_iterations and not self.stopping \
                and not (self.stop_requested and not group.distributed):
            self.iteration += 1
            it = self.iteration
            lr = learning_rate_at(it, peak=cfg.learning_rate, schedule=cfg.lr_schedule,
                                  warmup_steps=cfg.warmup_steps, max_iterations=cfg.max_iterations)
            self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
            indices = self.order.indices(it)  # the global batch; this rank trains on its share
            targets_total = sum(float(self.train.masks[i][1:].sum()) for i in indices)
            scale = mx.array(group.size / max(targets_total, 1.0), dtype=mx.float32)
            inputs, targets, mask = make_batch(self.train, group.shard(indices), self.pad_id)
            loss, _ = self.step(mx.array(inputs), mx.array(targets), mx.array(mask), scale)
            mx.eval(loss, self.model.state, self.optimizer.state)
            # One small reduction a step: the global loss, and whether any rank was asked to stop
            # (so every rank leaves the loop at the same iteration).
            loss_sum, stops = group.sum([loss.item(), float(self.stop_requested)])
            self.stopping = stops > 0
            if self.watchdog:
                self.watchdog.beat()
            tokens = input_token_count(self.train, indices)
            window_tokens += tokens
            self.trained_tokens += tokens
            window_losses.append(loss_sum / group.size)
            val_loss = None
            due_eval = it % cfg.steps_per_eval == 0 or it % cfg.save_every == 0 or it == cfg.max_iterations
            if due_eval:
                val_loss = self.evaluate()
                self.last_val = val_loss
                self.metrics.write("eval", iteration=it, val_loss=val_loss)
                stop_reason = self.check_overfitting(val_loss)
            if it % cfg.save_every == 0 or it == cfg.max_iterations or stop_reason:
                if self.watchdog:  # rank 0 writes as long as the disk takes; the others wait for it
                    self.watchdog.disarm()
                self.save_checkpoint(val_loss)
                group.sum([0.0])  # every rank past the write before the watchdog counts again
                if self.watchdog:
                    self.watchdog.arm()
            if it % cfg.steps_per_report == 0 or due_eval or it == cfg.max_iterations:
                elapsed = time.perf_counter() - window_started
                speed = window_tokens / elapsed if elapsed > 0 else None
                if speed:
                    speed_history = (speed_history + [speed])[-5:]
                avg_speed = sum(speed_history) / len(speed_history) if speed_history else None
                left_tokens = (cfg.max_iterations - it) * (self.trained_tokens / max(it, 1))
                eta = (left_tokens / avg_speed / 60) if avg_speed else None
                train_loss = sum(window_losses) / len(window_losses)
                ranks_memory = group.gather(mx.get_active_memory() / GB)
                memory, peak = max(ranks_memory), max(group.gather(mx.get_peak_memory() / GB))
                spread = {"rank_memory_gb": [round(m, 4) for m in ranks_memory],
                          "host_memory_gb": group.memory_by_host(ranks_memory)} if group.distributed else {}
                self.metrics.write("train", iteration=it, train_loss=train_loss, learning_rate=lr,
                                   tokens_per_second=speed, trained_tokens=self.trained_tokens,
                                   memory_usage_gb=memory, peak_memory_gb=peak, **spread)
                self.events.publish(TrainingUpdate(
                    training_id=self.training_id, iteration=it, training_loss=train_loss,
                    validation_loss=self.last_val, learning_rate=lr, tokens_per_second=speed,
                    memory_usage_gb=memory, peak_memory_gb=peak, trained_tokens=self.trained_tokens,
                    progress_percentage=round(100 * it / cfg.max_iterations, 2),
                    eta_minutes=round(eta, 2) if eta is not None else None,
                    world_size=group.size, hosts=group.hosts(), **spread))
                window_tokens, window_started, window_losses = 0, time.perf_counter(), []
            if stop_reason:
                break
        stopped = (self.stopping or self.stop_requested and not group.distributed) \
            and self.iteration < cfg.max_iterations
        if self.last_checkpoint != self.iteration:
            val_loss = self.evaluate()
            self.last_val = val_loss
            self.metrics.write("eval", iteration=self.iteration, val_loss=val_loss)
        if self.watchdog:  # no collective follows; rank 0's last write takes what it takes
            self.watchdog.disarm()
        if self.last_checkpoint != self.iteration:
            self.save_checkpoint(self.last_val)
        if not group.is_main:
            return
        from forgellm.services.common.runs import rank_checkpoints
        from forgellm.services.common.workspace import Workspace

        if stopped and self.interrupted:
            # Our trainer service died: leave the run resumable, not finished. The next trainer
            # sees this event and resumes from the checkpoint just written.
            self.metrics.write("interrupted", iteration=self.iteration, reason="the trainer service stopped")
            return
        best = rank_checkpoints(Workspace(self.run_dir), self.run_dir).best
        reason = stop_reason or ("stopped by request" if stopped else "completed")
        self.metrics.write("complete", iteration=self.iteration, stopped=stopped, reason=reason, best_checkpoints=best)
        self.events.publish(TrainingComplete(
            training_id=self.training_id, stopped=stopped, final_iteration=self.iteration,
            final_loss=self.last_val, training_time_minutes=round((time.monotonic() - self.started) / 60, 3),
            best_checkpoints=best, output_dir=self.meta.get("output_dir", str(self.run_dir)), reason=reason))

    def check_overfitting(self, val_loss: float) -> str:
        """Early stop when validation loss stays more than ``overfitting_threshold`` (relative)
        above its best for ``early_stopping_patience`` evaluations in a row."""
        cfg = self.config
        if self.best_val is None or val_loss < self.best_val:
            self.best_val = val_loss
            self.bad_evals = 0
            return ""
        if val_loss > self.best_val * (1 + cfg.overfitting_threshold):
            self.bad_evals += 1
        else:
            self.bad_evals = 0
        if cfg.early_stopping_patience and self.bad_evals >= cfg.early_stopping_patience:
            return (f"early stop: validation loss {val_loss:.4f} stayed more than "
                    f"{cfg.overfitting_threshold:.0%} above its best ({self.best_val:.4f}) for "
                    f"{self.bad_evals} evaluations")
        return ""


def suggestion_for(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "memory" in text:
        return "Reduce batch_size or max_seq_length, enable grad_checkpoint, or use a smaller model."
    return "See the trainer log for details; resume from the last checkpoint with resume_from."


def describe_failure(exc: BaseException, run_dir: Path) -> ForgeError:
    """What a failed run reports: a ForgeError as raised, a full disk as DISK_FULL (however it
    surfaced), anything else with the exception's type and a suggestion."""
    if isinstance(exc, ForgeError):
        error = exc
    elif is_disk_full(exc, run_dir):
        error = disk_full_error("training", run_dir, exc)
    else:
        return ForgeError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", suggestion=suggestion_for(exc))
    if error.code == ErrorCode.DISK_FULL:
        error.suggestion = ("Free disk space on the drive that holds the workspace; the earlier checkpoints are "
                            "intact: resume from the last one with resume_from (the run folder).")
    elif not error.suggestion:
        error.suggestion = suggestion_for(exc)
    return error


def main(argv: list[str]) -> int:
    """``worker RUN_DIR [RESUME_FROM]``: RESUME_FROM (a checkpoint file or run folder) overrides
    the config's ``resume_from``; the trainer uses it to resume a run after a crash. In a
    distributed run (a ``layout`` in the config) this is one rank, started by mlx.launch."""
    run_dir = Path(argv[1]).resolve()
    settings = load_settings()
    secure_bus(settings)  # its events reach the broker over the same (maybe CURVE) bus
    configure_logging("trainer-worker", settings.logging.level, settings.logging.format)
    log.info("blas", library=preload_blas())
    if not (run_dir / "training_config.json").is_file():  # a rank on a host without the run folder
        report_exit(int(os.environ.get("MLX_RANK", "0")), "", "error",
                    f"no run folder at {run_dir} on this host: share the workspace (the same path on every host)")
        return 1
    layout = read_config(run_dir)[0].get("layout")
    launcher = os.getppid()
    if layout:  # the launcher is this rank's parent: its death (the trainer's) interrupts the run
        die_with_parent(signal.SIGUSR1)
    group = RankGroup(layout)
    events = (EventPublisher(bus_address(settings, "events_in"), "trainer-worker", hwm=settings.bus.hwm)
              if group.is_main else NoEvents())
    run = Run(run_dir, events, group)
    run.hang_timeout_s = settings.training.hang_timeout_s
    if len(argv) > 2:
        run.config.resume_from = argv[2]

    def request_stop(*_: object) -> None:
        run.stop_requested = True

    def parent_died(*_: object) -> None:
        run.stop_requested = True
        run.interrupted = True
        if layout and os.getppid() != launcher:
            detach_from_dead_launcher()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGUSR1, parent_died)  # the trainer sets this as the worker's parent-death signal
    signal.signal(signal.SIGHUP, parent_died)  # a remote rank whose ssh session ended
    # Registered only now: the trainer signals rank 0 by this entry, and the handlers must be set.
    group.register(run_dir)
    structlog.contextvars.bind_contextvars(training_id=run.training_id,
                                           **({"rank": group.rank} if group.distributed else {}))
    try:
        run.train()
        return 0
    except Exception as exc:  # reported on the bus and in metrics.jsonl, then a non-zero exit
        if group.distributed and is_peer_lost(exc):
            # Another rank died under a collective: the trainer names that rank (from the
            # launcher's output) in the run's error; this rank only says it lost its peer.
            log.error("peer_lost", error=str(exc))
            group.report_exit("peer_lost", str(exc))
            with contextlib.suppress(OSError):
                run.metrics.write("error", iteration=run.iteration, error=f"rank {group.rank}: {exc}")
            return EXIT_PEER_LOST
        log.exception("training_failed")
        error = describe_failure(exc, run_dir)
        group.report_exit("error", str(error))
        events.publish(TrainingError(training_id=run.training_id, error=str(error), iteration=run.iteration,
                                     suggestion=error.suggestion, error_code=error.code))
        try:  # the bus first: on a full disk this line may not fit
            run.metrics.write("error", iteration=run.iteration, error=str(error), suggestion=error.suggestion,
                              error_code=error.code)
        except OSError as failed:
            log.warning("error_not_written_to_metrics", error=str(failed))
        return 1
    finally:
        events.close()  # LINGER lets the last events leave before the process exits


if __name__ == "__main__":
    sys.exit(main(sys.argv))
