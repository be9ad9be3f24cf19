"""The task contract: what one served model of a task supplies to the engine.

The engine (``app.engine``) is the same for every task: it loads models, admits requests
(queue bound, predicted wait, deadline from arrival), batches items, runs the batch function
in its inference thread, answers, drains, and records metrics. A task is a package
``app.tasks.<task>`` (registered in ``app.tasks.TASKS``) with a ``ServedModel`` subclass that
fills in the pieces below, a spec class (``TaskSpec`` subclass) for its ``model.yaml``, its
limits (``TaskLimits`` subclass: an ``EQUISERVE_<TASK>_*`` env section, overridable per model
under ``limits:``) and its HTTP adapter (``app.tasks.http``). The engine never looks inside.

A request flows through the pieces in this order::

    split(request)           -> [piece, ...]      on the event loop: cheap checks, one piece per batch item
    prepare(piece)           -> item              in the preprocessing pool (or inline): decode, tokenize
    __call__([item, ...])    -> [result | error]  the inference thread: ONE fused pass for the batch
    respond(request, results, timing) -> output   the request's answer

``split`` defaults to one piece (the request itself) and ``prepare`` to the identity. Errors are
``app.errors``': raise ``InvalidInput``, ``TooLarge``, ... from ``split`` or ``prepare``; return
an exception in the batch function's list to fail one item without failing the others
(``app.equivariance.per_group`` does that per method).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, computed_field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.equivariance import Method, ZeroLoss
from app.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from app.config import Settings
    from app.runtime.pixel_budget import PixelBudget

RequestT = TypeVar("RequestT")
PieceT = TypeVar("PieceT")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
OutputT = TypeVar("OutputT")


class BackboneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: str = Field(description="a backbone family of app.backbones.families")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the backbone class")


class TaskLimits(BaseSettings):
    """A task's limits: a settings section of its own, ``EQUISERVE_<TASK>_<LIMIT>`` env vars (and
    ``EQUISERVE_<LIMIT>``, the name from before tasks had sections), overridden per model by the
    entry's ``limits:`` in ``model.yaml``. Subclasses declare their fields with ``limit``."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)


def limit(task: str, name: str, default: Any, description: str, **constraints: Any) -> Any:
    """A ``TaskLimits`` field read from ``EQUISERVE_<TASK>_<NAME>``, else ``EQUISERVE_<NAME>``."""
    aliases = AliasChoices(f"EQUISERVE_{task.upper()}_{name.upper()}", f"EQUISERVE_{name.upper()}")
    return Field(default, description=description, validation_alias=aliases, **constraints)


def env_names(limits_type: type[TaskLimits], field: str) -> list[str]:
    """The env vars a limit is read from, preferred first."""
    alias = limits_type.model_fields[field].validation_alias
    return [str(choice) for choice in alias.choices] if isinstance(alias, AliasChoices) else [field.upper()]


class TaskSpec(BaseModel):
    """The fields of ``model.yaml`` common to every task; each task's spec adds its own, and
    names its limits class (``limits_type``): ``limits:`` in the entry overrides the env vars."""

    model_config = ConfigDict(extra="forbid")
    limits_type: ClassVar[type[TaskLimits]] = TaskLimits

    name: str
    task: str
    description: str = ""
    backbone: BackboneSpec
    group: str
    methods: list[Method] = Field(default_factory=lambda: list(Method))
    default_method: Method = Method.EQUITUNE
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB
    lambda_net: str | None = Field(None, description="safetensors file of a trained λ-net")
    optional: bool = Field(False, description="skip when the weights need a download, unless named")
    limits: TaskLimits = Field(default_factory=TaskLimits, description="this model's limits (default: the env's)")

    @model_validator(mode="before")
    @classmethod
    def _read_limits(cls, raw: Any) -> Any:
        """``limits:`` of the entry over the env vars: the settings class reads the env at validation."""
        if isinstance(raw, dict) and not isinstance(raw.get("limits"), TaskLimits):
            overrides = raw.get("limits") or {}
            if not isinstance(overrides, dict):
                raise ValueError("limits must be a mapping of limit names to values")
            unknown = sorted(set(overrides) - set(cls.limits_type.model_fields))
            if unknown:
                raise ValueError(f"unknown limits {unknown}; this task has {sorted(cls.limits_type.model_fields)}")
            raw = {**raw, "limits": cls.limits_type(**overrides)}
        return raw

    @model_validator(mode="after")
    def _check_methods(self) -> TaskSpec:
        if self.default_method not in self.methods:
            raise ValueError(f"default_method {self.default_method.value!r} is not among methods")
        return self

    def resolve_method(self, method: str | None) -> Method:
        """A request's ``method`` (None: the default), refused unless this entry serves it."""
        if method is None:
            return self.default_method
        if method not in {m.value for m in self.methods}:
            allowed = [m.value for m in self.methods]
            raise InvalidInput(f"method {method!r} is not served by {self.name}; choose from {allowed}")
        return Method(method)


@dataclass(frozen=True)
class LoadOptions:
    """How to load any model: the engine builds it from ``Settings``; training and tests
    pass what they need."""

    device: str = "auto"
    dtype: str = "float32"
    channels_last: bool = True
    runtime: str = "torch"  # image backbones: torch | onnxruntime | auto
    onnx_cache_dir: Path | None = None
    threads: int | None = None  # intra-op threads of onnxruntime
    # speed (Settings' `# speed` block; docs/performance.md)
    precision: str = "auto"  # image backbones on the CPU: auto | float32 | int8
    onnx_provider: str = "auto"  # onnxruntime on CUDA: auto | cuda | tensorrt | cpu
    onnx_spin: bool = False  # onnxruntime's intra-op threads spin-wait between operators
    tune_batch_size: bool = True  # image models on the CPU: cap batches at the size warmup found cheapest
    input_pipeline: str = "auto"  # auto | host | device | device-decode
    compile_mode: str = "none"  # torch backbones: none | compile | cudagraphs
    # The decoded pixels every image model of the process reserves from (the engine's, sized by
    # EQUISERVE_MAX_DECODED_PIXELS); None: a model loaded on its own makes its own.
    decoded_pixels: PixelBudget | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, decoded_pixels: PixelBudget | None = None) -> LoadOptions:
        return cls(
            device=settings.device,
            dtype=settings.dtype,
            channels_last=settings.channels_last,
            runtime=settings.runtime,
            onnx_cache_dir=settings.onnx_cache_dir,
            threads=settings.torch_threads,
            precision=settings.precision,
            onnx_provider=settings.onnx_provider,
            onnx_spin=settings.onnx_spin,
            tune_batch_size=settings.tune_batch_size,
            input_pipeline=settings.input_pipeline,
            compile_mode=settings.compile_mode,
            decoded_pixels=decoded_pixels,
        )


@dataclass(frozen=True)
class Timing:
    """How a request was served (the slowest of its items)."""

    queue_ms: Annotated[float, Field(description="longest time one of the request's items waited for its batch")]
    inference_ms: Annotated[float, Field(description="the fused pass of that batch")]
    batch_size: Annotated[int, Field(description="items in that batch (all requests)")]


# The λ-net's own entropy, whichever method answered (a result's field; the metric
# equiserve_lambda_entropy observes it): the weights of the answer itself are ``UsedWeights``'.
LambdaNetEntropy = Annotated[
    float | None,
    Field(
        description="entropy (nats) of the λ-net's own weights over the copies, whatever the method: 0 = it "
        "trusts one copy, log|G| = uniform (an untrained λ-net); null where the method computes no λ"
    ),
]


class UsedWeights:
    """A result (or answer) whose ``transforms`` carry the weights its answer used: their entropy
    is a field of the answer, so that equizero's one-hot choice reads 0 and equitune log|G|."""

    transforms: Sequence[Any]

    @computed_field(  # type: ignore[prop-decorator]
        description="entropy (nats) of the weights this answer used (the transforms' lambda): 0 = one copy "
        "(vanilla, equizero), log|G| = uniform (equitune)"
    )
    @property
    def weight_entropy(self) -> float:
        return float(-sum(t.weight * math.log(t.weight) for t in self.transforms if t.weight > 0))


class Diagnosed(Protocol):
    """What the engine's metrics read from a result, where it has them (an attribute a result
    lacks counts as None)."""

    lambda_net_entropy: float | None
    selected_transform: str | None


Emit = Callable[[str, Any], None]  # (event kind, payload): thread-safe, from the inference thread


class ServedModel(ABC, Generic[RequestT, PieceT, ItemT, ResultT, OutputT]):
    """One loaded model of one task. Subclasses set ``task`` and ``spec_type`` and fill in
    the abstract methods; the class attributes below declare the task's capabilities."""

    task: ClassVar[str]
    spec_type: ClassVar[type[TaskSpec]]
    # Batches of this task always wait ``max_wait_ms`` for more items, even with nothing
    # announced: for tasks whose batch runs long (a whole generation), so that a request
    # arriving just after a lone one does not wait a whole batch.
    always_wait: ClassVar[bool] = False
    # ``prepare`` runs in the preprocessing pool (image decoding); cheap ones run inline.
    prepare_in_pool: ClassVar[bool] = False
    # ``stream`` may be asked for (tokens as they are made).
    streams: ClassVar[bool] = False

    def __init__(self, spec: TaskSpec, *, lambda_trained: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.lambda_trained = lambda_trained
        self.device = device
        self.dtype = dtype

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, folder: Path, spec: Any, options: LoadOptions) -> ServedModel:
        """Build the model of entry ``spec`` from its folder (blocking; safetensors only)."""

    @classmethod
    def weights_are_local(cls, spec: Any) -> bool:
        """Whether loading needs no download (entries marked ``optional`` are skipped if not)."""
        return True

    # -- what the engine and GET /v1/models see -------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def limits(self) -> Any:
        """This model's limits: its task's ``TaskLimits``, with the entry's overrides."""
        return self.spec.limits

    @property
    @abstractmethod
    def backbone_name(self) -> str: ...

    @property
    @abstractmethod
    def transforms(self) -> list[str]: ...

    @property
    def runtime(self) -> str:
        return "torch"

    def max_batch_size(self, default: int) -> int:
        """Items per batch; ``default`` is ``EQUISERVE_MAX_BATCH_SIZE``."""
        return default

    def card(self) -> dict[str, Any]:
        """The model's entry in ``GET /v1/models``: the common fields, then ``card_extras``."""
        return {
            "name": self.name,
            "task": self.task,
            "backbone": self.backbone_name,
            "group": self.spec.group,
            "transforms": self.transforms,
            "methods": [m.value for m in self.spec.methods],
            "default_method": self.spec.default_method.value,
            "lambda_trained": self.lambda_trained,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "runtime": self.runtime,
            "description": self.spec.description,
            **self.card_extras(),
        }

    def card_extras(self) -> dict[str, Any]:
        return {}

    # -- serving ---------------------------------------------------------------------------
    def split(self, request: RequestT) -> Sequence[PieceT]:
        """Check what is cheap to check (against ``self.limits``) and return one piece per batch
        item; by default the request is one item."""
        return [request]  # type: ignore[list-item]

    def prepare(self, piece: PieceT) -> ItemT:
        """A piece -> a batch item (decode, preprocess, tokenize); may raise ``app.errors``'
        errors. By default the piece is the item."""
        return piece  # type: ignore[return-value]

    @abstractmethod
    def __call__(self, items: list[ItemT]) -> Sequence[ResultT | BaseException]:
        """ONE fused pass for a batch: all |G| copies of all items."""

    @abstractmethod
    def respond(self, request: RequestT, results: list[ResultT], timing: Timing) -> OutputT:
        """The answer to one request from its items' results."""

    @abstractmethod
    def warmup(self, batch_size: int) -> None:
        """Run a full-size batch so the first real request pays nothing."""

    def stream(self, item: ItemT, emit: Emit) -> None:
        """Have ``item`` report its progress through ``emit`` (tasks with ``streams``)."""
        raise InvalidInput(f"{self.name} does not stream")

    def cancel(self, item: ItemT) -> None:
        """The client went away while ``item`` is in a running batch: stop work on it if the
        task can (a generation stops decoding it); dropping it before the pass is the engine's."""

    def release_memory(self) -> None:
        """Hand back memory the runtime keeps for itself (called when the engine is idle)."""
