"""The limits of embed requests: ``EQUISERVE_EMBED_*`` env vars, or ``limits:`` in a model's ``model.yaml``."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from app.tasks.base import TaskLimits, limit


class EmbedLimits(TaskLimits):
    model_config = SettingsConfigDict(title="embed")

    max_pixels: int = limit(
        "embed", "max_pixels", 25_000_000, "decoded pixels per image (413; decompression bombs)", ge=1
    )
    max_images: int = limit("embed", "max_images", 16, "images per request (413)", ge=1)
    max_request_pixels: int = limit(
        "embed",
        "max_request_pixels",
        200_000_000,
        "pixels of all images of one request, from their headers before any is decoded (413), as for classify",
        ge=1,
    )
