"""Engine errors. Each carries the HTTP status and code the API layer answers with."""

from __future__ import annotations


class EngineError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(EngineError):
    status, code = 422, "invalid_input"


class UndecodableImage(EngineError):
    status, code = 400, "undecodable_image"


class UnsupportedMediaType(EngineError):
    status, code = 415, "unsupported_media_type"


class TooLarge(EngineError):
    status, code = 413, "too_large"


class ModelNotFound(EngineError):
    status, code = 404, "model_not_found"


class QueueFull(EngineError):
    status, code = 429, "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(EngineError):
    status, code = 503, "not_ready"


class DeadlineExceeded(EngineError):
    status, code = 504, "deadline_exceeded"


class InferenceFailed(EngineError):
    status, code = 500, "inference_failed"
