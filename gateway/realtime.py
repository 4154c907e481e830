"""Socket.IO: ``subscribe_training`` and the ``training.*`` bus events turned into the
reference's ``training_update`` / ``training_complete`` / ``training_error``, plus
``training_checkpoint`` (an extension: a checkpoint is on disk, with its iteration, path and
validation loss) so that a client's checkpoint list follows the run without polling.

The publisher's ``publish.*`` events (progress of a publish, a demo fetch, a GGUF import, a Hub
pull) go to every connected client as ``publish_progress`` / ``publish_complete`` /
``publish_error`` with the ``correlation_id`` of the REST request that started the job (its
``X-Request-ID``): the page that sent it shows the stages of its own job.

Subscribe first, then snapshot (the "Clone" pattern): a client that joins mid-run gets the
current state at once from the trainer, then every live update.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import socketio
import structlog

from forgellm.bus import AsyncRpcClient, AsyncSubscriber, BusError
from forgellm.schemas import (
    PublishComplete,
    PublishError,
    PublishProgress,
    TrainingCheckpoint,
    TrainingComplete,
    TrainingError,
    TrainingStatusReply,
    TrainingStatusRequest,
    TrainingUpdate,
)

log = structlog.get_logger("gateway.realtime")

SOCKETIO_EVENTS: dict[type, str] = {
    TrainingUpdate: "training_update",
    TrainingComplete: "training_complete",
    TrainingError: "training_error",
    TrainingCheckpoint: "training_checkpoint",
}
ALL_RUNS = "training:*"
JOB_EVENTS: dict[type, str] = {
    PublishProgress: "publish_progress",
    PublishComplete: "publish_complete",
    PublishError: "publish_error",
}


def room(training_id: str | None) -> str:
    return f"training:{training_id}" if training_id else ALL_RUNS


def payload(event: msgspec.Struct) -> dict[str, Any]:
    data = msgspec.to_builtins(event)
    data.pop("type", None)
    return data


def _snapshot(status: TrainingStatusReply) -> dict[str, Any]:
    return {
        "training_id": status.training_id,
        "iteration": status.current_iteration,
        "training_loss": status.current_loss,
        "validation_loss": status.validation_loss,
        "learning_rate": status.learning_rate,
        "tokens_per_second": status.tokens_per_second,
        "memory_usage_gb": status.memory_usage_gb,
        "progress_percentage": status.progress_percentage,
        "eta_minutes": status.eta_minutes,
        "snapshot": True,
    }


class TrainingEvents:
    def __init__(self, sio: socketio.AsyncServer, subscriber: AsyncSubscriber, trainer: AsyncRpcClient) -> None:
        self.sio = sio
        self.subscriber = subscriber
        self.trainer = trainer
        self._task: asyncio.Task[None] | None = None
        sio.on("subscribe_training", self.subscribe_training)
        sio.on("unsubscribe_training", self.unsubscribe_training)

    async def subscribe_training(self, sid: str, data: Any = None) -> dict[str, Any]:
        if data is None:
            data = {}
        training_id = data.get("training_id") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not (training_id is None or isinstance(training_id, str)):
            return {"success": False, "error": "expected {training_id: string}", "error_code": "INVALID_REQUEST"}
        await self.sio.enter_room(sid, room(training_id))
        try:
            status = await self.trainer.request(TrainingStatusRequest(), timeout=2.0)
        except BusError as exc:
            log.warning("snapshot_failed", error=str(exc))
            return {"success": True, "training_id": training_id, "snapshot": False}
        assert isinstance(status, TrainingStatusReply)
        if status.is_training and (training_id is None or training_id == status.training_id):
            await self.sio.emit("training_update", _snapshot(status), to=sid)
        return {"success": True, "training_id": training_id, "snapshot": True}

    async def unsubscribe_training(self, sid: str, data: Any = None) -> dict[str, Any]:
        training_id = data.get("training_id") if isinstance(data, dict) else None
        await self.sio.leave_room(sid, room(training_id if isinstance(training_id, str) else None))
        return {"success": True}

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._bridge())

    async def _bridge(self) -> None:
        async for record in self.subscriber:
            name = SOCKETIO_EVENTS.get(type(record.body))
            if name is None:
                job_event = JOB_EVENTS.get(type(record.body))
                if job_event is not None:
                    data = payload(record.body)
                    data["correlation_id"] = record.header.correlation_id
                    await self.sio.emit(job_event, data)
                continue
            data = payload(record.body)
            data["seq"] = record.header.seq
            await self.sio.emit(name, data, to=[room(data.get("training_id")), ALL_RUNS])

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.subscriber.close()
