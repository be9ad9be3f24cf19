"""The server's settings: every knob is an ``EQUISERVE_*`` env var and a ``serve`` flag.

Each task's own limits (images per request, commands per request, ...) are its settings section
(``app.tasks.<task>.settings``, ``EQUISERVE_<TASK>_*``), overridable per model in ``model.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


# What runs an image backbone (app.tasks.load_model): here, as the setting's type.
Runtime = Literal["auto", "torch", "onnxruntime"]


def default_cache_dir() -> Path:
    """Where what a first start computes is kept, unless EQUISERVE_ONNX_CACHE_DIR says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "equiserve" / "onnx"


class Settings(BaseSettings):
    """Server settings. Read from the environment (prefix ``EQUISERVE_``) and ``.env``."""

    model_config = SettingsConfigDict(env_prefix="EQUISERVE_", env_file=".env", extra="ignore")

    host: str = Field(
        "127.0.0.1",
        description="bind address: this machine only by default; 0.0.0.0 to be reachable from others "
        "(the container image, compose and the manifests set it)",
    )
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC (docs/v2.md), on the same host and engine; "
        "0 = off (the container image, compose and the manifests set 8001); needs the 'grpc' extra",
    )
    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="model repository: <dir>/<name>/model.yaml")
    models: Annotated[list[str] | None, NoDecode] = Field(
        None, description="comma-separated model names to load (default: every model whose weights are available)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="inference dtype on CUDA (the CPU always runs float32)"
    )
    runtime: Runtime = Field(
        "auto",
        description="what runs image backbones: auto = onnxruntime on the CPU (faster there), torch on CUDA",
    )
    onnx_cache_dir: Path | None = Field(
        None,
        description="what the first start computes and later ones reuse: ONNX exports, dequantised GGUF language "
        "models, batch-size decisions (default: $XDG_CACHE_HOME/equiserve/onnx)",
    )
    channels_last: bool = Field(True, description="channels_last memory format (faster convolutions, CPU and CUDA)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per fused forward pass (GPUs: 64-256)")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more, from its FIRST item")
    queue_size: int = Field(512, ge=1, description="images waiting per model before 429")
    request_timeout_s: float = Field(
        30.0, gt=0, description="deadline from a request's arrival to the start of its batch, else 504"
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request body limit (413)")
    max_decoded_pixels: int = Field(
        400_000_000,
        ge=1,
        description="decoded image pixels all requests of the process may hold at once, every image model "
        "together (reserved from the headers before decoding; 429 when spent, 413 for a request larger than "
        "all of it): two requests at the classify per-request default (200 M), sixteen images at the "
        "per-image one (25 M); about 1.2 GB as 8-bit RGB",
    )
    api_key: SecretStr | None = Field(None, description="when set, inference routes need 'Authorization: Bearer <key>'")
    protect_metrics: bool = Field(False, description="when set with an API key, /metrics needs it too")
    warmup: bool = Field(True, description="run a max-size batch per model before turning ready")
    memory_trim_idle_s: float = Field(
        2.0, ge=0, description="after this long idle, return freed heap memory to the OS (glibc; 0 = never)"
    )
    keep_alive_s: int = Field(
        65,
        ge=1,
        description="idle keep-alive connections are closed after this; longer than clients' pool timeouts "
        "(httpx 5 s, aiohttp 15 s), so a client never reuses a connection the server is closing",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection must send a request's whole header within this, from its first byte (or from "
        "connecting), else 408 and closed: slow clients cannot hold connections open",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="longest wait for the next piece of a request body while the server reads it, else 408",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long to wait for accepted requests")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads of torch and onnxruntime for inference (default: one per core)"
    )
    compute_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="nice increment of the inference and preprocessing threads (Linux), so the event loop "
        "answers and sheds first when the CPU is short; 0 = same priority (use 0 beside CPU-heavy processes of "
        "the same session or container: nice weighs threads only within a scheduling group)",
    )
    preprocess_threads: int = Field(4, ge=1, description="threads decoding and resizing images")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    tracing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="OpenTelemetry traces of the inference routes (docs/tracing.md): auto = on when the standard "
        "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT or OTEL_TRACES_EXPORTER is set; needs the 'tracing' extra",
    )
    processes: int = Field(
        1,
        ge=1,
        description="server processes sharing host:port (SO_REUSEPORT), each with its own engine and models: "
        "several per GPU keep it busy while each one's Python works; /metrics reports them all",
    )
    reuse_port: bool = Field(
        False, description="bind with SO_REUSEPORT (set for each process by --processes; for running several by hand)"
    )

    # speed: precision, runtimes and the input pipeline (docs/performance.md). LoadOptions carries
    # them to the task loaders under the same names.
    precision: Literal["auto", "float32", "int8"] = Field(
        "auto",
        description="image backbones on the CPU: int8 = onnxruntime static quantization (calibrated, cached); "
        "auto = each model's model.yaml `precision`, else float32",
    )
    onnx_spin: bool = Field(
        False,
        description="onnxruntime's intra-op threads spin-wait for work between operators: a little faster on "
        "cores of one's own, but the spinning takes the cores that decoding and the event loop need",
    )
    tune_batch_size: bool = Field(
        True,
        description="image models on the CPU: warmup times the fused pass at 1, 2, 4, ... max_batch_size images "
        "and caps batches at the size cheapest per image (big CPU batches can cost more per image)",
    )
    onnx_provider: Literal["auto", "cuda", "tensorrt", "cpu"] = Field(
        "auto", description="onnxruntime execution provider on CUDA (runtime onnxruntime; needs onnxruntime-gpu)"
    )
    input_pipeline: Literal["auto", "host", "device", "device-decode"] = Field(
        "auto",
        description="where images are resized: host (preprocessing pool), device (uint8 to the device, resized "
        "there), device-decode (JPEGs decoded on the device too, nvJPEG); auto = device-decode on CUDA, else host",
    )
    compile_mode: Literal["none", "compile", "cudagraphs"] = Field(
        "none", description="torch backbones: torch.compile or CUDA graphs per batch-size bucket (CUDA)"
    )

    # Ray Serve: `serve --ray` serves the same HTTP contract through Ray Serve replicas, each one
    # Engine (app/ray_serve.py; docs/deploy.md). Ignored without --ray.
    ray: bool = Field(False, description="serve through Ray Serve: engine replicas behind Ray's proxy on host:port")
    ray_address: str | None = Field(
        None, description="join this Ray cluster ('auto' or host:port of its GCS); default: start a local one"
    )
    replicas: int = Field(1, ge=1, description="Ray Serve replicas, each one engine (the start count when autoscaling)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling: fewest replicas (default 1)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: most replicas; setting it turns it on")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="autoscaling: ongoing requests per replica that Ray Serve scales towards"
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="requests Ray Serve sends one replica at a time (more wait in its proxy); at least "
        "max_batch_size, or batches never fill",
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica (and its default torch_threads)")
    ray_metrics_dir: Path | None = Field(
        None,
        description="folder where `serve --ray` keeps Prometheus file_sd targets: equiserve_replicas.json "
        "(each replica's metrics listener) and ray_nodes.json (Ray's metrics agents); default: "
        "<temp dir>/equiserve-prometheus",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            names = [n.strip() for n in value.split(",") if n.strip()]
            return names or None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value
