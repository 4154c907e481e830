"""Training commands and events (the reference's "Training Management" and WebSocket events)."""

from typing import Annotated, Literal

import msgspec

from forgellm.schemas.base import Message, Reply, Request

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class DistributedSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``distributed`` of a start request: a data-parallel run on ``mlx.distributed``.

    ``{"processes": 2}`` runs two ranks on this machine; ``hosts`` (IP addresses for the ring
    backend) runs ``processes`` ranks on each, the first host being this machine (rank 0 writes
    the run); ``hostfile`` names an ``mlx.launch`` hostfile in the workspace instead. Empty
    ``hosts`` and no ``hostfile`` fall back to the config's ``training.hosts``."""

    processes: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    hosts: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=255)]],
                     msgspec.Meta(max_length=64)] = []
    backend: Literal["ring", "nccl", "mpi", "auto"] | None = None  # None: the config's training.backend
    hostfile: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)] | None = None


class TrainingStartRequest(Request, kw_only=True):
    """``POST /api/training/start``. Fields beyond the reference have documented defaults."""

    model_name: NonEmpty
    dataset: NonEmpty
    training_type: Literal["cpt", "ift"] = "cpt"
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 500
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 2
    learning_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 5e-5
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    data_mixture_ratio: Ratio = 1.0
    overfitting_threshold: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.1
    save_every: Annotated[int, msgspec.Meta(ge=1)] = 50
    weight_decay: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.01
    warmup_steps: Annotated[int, msgspec.Meta(ge=0)] = 10
    grad_checkpoint: bool = False
    fine_tune_type: Literal["lora", "dora", "full"] = "lora"
    lora_rank: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    lora_alpha: Annotated[float, msgspec.Meta(gt=0.0)] = 16.0
    lora_dropout: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.0
    lora_layers: Annotated[int, msgspec.Meta(ge=-1)] = 16
    lora_targets: list[str] = []
    max_seq_length: Annotated[int, msgspec.Meta(ge=8, le=1_048_576)] = 2048
    steps_per_eval: Annotated[int, msgspec.Meta(ge=1)] = 50
    val_batches: Annotated[int, msgspec.Meta(ge=1)] = 8
    validation_split: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.1
    early_stopping_patience: Annotated[int, msgspec.Meta(ge=0)] = 3
    steps_per_report: Annotated[int, msgspec.Meta(ge=1)] = 10
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 0  # numpy and MLX take unsigned seeds
    general_dataset: str | None = None
    resume_from: str | None = None
    distributed: DistributedSpec | None = None  # absent: one process, as before


class TrainingStartReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Training started successfully"
    training_id: str
    output_dir: str
    # Dataset files left out, one line each ("<dataset>/<file>: skipped (binary)"): binary, not
    # UTF-8, empty, or a link leading out of the dataset folder.
    warnings: list[str] = []


class TrainingStatusRequest(Request, kw_only=True):
    idempotent = True


class TrainingStatusReply(Reply, kw_only=True):
    success: bool = True
    is_training: bool = False
    training_id: str | None = None
    training_type: str | None = None
    phase: str = "idle"
    current_iteration: int = 0
    max_iterations: int = 0
    progress_percentage: float = 0.0
    current_loss: float | None = None
    validation_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    memory_usage_gb: float | None = None
    eta_minutes: float | None = None
    output_dir: str | None = None
    world_size: int = 1  # ranks of a distributed run (1: one process)
    hosts: list[str] = []  # the hosts the ranks run on, rank 0's first
    host_memory_gb: dict[str, float] = {}  # memory in use per host (its ranks summed)
    # why the run failed (phase "failed"), as its training_error said
    error: str | None = None
    error_code: str | None = None
    suggestion: str | None = None


class TrainingStopRequest(Request, kw_only=True):
    pass


class TrainingStopReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Training stopped successfully"


class RealtimeRequest(Request, kw_only=True):
    idempotent = True


class RealtimeMetrics(msgspec.Struct, kw_only=True):
    iteration: int
    training_loss: float | None = None
    validation_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    memory_usage_gb: float | None = None  # distributed: the largest rank's
    gpu_utilization: float | None = None
    timestamp: str
    world_size: int = 1
    hosts: list[str] = []
    host_memory_gb: dict[str, float] = {}


class RealtimeReply(Reply, kw_only=True):
    success: bool = True
    current_metrics: RealtimeMetrics | None = None
    is_training: bool = False


# --- events (topic ``training.*``) -------------------------------------------------------


class TrainingStarted(Message, kw_only=True):
    training_id: str
    training_type: str
    output_dir: str
    max_iterations: int


class TrainingUpdate(Message, kw_only=True):
    training_id: str
    iteration: int
    training_loss: float | None = None
    validation_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    memory_usage_gb: float | None = None
    progress_percentage: float = 0.0
    eta_minutes: float | None = None
    phase: str = "training"
    trained_tokens: int | None = None
    peak_memory_gb: float | None = None
    # Distributed runs: tokens_per_second and trained_tokens count every rank; memory_usage_gb and
    # peak_memory_gb are the largest rank's, rank_memory_gb each rank's, host_memory_gb each host's.
    world_size: int = 1
    hosts: list[str] = []
    rank_memory_gb: list[float] = []
    host_memory_gb: dict[str, float] = {}


class TrainingCheckpoint(Message, kw_only=True):
    training_id: str
    iteration: int
    path: str
    validation_loss: float | None = None


class TrainingComplete(Message, kw_only=True):
    training_id: str
    success: bool = True
    stopped: bool = False
    final_iteration: int
    final_loss: float | None = None
    training_time_minutes: float
    best_checkpoints: list[int] = []
    output_dir: str
    reason: str = ""


class TrainingError(Message, kw_only=True):
    training_id: str
    error: str
    iteration: int | None = None
    suggestion: str = ""
    error_code: str = ""  # an ErrorCode when the failure has one (DISK_FULL, ...)


class TrainingStopped(Message, kw_only=True):
    training_id: str
    iteration: int
