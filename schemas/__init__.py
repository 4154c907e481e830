"""Every message that crosses a process boundary, in one place.

Commands end in ``Request``/``Reply``; events are named for what happened. All are
``msgspec.Struct`` with ``tag=True, kw_only=True`` so one decoder reads any of them and the
same classes validate REST JSON bodies. ``MESSAGE_TYPES`` is the union the bus decodes.
"""

from forgellm.schemas.base import Message, Reply, Request
from forgellm.schemas.catalog import (
    BrowseReply,
    BrowseRequest,
    CheckpointInfo,
    CheckpointsReply,
    CheckpointsRequest,
    DashboardDataReply,
    DashboardDataRequest,
    DatasetInfo,
    DatasetInfoReply,
    DatasetInfoRequest,
    FsEntry,
    ListModelsReply,
    ListModelsRequest,
    ModelEntry,
)
from forgellm.schemas.envelope import Envelope
from forgellm.schemas.errors import HTTP_STATUS, ErrorBody, ErrorCode, ErrorReply
from forgellm.schemas.inference import (
    ChatMessage,
    GenerateCancelReply,
    GenerateCancelRequest,
    GenerateChunk,
    GenerateReply,
    GenerateRequest,
    ModelError,
    ModelLoaded,
    ModelLoading,
    ModelLoadReply,
    ModelLoadRequest,
    ModelStatusReply,
    ModelStatusRequest,
    ModelUnloaded,
    ModelUnloadReply,
    ModelUnloadRequest,
)
from forgellm.schemas.publish import (
    ExportGgufReply,
    ExportGgufRequest,
    FetchDemoRequest,
    ImportGgufRequest,
    ModelAddedReply,
    PublishCheckpointReply,
    PublishCheckpointRequest,
    PublishComplete,
    PublishError,
    PublishProgress,
    PullModelRequest,
    QuantizeReply,
    QuantizeRequest,
)
from forgellm.schemas.service import (
    HealthReply,
    Heartbeat,
    PingReply,
    PingRequest,
    ProcessExited,
    ServiceReady,
    ServiceStatusReply,
    ServiceStatusRequest,
    ServiceStopping,
)
from forgellm.schemas.training import (
    DistributedSpec,
    RealtimeMetrics,
    RealtimeReply,
    RealtimeRequest,
    TrainingCheckpoint,
    TrainingComplete,
    TrainingError,
    TrainingStarted,
    TrainingStartReply,
    TrainingStartRequest,
    TrainingStatusReply,
    TrainingStatusRequest,
    TrainingStopped,
    TrainingStopReply,
    TrainingStopRequest,
    TrainingUpdate,
)

MESSAGE_TYPES: tuple[type[Message], ...] = tuple(
    cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, Message) and cls not in (Message, Request, Reply)
)

# Event topic of each event type (dotted; subscribers filter by prefix).
TOPICS: dict[type[Message], str] = {
    Heartbeat: "service.heartbeat",
    ServiceReady: "service.ready",
    ServiceStopping: "service.stopping",
    ProcessExited: "service.exited",
    TrainingStarted: "training.started",
    TrainingUpdate: "training.update",
    TrainingCheckpoint: "training.checkpoint",
    TrainingComplete: "training.complete",
    TrainingError: "training.error",
    TrainingStopped: "training.stopped",
    ModelLoading: "model.loading",
    ModelLoaded: "model.loaded",
    ModelUnloaded: "model.unloaded",
    ModelError: "model.error",
    PublishProgress: "publish.progress",
    PublishComplete: "publish.complete",
    PublishError: "publish.error",
}

__all__ = [name for name in dir() if not name.startswith("_")]
