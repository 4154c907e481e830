"""Publisher commands and events."""


from forgellm.schemas.base import Message, Reply, Request


class PublishCheckpointRequest(Request, kw_only=True):
    checkpoint_path: str
    training_dir: str


class PublishCheckpointReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Checkpoint published successfully"
    published_model_path: str
    model_name: str
    dashboard_path: str
    readme_path: str


class PublishProgress(Message, kw_only=True):
    job_id: str
    stage: str
    fraction: float


class PublishComplete(Message, kw_only=True):
    job_id: str
    published_model_path: str


class PublishError(Message, kw_only=True):
    job_id: str
    error: str
    suggestion: str = ""
