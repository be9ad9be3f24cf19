"""The input pipeline's fast paths give today's pixels: simplejpeg decodes as PIL's draft mode
does (bit for bit, every EXIF orientation), the device resize equals the host resize on the CPU
(bit for bit), the ``device`` and ``device-decode`` pipelines answer as ``host`` does, and the
batch-size buckets of ``BucketedEncoder`` never change the real rows."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.backbones import images as decode
from app.backbones.compiled import BucketedEncoder, bucket_rows, pad_rows
from app.backbones.preprocess import crop_uint8, pixels_from_uint8, resize_on_device
from app.equivariance import Method
from app.errors import UndecodableImage
from app.tasks import load_model
from app.tasks.base import LoadOptions
from app.tasks.classify.messages import EncodedImage
from app.tasks.classify.model import ClassifyModel, ImagePiece
from tests.imagetools import jpeg_bytes, photo, png_bytes, write_tiny_model

MAX_PIXELS = 50_000_000


def pil_decode(data: bytes, min_side: int, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """What decode_image returns without simplejpeg (PIL, draft mode)."""
    with monkeypatch.context() as patch:
        patch.setattr(decode, "simplejpeg", None)
        return decode.decode_image(data, max_pixels=MAX_PIXELS, min_side=min_side)


def jpeg_with(array: np.ndarray, *, orientation: int = 1, progressive: bool = False, quality: int = 90) -> bytes:
    image = Image.fromarray(array)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, progressive=progressive, exif=exif.tobytes())
    return buffer.getvalue()


def test_simplejpeg_is_installed_and_used() -> None:
    assert decode.simplejpeg is not None  # a dependency (pyproject): the fast path is what is served


@pytest.mark.parametrize("min_side", [0, 32, 100, 224, 300])
@pytest.mark.parametrize("progressive", [False, True])
def test_simplejpeg_decodes_as_pil_draft_mode(
    min_side: int, progressive: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("astronaut", "chelsea", "coffee"):
        data = jpeg_with(photo(name), progressive=progressive)
        fast = decode.decode_image(data, max_pixels=MAX_PIXELS, min_side=min_side)
        slow = pil_decode(data, min_side, monkeypatch)
        assert fast.dtype == np.uint8 and fast.shape == slow.shape
        np.testing.assert_array_equal(fast, slow)


def test_simplejpeg_decodes_grayscale_and_odd_sizes_as_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    gray = np.asarray(Image.fromarray(photo("coffee")).convert("L"))
    for array in (gray, photo("astronaut")[:333, :517], photo("chelsea")[:17, :29]):
        data = jpeg_with(np.ascontiguousarray(array))
        for min_side in (0, 16, 64):
            fast = decode.decode_image(data, max_pixels=MAX_PIXELS, min_side=min_side)
            np.testing.assert_array_equal(fast, pil_decode(data, min_side, monkeypatch))
            assert fast.ndim == 3 and fast.shape[2] == 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_as_pil(orientation: int, monkeypatch: pytest.MonkeyPatch) -> None:
    array = np.ascontiguousarray(photo("astronaut")[:300, :400])  # not square: a transpose shows
    data = jpeg_with(array, orientation=orientation)
    fast = decode.decode_image(data, max_pixels=MAX_PIXELS, min_side=100)
    np.testing.assert_array_equal(fast, pil_decode(data, 100, monkeypatch))


def test_draft_scale_is_pils_choice() -> None:
    for width, height in [(512, 512), (1000, 700), (224, 224), (447, 448), (1792, 2000), (60, 4000)]:
        for min_side in (0, 32, 100, 224):
            image = Image.new("RGB", (width, height))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            opened = Image.open(io.BytesIO(buffer.getvalue()))
            if min_side:
                opened.draft("RGB", (min_side, min_side))
            scale = decode.draft_scale(width, height, min_side)
            assert opened.size == (-(-width // scale), -(-height // scale)), (width, height, min_side, scale)


def test_corrupt_jpegs_still_get_pils_error() -> None:
    data = jpeg_bytes(photo("chelsea"))
    with pytest.raises(UndecodableImage):
        decode.decode_image(data[: len(data) // 3], max_pixels=MAX_PIXELS, min_side=32)


def test_resize_on_device_equals_the_host_path_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    images = [np.ascontiguousarray(photo("astronaut")[:300, :451]), photo("chelsea"), photo("coffee")]
    images += [rng.integers(0, 256, (37, 23, 3), dtype=np.uint8), rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)]
    for size in (16, 32, 224):
        host = torch.stack([pixels_from_uint8(image, size) for image in images])
        device = resize_on_device([crop_uint8(image) for image in images], size, torch.device("cpu"))
        assert device.dtype == host.dtype == torch.float32 and device.shape == host.shape
        assert torch.equal(device, host)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline-models")
    write_tiny_model(root, "tiny")
    return root


def served(models_dir: Path, pipeline: str) -> ClassifyModel:
    model = load_model(models_dir, "tiny", options=LoadOptions(device="cpu", input_pipeline=pipeline))
    assert isinstance(model, ClassifyModel) and model.input_pipeline == pipeline
    return model


def pieces(files: list[bytes]) -> list[ImagePiece]:
    return [ImagePiece(EncodedImage(f), Method.LAMBDA, 3, None, MAX_PIXELS, True) for f in files]


def test_device_pipelines_answer_as_the_host_pipeline(tiny_dir: Path) -> None:
    # small images: the host's draft-mode decode is a full-size decode, as the device's is
    rng = np.random.default_rng(3)
    source = photo("astronaut")
    arrays = [np.ascontiguousarray(source[t : t + 50, left : left + 41]) for t, left in rng.integers(0, 400, (4, 2))]
    files = [jpeg_with(arrays[0]), jpeg_with(arrays[1], orientation=6), png_bytes(arrays[2]), jpeg_bytes(arrays[3])]
    models = {p: served(tiny_dir, p) for p in ("host", "device", "device-decode")}
    answers = {}
    for name, model in models.items():
        items = [model.prepare(piece) for piece in pieces(files)]
        if name == "device-decode":  # JPEGs go as files; the PNG is decoded and cropped on the host
            assert [item.jpeg is not None for item in items] == [True, True, False, True]
        if name == "device":
            assert all(item.pixels.dtype == torch.uint8 for item in items)
        answers[name] = model(items)
    for name in ("device", "device-decode"):
        for a, b in zip(answers["host"], answers[name], strict=True):
            assert not isinstance(a, BaseException) and not isinstance(b, BaseException)
            assert a.probabilities is not None and b.probabilities is not None
            np.testing.assert_array_equal(a.probabilities, b.probabilities, err_msg=name)  # same pixels, same floats


def test_device_decode_failures_stay_with_their_item(tiny_dir: Path) -> None:
    model = served(tiny_dir, "device-decode")
    good = jpeg_bytes(photo("chelsea")[:60, :60])
    broken = good[: len(good) // 2]  # the header reads; the decoders refuse the data
    items = [model.prepare(piece) for piece in pieces([good, broken, good])]
    results = model(items)
    assert isinstance(results[1], UndecodableImage)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    np.testing.assert_array_equal(results[0].probabilities, results[2].probabilities)


def test_buckets_are_powers_of_two_and_padding_repeats_the_last_row() -> None:
    assert [bucket_rows(n) for n in (1, 2, 3, 4, 5, 31, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 64]
    x = torch.arange(6.0).reshape(3, 2)
    padded = pad_rows(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], x[2])
    assert pad_rows(x, 3) is x


def test_bucketed_encoder_keeps_the_real_rows() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    built: list[int] = []

    def stand_in(encode: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, pool: object) -> Callable:
        """A CUDA graph's stand-in on the CPU: the bucket's eager pass."""
        built.append(example.shape[0])
        return encode

    encoder = BucketedEncoder(net, "cudagraphs", graph_factory=stand_in)
    encoder.warm(12, torch.rand(1, 3, 8, 8))
    assert built == [1, 2, 4, 8, 16] and encoder.buckets == [1, 2, 4, 8, 16]
    with torch.inference_mode():
        for rows in (1, 3, 5, 12):
            x = torch.rand(rows, 3, 8, 8)
            assert torch.allclose(encoder(x), net(x), atol=1e-6)
    assert built == [1, 2, 4, 8, 16]  # no bucket built twice
    compiled = BucketedEncoder(net, "compile", backend="eager")
    with torch.inference_mode():
        x = torch.rand(3, 3, 8, 8)
        assert torch.allclose(compiled(x), net(x), atol=1e-6)
    with pytest.raises(ValueError, match="compile mode"):
        BucketedEncoder(net, "fast")


def test_onnxruntime_providers_for_each_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from app.backbones.onnx_runtime import _tensorrt_profile, select_providers

    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    gpu_wheel = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu_wheel)
    assert select_providers(cpu, "cuda") == ["CPUExecutionProvider"]  # the CPU device: the CPU provider
    assert select_providers(cuda, "auto") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert select_providers(cuda, "cpu") == ["CPUExecutionProvider"]
    trt = select_providers(cuda, "tensorrt", fp16=True)
    assert [p[0] if isinstance(p, tuple) else p for p in trt] == gpu_wheel
    assert trt[0][1]["trt_fp16_enable"] is True  # type: ignore[index]
    profiled = _tensorrt_profile(trt, "pixels", (3, 224, 224))
    assert profiled[0][1]["trt_profile_min_shapes"] == "pixels:1x3x224x224"  # type: ignore[index]
    assert profiled[1:] == trt[1:]  # only TensorRT needs a shape profile
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # the CPU wheel
    assert select_providers(cuda, "tensorrt") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="provider"):
        select_providers(cuda, "rocm")


def test_explicit_onnxruntime_is_a_choice_on_cuda() -> None:
    from app.backbones.torchvision_cnn import TorchvisionClassifier
    from app.tasks.classify.model import _wants_onnxruntime

    backbone = TorchvisionClassifier("resnet18", num_classes=3, input_size=32)
    assert _wants_onnxruntime("onnxruntime", backbone, torch.device("cuda")) is True
    assert _wants_onnxruntime("auto", backbone, torch.device("cuda")) is False  # torch stays the default there
    assert _wants_onnxruntime("auto", backbone, torch.device("cpu")) is True


def test_warmup_hands_its_memory_back(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.tasks.classify import model as classify_model

    model = served(tiny_dir, "host")
    calls: list[str] = []
    monkeypatch.setattr(model.backbone, "release_memory", lambda: calls.append("arena"))
    monkeypatch.setattr(classify_model, "release_free_memory", lambda: calls.append("heap") or True)
    model.warmup(3)
    assert calls == ["arena", "heap"]  # the runtime's arena first, then the heap
