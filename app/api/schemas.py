"""The bodies of the routes every server has (errors, health, the model list); each task's own
request and answer types are its package's (``app.tasks.<task>.messages``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.tasks import TASKS


class ErrorDetail(BaseModel):
    code: str = Field(examples=["queue_full"])
    message: str = Field(examples=["the queue of 'imagenet-effnet-c4' is full"])
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    """One served model. Tasks add their own fields (e.g. ``env`` for act models)."""

    model_config = ConfigDict(extra="allow")

    name: str
    task: str = Field(description="the task it serves: " + " | ".join(TASKS))
    backbone: str
    group: str
    transforms: list[str]
    methods: list[str]
    default_method: str
    lambda_trained: bool = Field(description="whether λ-equitune uses a trained λ-net (else uniform λ = equitune)")
    device: str
    dtype: str
    runtime: str = Field(description="what runs the backbone: torch or onnxruntime")
    description: str


class ModelList(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: str = Field(examples=["ok", "loading", "draining", "failed"])
    live: bool | None = Field(None, description="GET /health/live: the process runs (Open Inference Protocol)")
    ready: bool | None = Field(None, description="GET /health/ready: every model loaded and warmed up")
    loaded: list[str] | None = Field(None, description="while loading: the models loaded and warm so far")
    pending: list[str] | None = Field(None, description="while loading: the models still to load")
    loading: str | None = Field(None, description="while loading: the model loading now")
    estimated_remaining_s: float | None = Field(
        None, description="while loading: seconds still to go, from the last start's times (null on a first start)"
    )
    error: str | None = Field(None, description="status failed: why a model did not load (the server exits)")
