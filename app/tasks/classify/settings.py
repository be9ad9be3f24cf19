"""The limits of classify requests: ``EQUISERVE_CLASSIFY_*`` env vars, or ``limits:`` in a model's ``model.yaml``."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from app.tasks.base import TaskLimits, limit


class ClassifyLimits(TaskLimits):
    model_config = SettingsConfigDict(title="classify")

    max_pixels: int = limit(
        "classify", "max_pixels", 25_000_000, "decoded pixels per image (413; decompression bombs)", ge=1
    )
    max_images: int = limit("classify", "max_images", 16, "images per request (413)", ge=1)
    max_request_pixels: int = limit(
        "classify",
        "max_request_pixels",
        200_000_000,
        "pixels of all images of one request, from their headers before any is decoded (413): sixteen "
        "12-megapixel photos pass (4032x3024 each), sixteen images at the per-image limit do not",
        ge=1,
    )
    max_labels: int = limit("classify", "max_labels", 1000, "zero-shot labels per request (413)", ge=1)
    max_label_chars: int = limit("classify", "max_label_chars", 200, "characters per zero-shot label (422)", ge=1)
