"""One rank of a data-parallel run on ``mlx.distributed``: its group, its share of each batch,
the reductions that make a distributed run report what one process would, and the watchdog that
ends a rank stuck in a collective.

The engine is MLX's own (``mx.distributed`` with the ring, NCCL or MPI backend, started by
``mlx.launch``): no all-reduce of ours. Every collective runs on the CPU stream: on Metal a
GPU-stream all-reduce can trip the GPU watchdog (mlx-examples #1185/#1200).

A single-process run uses the same object with a world of one, where every method is the
identity, so the training loop has one shape.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("trainer.rank")

# Exit codes a rank uses for the faults of a distributed run (the trainer reads them from the
# launcher's output): a peer vanished under a collective; no progress for hang_timeout_s.
EXIT_PEER_LOST = 75
EXIT_HUNG = 76
# A rank's last word, one line on stderr, relayed by mlx.launch to the trainer.
EXIT_MARKER = "forgellm-rank-exit "


class RankGroup:
    """This process's place in the run: ``rank`` of ``size``, on ``host``."""

    def __init__(self, layout: dict[str, Any] | None) -> None:
        self.layout = layout
        self.size, self.rank = 1, 0
        self.rank_hosts: list[str] = ["localhost"]
        self.group = None
        if layout and int(layout.get("world_size", 1)) > 1:
            import mlx.core as mx

            backend = layout["backend"]
            self.group = mx.distributed.init(strict=True, backend=backend)
            self.size, self.rank = self.group.size(), self.group.rank()
            self.rank_hosts = list(layout["rank_hosts"])
            if self.size != int(layout["world_size"]):
                raise RuntimeError(f"mlx.distributed formed a group of {self.size} ranks, the layout has "
                                   f"{layout['world_size']}")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run (checkpoints, metrics) and publishes on the bus."""
        return self.rank == 0

    @property
    def host(self) -> str:
        return self.rank_hosts[self.rank] if self.rank < len(self.rank_hosts) else "localhost"

    def hosts(self) -> list[str]:
        """Each host once, in rank order."""
        return list(dict.fromkeys(self.rank_hosts)) if self.distributed else []

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's rows of a global batch: disjoint across ranks, together the whole batch."""
        return indices[self.rank::self.size]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over every rank (the same result on each)."""
        if not self.distributed:
            return list(values)
        import mlx.core as mx

        total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group, stream=mx.cpu)
        return total.tolist()

    def gather(self, value: float) -> list[float]:
        """One value from each rank, in rank order."""
        if not self.distributed:
            return [value]
        slots = [0.0] * self.size
        slots[self.rank] = value
        return self.sum(slots)

    def average_gradients(self, grads: Any) -> Any:
        if not self.distributed:
            return grads
        import mlx.core as mx
        import mlx.nn as nn

        return nn.average_gradients(grads, group=self.group, communication_stream=mx.cpu)

    def broadcast_trainable(self, model: Any) -> None:
        """Rank 0's trainable parameters on every rank: a run starts from identical weights
        whatever each host's random stream or loaded checkpoint gave it."""
        if not self.distributed:
            return
        import mlx.core as mx
        from mlx.utils import tree_flatten

        synced = []
        for name, value in tree_flatten(model.trainable_parameters()):
            mine = value if self.is_main else mx.zeros_like(value)
            synced.append((name, mx.distributed.all_sum(mine, group=self.group, stream=mx.cpu)))
            mx.eval(synced[-1][1])
        model.load_weights(synced, strict=False)

    def broadcast_rows(self, rows: Any) -> Any:
        """Rank 0's int32 token matrix on every rank (replay text is generated once, by rank 0:
        two ranks appending to one cache would corrupt it, and two hosts might sample apart)."""
        if not self.distributed:
            return rows
        import mlx.core as mx
        import numpy as np

        if self.is_main:
            rows = np.asarray(rows, dtype=np.int32)
            rows = rows if rows.ndim == 2 else np.zeros((0, 1), np.int32)  # none: an empty matrix
        shape = [float(n) for n in rows.shape] if self.is_main else [0.0, 0.0]
        height, width = (int(n) for n in self.sum(shape))
        if height == 0:  # every rank knows it now: nothing to send
            return np.zeros((0, width), np.int32)
        mine = mx.array(rows, dtype=mx.int32) if self.is_main else mx.zeros((height, width), dtype=mx.int32)
        return np.array(mx.distributed.all_sum(mine, group=self.group, stream=mx.cpu))

    def memory_by_host(self, per_rank: list[float]) -> dict[str, float]:
        by_host: dict[str, float] = {}
        for rank, gb in enumerate(per_rank):
            host = self.rank_hosts[rank] if rank < len(self.rank_hosts) else f"rank{rank}"
            by_host[host] = round(by_host.get(host, 0.0) + gb, 4)
        return by_host

    def register(self, run_dir: Path) -> None:
        """``ranks/<rank>.json``: who runs where, under which launch (the trainer signals rank 0
        by this pid; a file from an earlier launch carries another launch id)."""
        if not self.distributed:
            return
        folder = run_dir / "ranks"
        try:
            folder.mkdir(exist_ok=True)
            entry = {"rank": self.rank, "world_size": self.size, "host": self.host, "pid": os.getpid(),
                     "launch_id": os.environ.get("FORGELLM_LAUNCH_ID", ""), "started": time.time()}
            tmp = folder / f".{self.rank}.json.tmp"
            tmp.write_text(json.dumps(entry))
            tmp.replace(folder / f"{self.rank}.json")
        except OSError as exc:  # a rank on a host without the run folder: it only computes
            log.warning("rank_not_registered", rank=self.rank, error=str(exc))

    def report_exit(self, kind: str, error: str) -> None:
        report_exit(self.rank, self.host, kind, error)


def report_exit(rank: int, host: str, kind: str, error: str) -> None:
    """A rank's last line on stderr, which mlx.launch relays to the trainer (``host`` empty: the
    trainer takes it from the layout)."""
    line = EXIT_MARKER + json.dumps({"rank": rank, "host": host, "kind": kind, "error": error})
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def is_peer_lost(exc: BaseException) -> bool:
    """A collective failed because another rank went away (MLX raises RuntimeError)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("[ring]", "peer", "nccl", "mpi", "connection"))


class ProgressWatchdog:
    """Ends this rank when the training loop makes no progress for ``timeout_s``: a rank blocked
    in a collective (a peer frozen, a ring deadlock, mlx #4475) never returns to Python, so this
    thread, not a signal handler, is what notices. MLX releases the GIL while it waits."""

    def __init__(self, group: RankGroup, timeout_s: float) -> None:
        self.group, self.timeout_s = group, timeout_s
        self._last = time.monotonic()
        self._armed = False
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        self._last = time.monotonic()
        self._armed = True

    def beat(self) -> None:
        self._last = time.monotonic()

    def disarm(self) -> None:
        self._armed = False

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            silent = time.monotonic() - self._last
            if self._armed and silent > self.timeout_s:
                why = (f"no training step finished for {silent:.0f} s (training.hang_timeout_s = "
                       f"{self.timeout_s:g}): a collective is stuck or a peer froze")
                log.error("rank_hung", rank=self.group.rank, host=self.group.host, seconds=round(silent, 1))
                self.group.report_exit("hang", why)
                os._exit(EXIT_HUNG)


def watchdog_for(group: RankGroup, timeout_s: float) -> ProgressWatchdog | None:
    return ProgressWatchdog(group, timeout_s) if group.distributed else None


def detach_from_dead_launcher() -> None:
    """The launcher that relayed this rank's output is gone: writes to its pipes would fail, so
    the rest of this rank's output goes nowhere instead (rank 0's record is metrics.jsonl)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
