"""The trainer service: owns the one active training run.

This first version knows there is no run yet; starting runs arrives with the trainer issue.
"""

from forgellm.schemas import (
    Envelope,
    ErrorCode,
    ErrorReply,
    RealtimeReply,
    RealtimeRequest,
    TrainingStatusReply,
    TrainingStatusRequest,
    TrainingStopRequest,
)
from forgellm.services.base import Service, handles


class TrainerService(Service):
    name = "trainer"

    def state(self) -> str:
        return "idle"

    @handles(TrainingStatusRequest)
    async def training_status(self, request: TrainingStatusRequest, header: Envelope) -> TrainingStatusReply:
        return TrainingStatusReply(is_training=False)

    @handles(RealtimeRequest)
    async def realtime(self, request: RealtimeRequest, header: Envelope) -> RealtimeReply:
        return RealtimeReply(is_training=False)

    @handles(TrainingStopRequest)
    async def stop_training(self, request: TrainingStopRequest, header: Envelope) -> ErrorReply:
        return ErrorReply(
            code=ErrorCode.NO_TRAINING_RUNNING,
            error="No training is running",
            suggestion="Start one with POST /api/training/start or 'forgellm train'.",
        )
