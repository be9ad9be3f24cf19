"""The pixels of one request's images, measured from their headers before any of them is decoded.

Two limits depend on all the images of a request, so they are checked once per request, by
the first of its images to be prepared (in the preprocessing pool: headers can be costly to
read, so not on the event loop), while its other images wait for the answer:

* the task's ``max_request_pixels`` (413): the sum of the pixels the headers declare;
* the server's budget of decoded pixels (``app.runtime.pixel_budget``): the pixels decoding will
  hold on the host, reserved for all images at once, or for none (429). All at once, because
  a request holding part of the budget while it waits for the rest could wait on another one
  doing the same.

Each image then takes its own reservation into its batch item (``take``).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from app.backbones.images import open_image
from app.errors import EngineError, TooLarge
from app.runtime.pixel_budget import PixelBudget, Reservation

from .messages import EncodedImage, Pixels

AnyImage = EncodedImage | np.ndarray | Pixels
HostPixels = Callable[[Image.Image], int]  # an opened header -> the pixels its decode holds on the host


class RequestPixels:
    """Shared by the pieces of one request; thread-safe."""

    def __init__(
        self,
        images: Sequence[AnyImage],
        *,
        max_pixels: int,
        max_request_pixels: int,
        limit_name: str,
        budget: PixelBudget,
        host_pixels: HostPixels,
    ) -> None:
        self.images = images
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.limit_name = limit_name  # the env var named in the 413
        self.budget = budget
        self.host_pixels = host_pixels
        self._lock = threading.Lock()
        self._measured = False
        self._error: EngineError | None = None
        self._sizes: list[int] = []
        self._reservations: list[Reservation | None] = []

    def take(self, index: int) -> Reservation:
        """Image ``index``'s reservation: measured and reserved for the whole request on the
        first call; the request's refusal (raised again for each of its images) if it failed."""
        with self._lock:
            if not self._measured:
                try:
                    self._sizes = self._measure()
                    self._reservations = list(self.budget.reserve(self._sizes))
                except EngineError as exc:
                    self._error = exc
                self._measured = True
            if self._error is not None:
                raise copy.copy(self._error)  # each image raises its own: tracebacks are per raise
            reservation, self._reservations[index] = self._reservations[index], None
        if reservation is None:  # the same piece prepared again (a caller retrying): reserve anew
            (reservation,) = self.budget.reserve([self._sizes[index]])
        return reservation

    def _measure(self) -> list[int]:
        """What decoding each image holds on the host, from the headers; the request's 413s."""
        declared, sizes = 0, []
        for image in self.images:
            if isinstance(image, EncodedImage):
                header = open_image(image.data, max_pixels=self.max_pixels, content_type=image.content_type)
                pixels = header.size[0] * header.size[1]
                sizes.append(self.host_pixels(header))
            else:  # decoded already: uint8 [H, W, 3] arrays, float [3, H, W] Pixels (shape checked in split)
                pixels = int(np.prod(image.array.shape[1:] if isinstance(image, Pixels) else image.shape[:2]))
                sizes.append(pixels)
            declared += pixels
        if declared > self.max_request_pixels:
            raise TooLarge(
                f"the {len(self.images)} images of this request have {declared} pixels; the limit is "
                f"{self.max_request_pixels} ({self.limit_name})"
            )
        return sizes
