"""Export an image backbone to ONNX and serve it with onnxruntime behind the same contract.

The exported graph takes raw pixels ``[N, 3, S, S]`` in ``[0, 1]`` (normalisation is inside,
as in ``ImageBackbone.encode``) and returns ``(features [N, D], logits [N, K])``, with a
dynamic batch axis. Everything the server needs to rebuild the backbone (name, input size,
labels, mean/std) travels in the file's ``metadata_props``, so a ``.onnx`` file is a
self-contained model.

Group expansion, the λ-net and the combination stay in torch: ``EquivariantModel`` calls
``OnnxBackbone.encode`` once on the ``|G|*B`` expanded batch and ``OnnxBackbone.head`` on the
features, exactly as for a torch backbone.

Why two sessions (trunk and head) cut from the one file, instead of running the whole graph
in ``encode`` and caching its logits for ``head``: the engine calls ``encode`` then ``head``
(and may reshape, move or reuse the features in between, or call ``head`` on features it got
elsewhere), so a cache keyed on the features tensor's identity needs liveness and in-place
checks to avoid handing back stale logits for reused memory. Splitting the graph at the
``features`` output with ``onnx.utils.Extractor`` has no such state: ``encode`` runs the
pixels -> features subgraph, ``head`` runs the features -> logits subgraph, nothing is computed
twice, and both are thread-safe. The subgraphs are the exported nodes themselves, so
``head(encode(x))`` is bit for bit the full graph's logits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .base import ImageBackbone

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # what torch's dynamo exporter targets natively; onnxruntime>=1.14 runs it
INPUT_NAME, FEATURES_NAME, LOGITS_NAME = "pixels", "features", "logits"
META_KEY = "equiserve"  # one JSON blob in metadata_props


class _ExportModule(nn.Module):
    """pixels in [0, 1] -> (features, logits): the backbone's ``encode`` + its default head."""

    def __init__(self, backbone: ImageBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        # Resolved now, outside tracing: a zero-shot backbone builds its text embeddings here
        # (a text-tower pass that must not end up in the image graph), and they are then
        # exported as a constant.
        self.head = backbone.head_for(None)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone.encode(pixels)
        return features, self.head(features)


def export_onnx(
    backbone: ImageBackbone,
    path: str | Path,
    batch_size_dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    *,
    example_batch_size: int = 2,
) -> Path:
    """Write ``backbone`` (float32) as an ONNX file ``pixels -> (features, logits)``; returns the path.

    The batch axis is dynamic unless ``batch_size_dynamic`` is False, in which case it is fixed
    at ``example_batch_size``. The example batch is 2, not 1: ``torch.export`` specialises
    sizes 0 and 1, so a batch-1 example would pin the axis.
    """
    if backbone.dtype != torch.float32:
        raise ValueError(f"export a float32 backbone (got {backbone.dtype}); onnxruntime runs the graph as exported")
    if batch_size_dynamic and example_batch_size < 2:
        raise ValueError("a dynamic batch axis needs an example batch of at least 2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = backbone.training
    backbone.eval()
    try:
        module = _ExportModule(backbone).eval()
        size = backbone.input_size
        example = torch.rand(example_batch_size, 3, size, size, device=backbone.device)
        dynamic_shapes = {"pixels": {0: torch.export.Dim("batch", min=1)}} if batch_size_dynamic else None
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[FEATURES_NAME, LOGITS_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,  # no progress lines on stdout; the cache logs one line per export
        )
        labels = list(module.head.labels) if hasattr(module.head, "labels") else list(backbone.labels)
        meta = {
            "name": backbone.name,
            "family": backbone.family,
            "input_size": size,
            "feature_dim": backbone.feature_dim,
            "labels": labels,
            "mean": backbone.mean.flatten().tolist(),
            "std": backbone.std.flatten().tolist(),
        }
        program.model.metadata_props[META_KEY] = json.dumps(meta)
        program.save(str(path))
    finally:
        backbone.train(was_training)
    return path


def _split(model: Any) -> tuple[Any, Any]:
    """The file's graph cut at ``features``: (pixels -> features, features -> logits)."""
    import onnx.utils

    names = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    missing = {INPUT_NAME, FEATURES_NAME, LOGITS_NAME} - names
    if missing:
        raise ValueError(f"not an equiserve image export: graph lacks {sorted(missing)}")
    extractor = onnx.utils.Extractor(model)
    trunk = extractor.extract_model([INPUT_NAME], [FEATURES_NAME])
    head = extractor.extract_model([FEATURES_NAME], [LOGITS_NAME])
    # The head must be computable from the features alone: if logits depended on the pixels
    # by another path than the features output, the extracted head would have a dangling input.
    available = {FEATURES_NAME} | {t.name for t in head.graph.initializer}
    for node in head.graph.node:
        dangling = [name for name in node.input if name and name not in available]
        if dangling:
            raise ValueError(f"the logits depend on {dangling} besides the features; cannot split the graph")
        available.update(node.output)
    return trunk, head


def _static_width(model: Any, output_name: str) -> int:
    """The fixed last dimension of a ``[N, width]`` graph output (needed to allocate it)."""
    (output,) = (o for o in model.graph.output if o.name == output_name)
    dims = output.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise ValueError(f"output {output_name!r} is not [N, width] with a static width")
    return int(dims[1].dim_value)


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:0``, so that devices compare equal and ORT gets a device id."""
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


# What ``EQUISERVE_ONNX_PROVIDER`` may ask for; "auto": CUDA on a CUDA device, else the CPU.
PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
TENSORRT_MAX_ROWS = 2048  # the largest batch (|G| copies x images) a TensorRT profile covers


def select_providers(
    device: torch.device, provider: str = "auto", *, tensorrt_cache: Path | None = None, fp16: bool = False
) -> list[str | tuple[str, dict[str, Any]]]:
    """The execution providers to ask onnxruntime for, best first; always CPU as the fallback.

    On a CUDA device: ``cuda`` (and ``auto``) the CUDA provider of onnxruntime-gpu; ``tensorrt``
    TensorRT first (its engines cached in ``tensorrt_cache``, built once per shape profile;
    ``fp16`` lets it run half precision), then CUDA. A provider that is not installed is left
    out (the session then runs on what is, and ``OnnxBackbone`` says so)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"unknown onnxruntime provider {provider!r}; choose from {PROVIDERS}")
    available = set(ort.get_available_providers())
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    if device.type == "cuda" and provider != "cpu":
        device_id = device.index or 0
        if provider == "tensorrt" and "TensorrtExecutionProvider" in available:
            options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": fp16}
            if tensorrt_cache is not None:
                tensorrt_cache.mkdir(parents=True, exist_ok=True)
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(tensorrt_cache))
            chosen.append(("TensorrtExecutionProvider", options))
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    return [*chosen, "CPUExecutionProvider"]


def _tensorrt_profile(session_providers: list[Any], input_name: str, row_shape: Sequence[int]) -> list[Any]:
    """TensorRT needs the range of a dynamic batch axis up front (else it rebuilds its engine
    for every new batch size): 1 to ``TENSORRT_MAX_ROWS`` rows of ``row_shape``."""
    dims = "x".join(str(d) for d in row_shape)
    profiled = []
    for entry in session_providers:
        if isinstance(entry, tuple) and entry[0] == "TensorrtExecutionProvider":
            options = dict(entry[1])
            options.update(
                trt_profile_min_shapes=f"{input_name}:1x{dims}",
                trt_profile_opt_shapes=f"{input_name}:{TENSORRT_MAX_ROWS // 8}x{dims}",
                trt_profile_max_shapes=f"{input_name}:{TENSORRT_MAX_ROWS}x{dims}",
            )
            entry = (entry[0], options)
        profiled.append(entry)
    return profiled


class OnnxBackbone(ImageBackbone):
    """An ONNX file written by :func:`export_onnx`, run by onnxruntime, as an ``ImageBackbone``.

    The graph runs in the precision it was written in (``precision``: float32 as exported, or
    int8 from ``onnx_quant``; inputs and outputs are float32 either way); normalisation is
    inside it, so ``encode`` feeds raw pixels. Its head is the exported one: fixed labels, no
    zero-shot. ``provider``: see ``select_providers`` (CUDA/TensorRT on a CUDA device).
    """

    family = "onnx"

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        session_options: Any | None = None,
        provider: str = "auto",
        tensorrt_cache: Path | None = None,
        fp16: bool = False,
    ) -> None:
        import onnx

        path = Path(path)
        model = onnx.load(str(path))
        props = {p.key: p.value for p in model.metadata_props}
        if META_KEY not in props:
            raise ValueError(f"{path} has no {META_KEY!r} metadata; export it with export_onnx()")
        meta = json.loads(props[META_KEY])
        super().__init__(
            name=meta["name"],
            input_size=int(meta["input_size"]),
            feature_dim=int(meta["feature_dim"]),
            labels=meta["labels"],
            mean=meta["mean"],
            std=meta["std"],
        )
        self.path = path
        self.source_family = meta.get("family", "unknown")
        self.precision = str(meta.get("precision", "float32"))
        trunk, head = _split(model)
        del model
        self.num_classes = _static_width(head, LOGITS_NAME)
        if _static_width(trunk, FEATURES_NAME) != self.feature_dim or self.num_classes != len(self.labels):
            raise ValueError(f"{path}: graph output widths disagree with its metadata")
        self.session_options = session_options
        self.provider, self.tensorrt_cache, self.fp16 = provider, tensorrt_cache, fp16
        self.providers: list[str] = []
        self._requested: torch.device | None = None
        self._build_sessions(torch.device(device), trunk, head)

    # -- sessions ---------------------------------------------------------------------------------
    def _build_sessions(self, device: torch.device, trunk: Any = None, head: Any = None) -> None:
        """(Re)create both sessions for ``device``.

        The split graphs are not kept between builds (they are as large as the weights, and
        onnxruntime holds its own copy): a device change re-reads the file, once, at startup.
        """
        import onnx
        import onnxruntime as ort

        device = _with_index(device)
        if trunk is None or head is None:
            trunk, head = _split(onnx.load(str(self.path)))
        requested = select_providers(device, self.provider, tensorrt_cache=self.tensorrt_cache, fp16=self.fp16)
        options = self.session_options
        size = self.input_size
        self._trunk = ort.InferenceSession(
            trunk.SerializeToString(),
            sess_options=options,
            providers=_tensorrt_profile(requested, INPUT_NAME, (3, size, size)),
        )
        self._head = ort.InferenceSession(
            head.SerializeToString(),
            sess_options=options,
            providers=_tensorrt_profile(requested, FEATURES_NAME, (self.feature_dim,)),
        )
        self._requested = device
        self.providers = self._trunk.get_providers()
        on_cuda = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        if device.type == "cuda" and not on_cuda:
            log.warning("%s: onnxruntime has no CUDA provider here; running on CPU", self.name)
        # The device property follows the mean buffer: it is where inputs go and outputs come back.
        nn.Module.to(self, device=device if on_cuda else torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # no torch parameters; the graph is float32 as exported

    def _run(self, session: Any, input_name: str, x: Tensor, output_name: str, width: int) -> Tensor:
        """One session call with torch tensors bound in place (no numpy copies, CPU or CUDA)."""
        x = x.to(device=self.device, dtype=torch.float32).contiguous()
        out = torch.empty(x.shape[0], width, device=self.device, dtype=torch.float32)
        device_type, device_id = self.device.type, self.device.index or 0
        if device_type == "cuda":
            # onnxruntime runs on its own stream: let torch finish writing the input first.
            torch.cuda.current_stream(self.device).synchronize()
        binding = session.io_binding()
        binding.bind_input(input_name, device_type, device_id, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(output_name, device_type, device_id, np.float32, list(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)  # synchronous: outputs are ready when it returns
        return out

    def release_memory(self) -> None:
        """Shrink onnxruntime's CPU arena. It keeps every buffer it ever grew for a batch shape
        (several times the model's own memory after large batches), and only releases free
        ones at the end of a run that asks for it: one 1-image run does. The next large batch
        grows it again, once."""
        if self.device.type != "cpu":
            return
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        pixels = np.zeros((1, 3, self.input_size, self.input_size), dtype=np.float32)
        self._trunk.run(None, {INPUT_NAME: pixels}, run_options=options)

    # -- the ImageBackbone contract ---------------------------------------------------------------
    def encode(self, pixels: Tensor) -> Tensor:
        """Raw pixels ``[N, 3, S, S]`` in ``[0, 1]`` -> features ``[N, D]`` (the graph normalises)."""
        return self._run(self._trunk, INPUT_NAME, pixels, FEATURES_NAME, self.feature_dim)

    def _encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError("OnnxBackbone normalises inside the graph: call encode(pixels)")

    def head(self, features: Tensor) -> Tensor:
        return self._run(self._head, FEATURES_NAME, features, LOGITS_NAME, self.num_classes)

    def to_runtime(
        self, device: str | torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False
    ) -> OnnxBackbone:
        """Rebuild the sessions for ``device``; other dtypes need a re-export, so they are ignored."""
        if dtype != torch.float32:
            log.warning("%s: ONNX graphs run in float32 as exported; ignoring dtype %s", self.name, dtype)
        del channels_last  # layout is onnxruntime's business
        self.eval()
        device = _with_index(torch.device(device))
        if device != self._requested:  # the usual case, construct on cpu then move, re-reads once
            self._build_sessions(device)
        return self

    @classmethod
    def export(
        cls, backbone: ImageBackbone, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any
    ) -> OnnxBackbone:
        """Export ``backbone`` to ``path`` and load it back."""
        return cls(export_onnx(backbone, path, **kwargs), device=device)
