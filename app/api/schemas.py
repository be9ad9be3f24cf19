"""Pydantic request and response bodies of the HTTP contract (v1)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["queue_full"])
    message: str = Field(examples=["the queue of 'imagenet-effnet-c4' is full"])
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImagePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64: str = Field(description="the image file (JPEG, PNG, WebP, GIF, BMP, TIFF), base64-encoded")


class ClassifyJSON(BaseModel):
    """The JSON form of a classify request (the multipart form takes the same fields)."""

    model_config = ConfigDict(extra="forbid")
    images: list[ImagePayload] = Field(min_length=1)
    method: str | None = Field(None, description="vanilla | equitune | equizero | lambda (default: the model's)")
    top_k: int | None = Field(None, description="predictions per image (default: 5, or the number of labels if fewer)")
    labels: list[str] | None = Field(None, description="zero-shot models: the label set to choose from")


class Prediction(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability of the combined output")


class Transform(BaseModel):
    name: str = Field(description="the group element that made this copy, e.g. rot90")
    weight: float = Field(
        alias="lambda",
        description="normalised weight of this copy in the answer (sums to 1 over copies)",
    )
    top_label: str = Field(description="what this copy alone predicted")
    top_score: float = Field(description="this copy's own softmax probability for top_label")

    model_config = ConfigDict(populate_by_name=True)


class ImageAnswer(BaseModel):
    predictions: list[Prediction]
    transforms: list[Transform]
    selected_transform: str | None = Field(description="the copy equizero chose; null for other methods")
    lambda_entropy: float = Field(description="entropy (nats) of the λ-net's weights: 0 = one copy, log|G| = uniform")


class Timing(BaseModel):
    queue_ms: float = Field(description="longest time one of the request's images waited for its batch")
    inference_ms: float = Field(description="the fused forward pass of that batch")
    batch_size: int = Field(description="images in that batch (all requests)")


class ClassifyResponse(BaseModel):
    model: str
    method: str
    group: str
    results: list[ImageAnswer]
    timing: Timing


class ModelCard(BaseModel):
    """One served model. Tasks add their own fields (e.g. ``env`` for act models)."""

    model_config = ConfigDict(extra="allow")

    name: str
    task: str = Field(description="classify | generate | translate | act")
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
    num_labels: int | None = Field(
        None, description="classify: null for zero-shot models (labels come with each request)"
    )
    zero_shot: bool | None = Field(None, description="classify: the label set comes with each request")
    input_size: int | None = Field(None, description="classify: image side in pixels")


class ModelList(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: str = Field(examples=["ok", "loading", "draining"])
    live: bool | None = Field(None, description="GET /health/live: the process runs (Open Inference Protocol)")
    ready: bool | None = Field(None, description="GET /health/ready: every model loaded and warmed up")
