"""The decoded pixels a server process may hold at once, shared by every image model it serves.

A request's images are reserved from their headers before any of them is decoded, all or none
(``PixelBudget.reserve``); each image's ``Reservation`` then shrinks to what its batch item keeps
(a crop, the model's input) and is given back once its batch has consumed it. Whatever path an
item takes out of the server, the reservation cannot outlive it: a ``Reservation`` that is
garbage-collected gives its pixels back (a client that went away, a deadline, an error).

No torch here: the engine creates the budget and the image tasks reserve from it.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence

from app.errors import QueueFull, TooLarge

ENV_VAR = "EQUISERVE_MAX_DECODED_PIXELS"


class PixelBudget:
    """``capacity`` pixels, reserved by requests and given back by their items; thread-safe
    (the event loop, the preprocessing pool, inference threads and the garbage collector all
    give pixels back). ``on_change`` gets the pixels held after every change (a gauge)."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a pixel budget needs at least 1 pixel, not {capacity}")
        self.capacity = capacity
        self._on_change = on_change
        self._held = 0
        self._lock = threading.Lock()
        # Pixels of reservations the garbage collector finalised. The collector may run inside
        # any allocation, also while this thread holds our lock or a metrics lock: a finaliser
        # only appends here (atomic, lock-free) and the next call under the lock counts them.
        self._collected: deque[int] = deque()

    @property
    def held(self) -> int:
        with self._lock:
            self._count_collected()
            return self._held

    def refresh(self) -> None:
        """Count what the garbage collector gave back and report it (``on_change``)."""
        with self._lock:
            self._count_collected()
            self._report()

    def reserve(self, sizes: Sequence[int]) -> list[Reservation]:
        """One reservation per size, all or none.

        Spent budget is refused at once with ``QueueFull`` (429, ``Retry-After``) rather than
        waited for: a waiting request would hold a preprocessing thread, which decodes for
        everyone, and its body, whose memory is what the budget protects; and the engine already
        sheds overload this way instead of queueing it. A request larger than the whole budget
        could never be served: ``TooLarge`` (413)."""
        total = sum(sizes)
        if total > self.capacity:
            raise TooLarge(
                f"the images of this request decode to {total} pixels; the server holds at most "
                f"{self.capacity} at once ({ENV_VAR})"
            )
        reservations = [Reservation(self) for _ in sizes]  # made first: nothing to undo if this fails
        with self._lock:
            self._count_collected()
            if self._held + total > self.capacity:
                raise QueueFull(
                    f"the server holds {self._held} of its {self.capacity} decoded pixels ({ENV_VAR}); "
                    f"this request needs {total} more",
                    retry_after_s=1.0,
                )
            for reservation, size in zip(reservations, sizes, strict=True):
                reservation._cell[0] = size
            self._held += total
            self._report()
        return reservations

    # -- giving back ---------------------------------------------------------------------------
    def _give_back(self, cell: list[int], keep: int) -> None:
        with self._lock:
            self._count_collected()
            returned = cell[0] - keep
            if returned > 0:
                cell[0] = keep
                self._held -= returned
                self._report()

    def _collected_by_gc(self, cell: list[int]) -> None:
        """A finaliser: no lock may be taken here (see ``_collected``)."""
        pixels, cell[0] = cell[0], 0
        if pixels:
            self._collected.append(pixels)

    def _count_collected(self) -> None:
        if self._collected:
            while self._collected:
                self._held -= self._collected.popleft()
            self._report()

    def _report(self) -> None:
        if self._on_change is not None:
            self._on_change(self._held)


class Reservation:
    """Pixels of one image held against a ``PixelBudget``: ``shrink`` to what is still held,
    ``release`` (idempotent) when nothing is; given back when collected, whichever comes first."""

    __slots__ = ("__weakref__", "_budget", "_cell")

    def __init__(self, budget: PixelBudget) -> None:
        self._budget = budget
        # The count lives in a cell the finaliser shares: a finaliser must not refer to its object.
        self._cell = [0]
        finalizer = weakref.finalize(self, budget._collected_by_gc, self._cell)
        finalizer.atexit = False  # nothing to give back to a process that is exiting

    @property
    def pixels(self) -> int:
        return self._cell[0]

    def shrink(self, pixels: int) -> None:
        """Keep at most ``pixels`` (a reservation never grows)."""
        self._budget._give_back(self._cell, max(0, pixels))

    def release(self) -> None:
        self._budget._give_back(self._cell, 0)
