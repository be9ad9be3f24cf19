"""Engine errors: what went wrong, by kind (``code``), with a message for the caller.

They know nothing of HTTP: ``app.api.errors`` maps each code to a status. The CLI, the
benchmarks and a Ray Serve replica see the same errors as the HTTP layer.
"""

from __future__ import annotations


class EngineError(Exception):
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(EngineError):
    """A field of the request is wrong for this model (method, top_k, labels, a word, a shape)."""

    code = "invalid_input"


class UndecodableImage(EngineError):
    """Bytes that claim to be an image but do not decode (corrupt, truncated, bad base64)."""

    code = "undecodable_image"


class UnsupportedMediaType(EngineError):
    """Bytes that are no image format we read."""

    code = "unsupported_media_type"


class TooLarge(EngineError):
    """Over a limit: pixels, images, labels, prompt, commands, observations."""

    code = "too_large"


class ModelNotFound(EngineError):
    """No served model has this name (or it serves another task)."""

    code = "model_not_found"


class QueueFull(EngineError):
    """Shed: the queue is full, or the request would only wait past its deadline."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(EngineError):
    """Loading, or draining for shutdown."""

    code = "not_ready"


class DeadlineExceeded(EngineError):
    """The request's deadline (counted from its arrival) passed before its batch started."""

    code = "deadline_exceeded"


class InferenceFailed(EngineError):
    """The model raised on this request's batch (only its items fail)."""

    code = "inference_failed"


class ModelLoadError(RuntimeError):
    """A model entry that cannot be served: names the model and the file at fault."""


class MalformedBody(EngineError):
    """A body that does not parse: invalid JSON, a broken multipart form."""

    code = "malformed_body"


class InvalidTensor(EngineError):
    """A tensor or field of an Open Inference Protocol request that does not fit the protocol or the model."""

    code = "invalid_tensor"


class UnsupportedBody(EngineError):
    """A body of a content type or encoding the route does not read (415, in /v2 too)."""

    code = "unsupported_media_type"
