"""A served image classifier: one fused forward pass for a batch of images that may ask for
different things.

The batch's images go to the device once, through ``group.expand`` and ONE backbone call;
then, per label set (zero-shot models) the head runs on the shared features, and per
method the copies are combined. Everything leaves the device in one transfer per tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from app.backbones.base import ImageBackbone, LinearHeadBackbone
from app.backbones.compiled import BucketedEncoder
from app.backbones.factory import create_backbone
from app.backbones.factory import weights_are_local as backbone_is_local
from app.backbones.images import (
    apply_orientation,
    decode_image,
    decode_jpegs_on_device,
    draft_scale,
    exif_orientation,
    is_plain_jpeg,
    open_image,
)
from app.backbones.onnx_cache import can_export, onnx_backbone
from app.backbones.onnx_quant import Calibration
from app.backbones.onnx_runtime import OnnxBackbone
from app.backbones.preprocess import crop_box, crop_uint8, pixels_from_uint8, resize_center_crop, resize_on_device
from app.config import Settings, default_cache_dir
from app.equivariance import EquivariantModel, Method, combine, image_group, lambda_entropy, per_group
from app.errors import InvalidInput, TooLarge
from app.repository import (
    ModelLoadError,
    file_in,
    load_lambda_net,
    load_tensors,
    path_in,
    resolve_device,
    resolve_dtype,
    resolve_file_options,
)
from app.runtime.batch_sizing import BatchSizeCache, BatchSizeChoice, fastest_batch_size
from app.runtime.memory import release_free_memory
from app.runtime.pixel_budget import PixelBudget, Reservation
from app.tasks.base import LoadOptions, ServedModel, Timing

from .messages import (
    ClassifyOutput,
    ClassifyRequest,
    EncodedImage,
    ImageResult,
    Pixels,
    Prediction,
    TransformDiagnostics,
)
from .request_pixels import AnyImage, RequestPixels
from .spec import ClassifySpec

log = logging.getLogger("equiserve.classify")

DEFAULT_TOP_K = 5  # capped at the number of labels
FILE_OPTIONS = ("weights_path", "checkpoint", "path")  # backbone options naming files in the entry's folder
INPUT_PIPELINES = ("host", "device", "device-decode")
_NO_PIXELS = torch.empty(0, dtype=torch.uint8)  # an item whose file the device decodes
# The device pipelines resize a crop of more than this many times the model's input pixels on
# the host instead of holding it as uint8 until its batch: for such a crop, holding it costs far
# more memory than resizing it costs time next to its decode, and the pixels are the ones the
# device would make (bit for bit on the CPU, to float rounding on CUDA).
HOST_RESIZE_ABOVE = 16


@dataclass(frozen=True)
class ImagePiece:
    """One image of a request, not yet decoded, with what its request asked for."""

    image: EncodedImage | np.ndarray | Pixels
    method: Method
    top_k: int
    labels: tuple[str, ...] | None
    max_pixels: int
    probabilities: bool = False
    # the request's images, measured together when its first piece is prepared; None: this one alone
    request: RequestPixels | None = dataclasses.field(default=None, compare=False, repr=False)
    index: int = 0  # this piece's image in ``request``


@dataclass(frozen=True)
class ImageItem:
    """One image of a classify request, preprocessed, with what its request asked for.

    ``pixels`` is what the host made of it: float ``[3, S, S]`` in ``[0, 1]`` (input pipeline
    ``host``), or the centred crop as ``uint8 [3, h, w]``, resized on the device in the batch
    (``device``). With ``jpeg`` set (``device-decode``), the file itself is decoded on the device
    and ``pixels`` is empty."""

    pixels: Tensor
    method: Method
    top_k: int
    labels: tuple[str, ...] | None = None  # zero-shot label set; None = the model's own
    probabilities: bool = False  # the result carries every label's probability
    jpeg: bytes | None = None
    orientation: int = 1  # the JPEG's EXIF orientation, applied after decoding it
    max_pixels: int = 0  # the host decodes ``jpeg`` again under this limit if the device cannot
    # the decoded pixels this item holds against the server's budget, until its batch has them
    reservation: Reservation | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SpeedOptions:
    """The loader's speed settings (``Settings``' ``# speed`` block), read from ``LoadOptions``
    by name with these defaults, so that any options object carrying them is honoured."""

    precision: str = "auto"
    onnx_provider: str = "auto"
    onnx_spin: bool = False
    tune_batch_size: bool = True
    input_pipeline: str = "auto"
    compile_mode: str = "none"

    @classmethod
    def of(cls, options: LoadOptions) -> SpeedOptions:
        return cls(**{f.name: getattr(options, f.name, f.default) for f in fields(cls)})


class ClassifyModel(ServedModel[ClassifyRequest, ImagePiece, ImageItem, ImageResult, ClassifyOutput]):
    """An image backbone on its device, wrapped with its group and λ-net."""

    task = "classify"
    spec_type = ClassifySpec
    prepare_in_pool = True  # decoding and resizing an image is real work
    spec: ClassifySpec

    def __init__(
        self,
        spec: ClassifySpec,
        backbone: ImageBackbone,
        model: EquivariantModel,
        *,
        input_pipeline: str = "host",
        tune_batch_size: bool = False,
        decoded_pixels: PixelBudget | None = None,
        batch_size_cache: BatchSizeCache | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(spec, **kw)
        self.backbone = backbone
        # shared by the engine's image models; a model made on its own has a budget of its own
        self.decoded_pixels = decoded_pixels or PixelBudget(Settings.model_fields["max_decoded_pixels"].default)
        self.model = model
        self.tune_batch_size = tune_batch_size
        # the batch cap: model.yaml's max_batch_size, else what warmup found cheapest per image here
        self.batch_limit: int | None = spec.max_batch_size
        self.batch_choice: BatchSizeChoice | None = None  # the tuner's decision and its evidence
        self.batch_size_cache = batch_size_cache
        self._pin = self.device.type == "cuda"
        if input_pipeline not in INPUT_PIPELINES:
            raise ValueError(f"unknown input pipeline {input_pipeline!r}; choose from {INPUT_PIPELINES}")
        self.input_pipeline = input_pipeline

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, spec: ClassifySpec, options: LoadOptions) -> ClassifyModel:
        """``options.runtime``: what runs the backbone. ``onnxruntime`` exports it (once, cached
        in ``onnx_cache_dir``) and runs it with onnxruntime on the CPU, several times faster
        there than eager torch; ``auto`` does that on the CPU for fixed-label backbones and
        keeps torch elsewhere (CUDA, zero-shot CLIP)."""
        name = spec.name
        backbone_options = resolve_file_options(folder, spec.backbone.options, FILE_OPTIONS)
        try:
            backbone = create_backbone(spec.backbone.family, **backbone_options)
        except (FileNotFoundError, OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{name}: cannot build the {spec.backbone.family} backbone: {exc}") from exc

        labels = _labels(folder, spec.labels)
        if spec.head is not None:
            if not isinstance(backbone, LinearHeadBackbone):
                raise ModelLoadError(f"{name}: a head file needs a CNN backbone, not {spec.backbone.family}")
            try:
                backbone.replace_head(labels or [], load_tensors(file_in(folder, spec.head)))
            except RuntimeError as exc:
                raise ModelLoadError(f"{name}: head {spec.head} does not fit: {exc}") from exc
        elif labels is not None:
            backbone.labels = labels

        device = resolve_device(options.device)
        speed = SpeedOptions.of(options)
        lambda_net = load_lambda_net(folder, spec, backbone.feature_dim, device)
        dtype = resolve_dtype(options.dtype, device)
        precision = _precision(speed.precision, spec.precision)
        served: ImageBackbone = backbone
        if _wants_onnxruntime(options.runtime, backbone, device):
            backbone.to_runtime("cpu", torch.float32, channels_last=options.channels_last)  # exported from here
            try:
                served = onnx_backbone(
                    backbone,
                    options.onnx_cache_dir,
                    options.threads,
                    precision=precision if device.type == "cpu" else "float32",
                    calibration=Calibration(_calibration_source(folder, spec.calibration), group=spec.group)
                    if precision == "int8"
                    else None,
                    device=device,
                    provider=speed.onnx_provider,
                    spin=speed.onnx_spin,
                    fp16=dtype in (torch.float16, torch.bfloat16),
                )
            except Exception as exc:  # the exporter fails in many ways; torch still serves the model
                if options.runtime == "onnxruntime":
                    raise ModelLoadError(f"{name}: cannot run the backbone with onnxruntime: {exc}") from exc
                log.warning("%s: ONNX export failed (%s: %s); serving with torch", name, type(exc).__name__, exc)
        if served is backbone:
            backbone.to_runtime(device, dtype, channels_last=options.channels_last)
        effective = served.precision if isinstance(served, OnnxBackbone) else "float32"
        if precision == "int8" and effective != "int8":
            log.warning("%s: int8 needs onnxruntime on the CPU and a fixed-label backbone; serving %s on %s",
                        name, str(served.dtype).removeprefix("torch."), device.type)  # fmt: skip
        encode: Any = served.encode
        if speed.compile_mode != "none":
            if isinstance(served, OnnxBackbone):
                log.warning("%s: compile mode %s is for torch backbones; onnxruntime runs as it is",
                            name, speed.compile_mode)  # fmt: skip
            elif speed.compile_mode == "cudagraphs" and device.type != "cuda":
                log.warning("%s: CUDA graphs need a CUDA device; running eagerly on %s", name, device.type)
            else:
                encode = BucketedEncoder(served.encode, speed.compile_mode)
        model = EquivariantModel(
            encode, served.head, image_group(spec.group), lambda_net=lambda_net, zero_loss=spec.zero_loss
        ).eval()
        return cls(
            spec,
            served,
            model,
            lambda_trained=not lambda_net.is_constant,
            device=device,
            dtype=served.dtype,
            input_pipeline=_input_pipeline(speed.input_pipeline, device),
            tune_batch_size=speed.tune_batch_size,
            decoded_pixels=getattr(options, "decoded_pixels", None),
            batch_size_cache=BatchSizeCache((options.onnx_cache_dir or default_cache_dir()) / "batch-sizes.json"),
        )

    @classmethod
    def weights_are_local(cls, spec: ClassifySpec) -> bool:
        return backbone_is_local(spec.backbone.family, **spec.backbone.options)

    # -- what GET /v1/models shows --------------------------------------------------------------
    @property
    def backbone_name(self) -> str:
        return self.backbone.name

    @property
    def transforms(self) -> list[str]:
        return self.model.group.names

    @property
    def zero_shot(self) -> bool:
        return self.backbone.zero_shot

    @property
    def runtime(self) -> str:
        return "onnxruntime" if isinstance(self.backbone, OnnxBackbone) else "torch"

    def card_extras(self) -> dict[str, Any]:
        return {
            "num_labels": None if self.zero_shot else len(self.backbone.labels),
            "zero_shot": self.zero_shot,
            "input_size": self.backbone.input_size,
        }

    # -- a request ------------------------------------------------------------------------------
    def split(self, request: ClassifyRequest) -> list[ImagePiece]:
        """Everything about a request that depends on its model, checked before decoding."""
        limits = self.limits
        n_images = len(request.images)
        if n_images < 1:
            raise InvalidInput("send at least one image")
        if n_images > limits.max_images:
            raise TooLarge(
                f"{n_images} images in one request; the limit is {limits.max_images} (EQUISERVE_CLASSIFY_MAX_IMAGES)"
            )
        method = self.spec.resolve_method(request.method)
        labels = self._label_set(request.labels)
        num_labels = len(labels) if labels is not None else len(self.backbone.labels)
        top_k = min(DEFAULT_TOP_K, num_labels) if request.top_k is None else request.top_k
        if not 1 <= top_k <= num_labels:
            raise InvalidInput(f"top_k must be between 1 and {num_labels}")
        return self.image_pieces(request.images, method, top_k, labels, request.probabilities)

    def image_pieces(
        self,
        images: Sequence[AnyImage],
        method: Method,
        top_k: int,
        labels: tuple[str, ...] | None,
        probabilities: bool = False,
    ) -> list[ImagePiece]:
        """One piece per image, all measured together (``RequestPixels``) when the first is prepared."""
        max_pixels = self.limits.max_pixels
        for image in images:
            if isinstance(image, Pixels):
                self._check_pixels_shape(image.array, max_pixels)
        measured = self.request_pixels(images)
        return [
            ImagePiece(image, method, top_k, labels, max_pixels, probabilities, measured, index)
            for index, image in enumerate(images)
        ]

    def request_pixels(self, images: Sequence[AnyImage], max_pixels: int | None = None) -> RequestPixels:
        limits = self.limits
        return RequestPixels(
            images,
            max_pixels=limits.max_pixels if max_pixels is None else max_pixels,
            max_request_pixels=limits.max_request_pixels,
            limit_name=f"EQUISERVE_{self.task.upper()}_MAX_REQUEST_PIXELS",
            budget=self.decoded_pixels,
            host_pixels=self.host_pixels,
        )

    def host_pixels(self, header: Image.Image) -> int:
        """The pixels decoding this image holds on the host, from its header: none for a JPEG
        the device decodes, a plain JPEG's at the DCT scale it is decoded at, the rest in full."""
        width, height = header.size
        if not is_plain_jpeg(header):
            return width * height
        if self.input_pipeline == "device-decode":
            return 0  # the host keeps only the file
        scale = draft_scale(width, height, self.backbone.input_size)
        return math.ceil(width / scale) * math.ceil(height / scale)

    @staticmethod
    def _check_pixels_shape(array: np.ndarray, max_pixels: int) -> None:
        if array.dtype != np.float32 or array.ndim != 3 or array.shape[0] != 3 or 0 in array.shape:
            raise InvalidInput(f"pixels must be float32 [3, H, W], not {array.dtype} {list(array.shape)}")
        height, width = array.shape[1:]
        if height * width > max_pixels:
            raise TooLarge(f"pixels are {width}x{height} = {width * height} pixels; the limit is {max_pixels}")

    def _label_set(self, labels: Sequence[str] | None) -> tuple[str, ...] | None:
        limits = self.limits
        if labels is None:
            if self.zero_shot and not self.backbone.labels:
                raise InvalidInput(f"{self.name} is zero-shot: send 'labels'")
            return None
        if not self.zero_shot:
            raise InvalidInput(f"{self.name} has a fixed label set; 'labels' is only for zero-shot models")
        if len(labels) > limits.max_labels:
            raise TooLarge(f"{len(labels)} labels; the limit is {limits.max_labels} (EQUISERVE_CLASSIFY_MAX_LABELS)")
        cleaned = tuple(label.strip() for label in labels)
        if not cleaned or any(not label for label in cleaned):
            raise InvalidInput("labels must be non-empty strings")
        if any(len(label) > limits.max_label_chars for label in cleaned):
            raise InvalidInput(f"a label is longer than {limits.max_label_chars} characters")
        if len(set(cleaned)) != len(cleaned):
            raise InvalidInput("labels must be distinct")
        return cleaned

    def prepare(self, piece: ImagePiece) -> ImageItem:
        """Decode (JPEGs at a reduced DCT scale where the input size allows) and preprocess, as
        far as the input pipeline does it on the host (see ``ImageItem``), once the request's
        pixels are reserved; the item keeps the reservation of what it holds."""
        measured = piece.request or self.request_pixels([piece.image], piece.max_pixels)
        reservation = measured.take(piece.index if piece.request is not None else 0)
        try:
            item = self._prepare(piece)
        except BaseException:
            reservation.release()
            raise
        reservation.shrink(item.pixels.numel() // 3)
        return dataclasses.replace(item, reservation=reservation)

    def _prepare(self, piece: ImagePiece) -> ImageItem:
        image = piece.image
        asked = (piece.method, piece.top_k, piece.labels, piece.probabilities)
        if isinstance(image, Pixels):
            return ImageItem(self.preprocess_pixels(image.array), *asked)
        if isinstance(image, EncodedImage):
            if self.input_pipeline == "device-decode":
                opened = open_image(image.data, max_pixels=piece.max_pixels, content_type=image.content_type)
                if is_plain_jpeg(opened):  # the rest (PNG, CMYK JPEGs, ...) is decoded here
                    orientation = exif_orientation(opened)
                    return ImageItem(_NO_PIXELS, *asked, jpeg=image.data, orientation=orientation,
                                     max_pixels=piece.max_pixels)  # fmt: skip
            image = decode_image(
                image.data,
                max_pixels=piece.max_pixels,
                min_side=self.backbone.input_size,
                content_type=image.content_type,
            )
        if self.input_pipeline == "host" or self._resize_on_host(image):
            return ImageItem(self.preprocess(image), *asked)
        return ImageItem(crop_uint8(image), *asked)

    def _resize_on_host(self, image: np.ndarray) -> bool:
        _, _, crop_h, crop_w = crop_box(*image.shape[:2])
        return crop_h * crop_w > HOST_RESIZE_ABOVE * self.backbone.input_size**2

    def preprocess(self, image: np.ndarray) -> Tensor:
        """``uint8 [H, W, 3]`` -> ``[3, S, S]`` float."""
        return pixels_from_uint8(image, self.backbone.input_size)

    def preprocess_pixels(self, pixels: np.ndarray) -> Tensor:
        """``float32 [3, H, W]`` in ``[0, 1]`` -> ``[3, S, S]``: the crop and resize of ``preprocess``."""
        # NaN fails both comparisons: one pass refuses non-finite values and values out of range.
        if not ((pixels >= 0) & (pixels <= 1)).all():
            raise InvalidInput("pixels must be finite and in [0, 1] (RGB / 255, not normalised)")
        tensor = torch.from_numpy(np.array(pixels, dtype=np.float32, copy=True))
        return resize_center_crop(tensor, self.backbone.input_size).contiguous()

    def respond(self, request: ClassifyRequest, results: list[ImageResult], timing: Timing) -> ClassifyOutput:
        method = self.spec.resolve_method(request.method)
        return ClassifyOutput(self.name, method, self.spec.group, results, timing)

    # -- the fused pass --------------------------------------------------------------------------
    def labels_for(self, labels: tuple[str, ...] | None) -> list[str]:
        return list(labels) if labels is not None else self.backbone.labels

    def batch_pixels(self, items: list[ImageItem]) -> tuple[Tensor, dict[int, BaseException]]:
        """The batch's pixels ``[B', 3, S, S]`` float on the device, in item order, and the
        items that could not be decoded (left out of the tensor)."""
        size = self.backbone.input_size
        if all(item.jpeg is None and item.pixels.is_floating_point() for item in items):  # host pipeline
            pixels = torch.stack([item.pixels for item in items])
            if self._pin:
                pixels = pixels.pin_memory()
            return pixels.to(self.device, non_blocking=True), {}
        failed: dict[int, BaseException] = {}
        crops: dict[int, Tensor] = {}
        jpegs = [i for i, item in enumerate(items) if item.jpeg is not None]
        decoded = decode_jpegs_on_device([items[i].jpeg or b"" for i in jpegs], self.device) if jpegs else []
        for i, image in zip(jpegs, decoded, strict=True):
            item = items[i]
            if image is None:  # the device decoder refused it: the host decodes it (or says why not)
                try:
                    image = crop_uint8(decode_image(item.jpeg or b"", max_pixels=item.max_pixels, min_side=size))
                except Exception as exc:
                    failed[i] = exc
                    continue
            crops[i] = apply_orientation(image, item.orientation, rows=1)
        for i, item in enumerate(items):
            if item.jpeg is None and not item.pixels.is_floating_point():
                crops[i] = item.pixels
        ok = [i for i in range(len(items)) if i not in failed]
        pixels = torch.empty(len(ok), 3, size, size, device=self.device)
        position = {i: row for row, i in enumerate(ok)}
        resized = [i for i in ok if i in crops]
        if resized:
            rows = torch.tensor([position[i] for i in resized], device=self.device)
            pixels[rows] = resize_on_device([crops[i] for i in resized], size, self.device, pin=self._pin)
        ready = [i for i in ok if i not in crops]  # float pixels (Pixels uploads)
        if ready:
            rows = torch.tensor([position[i] for i in ready], device=self.device)
            pixels[rows] = torch.stack([items[i].pixels for i in ready]).to(self.device)
        return pixels, failed

    @torch.inference_mode()
    def __call__(self, items: list[ImageItem]) -> list[ImageResult | BaseException]:
        try:
            pixels, failed = self.batch_pixels(items)
        finally:
            # The batch has its own pixels now (or could not make them): the items' reservations
            # end here, not when their requests are answered, which may be batches later.
            for item in items:
                if item.reservation is not None:
                    item.reservation.release()
        if not failed:
            return self._run(items, pixels)
        ok = [i for i in range(len(items)) if i not in failed]
        computed = iter(self._run([items[i] for i in ok], pixels) if ok else [])
        return [failed[i] if i in failed else next(computed) for i in range(len(items))]

    def _run(self, items: list[ImageItem], pixels: Tensor) -> list[ImageResult | BaseException]:
        """The fused pass over the batch's pixels ``[B, 3, S, S]`` on the device."""
        features, log_lambda = self.model.encode_copies(pixels)  # the one fused backbone call
        assert log_lambda is not None  # the loader always attaches a λ-net
        lambda_weights = torch.softmax(log_lambda.float(), dim=0)
        entropies = lambda_entropy(lambda_weights).cpu().tolist()

        names = self.model.group.names

        def label_set(labels: tuple[str, ...] | None, rows: list[int]) -> list[ImageResult | BaseException]:
            head = self.backbone.head_for(labels)
            label_names = self.labels_for(labels)
            index = torch.tensor(rows, device=features.device)
            aligned = self.model.heads(features.index_select(1, index), head).float()  # [n, b, K]
            copy_scores, copy_top = aligned.softmax(-1).max(-1)  # what each copy predicted
            copy_scores, copy_top = copy_scores.cpu().tolist(), copy_top.cpu().tolist()
            sub_log_lambda = log_lambda.index_select(1, index)

            def method_group(method: Method, cols: list[int]) -> list[ImageResult]:
                col_index = torch.tensor(cols, device=features.device)
                combined = combine(
                    aligned.index_select(1, col_index),
                    method,
                    log_lambda=sub_log_lambda.index_select(1, col_index),
                    zero_loss=self.model.zero_loss,
                )
                asked = [items[rows[j]] for j in cols]
                k = min(max(item.top_k for item in asked), len(label_names))
                probabilities = combined.output.softmax(-1)
                top_scores, top_index = probabilities.topk(k, dim=-1)
                top_scores, top_index = top_scores.cpu().tolist(), top_index.cpu().tolist()
                full = probabilities.cpu().numpy() if any(item.probabilities for item in asked) else None
                weights = combined.weights.cpu().T.tolist()  # [b, n]
                selected = combined.selected.cpu().tolist() if combined.selected is not None else None
                return [
                    ImageResult(
                        [
                            Prediction(label_names[idx], idx, score)
                            for idx, score in zip(top_index[c][: item.top_k], top_scores[c][: item.top_k], strict=True)
                        ],
                        [
                            TransformDiagnostics(
                                names[g], weights[c][g], label_names[copy_top[g][j]], copy_scores[g][j], copy_top[g][j]
                            )
                            for g in range(len(names))
                        ],
                        names[selected[c]] if selected is not None else None,
                        entropies[rows[j]],
                        full[c] if full is not None and item.probabilities else None,
                    )
                    for c, (j, item) in enumerate(zip(cols, asked, strict=True))
                ]

            return per_group([items[row].method for row in rows], method_group)

        # a row's exception is its label set's, or its method group's within the label set
        return per_group([item.labels for item in items], label_set)

    def warmup(self, batch_size: int) -> None:
        """A full-size batch with every method, so the first real request pays nothing. On the
        CPU (``tune_batch_size``) also the batch sizes up to ``batch_size``, timed, to cap
        batches at the one cheapest per image (``app.runtime.batch_sizing``)."""
        if isinstance(self.model.encoder, BucketedEncoder):  # every batch-size bucket, built now
            size = self.backbone.input_size
            example = torch.rand(1, 3, size, size, device=self.device)
            self.model.encoder.warm(batch_size * self.model.group.order, example)
        self._run_warmup_batch(batch_size)
        if self.tune_batch_size and self.device.type == "cpu" and batch_size > 1 and self.spec.max_batch_size is None:
            self.batch_choice = self._tuned_batch_size(batch_size)
            self.batch_limit = self.batch_choice.limit
        # The full-size batch grew the runtime's arena and the heap; a server that then idles
        # (or a replica that is never sent that much) should not keep it. The engine's idle
        # trim only runs after served batches, so warmup hands it back itself.
        self.release_memory()
        release_free_memory()

    def _tuned_batch_size(self, batch_size: int) -> BatchSizeChoice:
        """The tuner's cap: kept from an earlier start of this model on this machine, else measured."""
        facts = {
            "model": self.name, "backbone": self.backbone_name, "runtime": self.runtime, "dtype": str(self.dtype),
            "input_size": self.backbone.input_size, "copies": len(self.transforms), "limit": batch_size,
            "pipeline": self.input_pipeline, "threads": torch.get_num_threads(),
        }  # fmt: skip
        cache = self.batch_size_cache
        key = BatchSizeCache.key(facts)
        choice = cache.get(key) if cache is not None else None
        if cache is not None and choice is not None:
            log.info("%s: %s; kept from an earlier start (%s)", self.name, choice.summary(), cache.path)
            return choice
        choice = fastest_batch_size(self._run_warmup_batch, batch_size, copies=len(self.transforms))
        log.info("%s: %s; measured now", self.name, choice.summary())
        if cache is not None:
            cache.put(key, choice)
        return choice

    def _run_warmup_batch(self, batch_size: int) -> float:
        """One pass over ``batch_size`` random images, every method among them; its seconds."""
        size = self.backbone.input_size
        methods = list(self.spec.methods)
        labels = ("a cat", "a dog") if self.zero_shot and not self.backbone.labels else None

        def pixels() -> Tensor:  # what the input pipeline hands the batch: float, or a uint8 crop to resize
            if self.input_pipeline == "host":
                return torch.rand(3, size, size)
            return torch.randint(0, 256, (3, size + 1, size * 2 + 1), dtype=torch.uint8)

        items = [ImageItem(pixels(), methods[i % len(methods)], 1, labels) for i in range(batch_size)]
        started = time.perf_counter()
        for result in self(items):
            if isinstance(result, BaseException):
                raise result
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def max_batch_size(self, default: int) -> int:
        return default if self.batch_limit is None else min(default, self.batch_limit)

    def release_memory(self) -> None:
        self.backbone.release_memory()


def _labels(folder: Path, labels: list[str] | str | None) -> list[str] | None:
    if labels is None or isinstance(labels, list):
        return labels
    return [line.strip() for line in file_in(folder, labels).read_text().splitlines() if line.strip()]


def _wants_onnxruntime(runtime: str, backbone: ImageBackbone, device: torch.device) -> bool:
    if runtime == "torch":
        return False
    if runtime == "auto":  # on CUDA torch is the default; onnxruntime's CUDA/TensorRT providers are asked for
        return device.type == "cpu" and can_export(backbone)
    if not can_export(backbone):
        raise ModelLoadError(
            f"{backbone.name}: runtime onnxruntime needs a fixed-label backbone "
            f"(device {device.type}, zero-shot {backbone.zero_shot})"
        )
    return True


def _precision(setting: str, model_precision: str | None) -> str:
    """An explicit ``EQUISERVE_PRECISION`` wins; ``auto`` takes the model's own, else float32."""
    return setting if setting != "auto" else model_precision or "float32"


def _calibration_source(folder: Path, calibration: str) -> str:
    """A named calibration set as it is; anything else is a folder inside the model's folder."""
    if calibration in ("photos", "fashion-mnist"):
        return calibration
    path = path_in(folder, calibration)
    if path is None or not path.is_dir():
        raise ModelLoadError(f"{folder.name}: calibration {calibration!r} is not a folder inside the model folder")
    return str(path)


def _input_pipeline(setting: str, device: torch.device) -> str:
    """``auto``: decode on a CUDA device (nvJPEG), everything on the host otherwise."""
    if setting != "auto":
        return setting
    return "device-decode" if device.type == "cuda" else "host"
