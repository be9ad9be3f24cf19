"""Keep the event loop ahead of the compute threads when the CPU is short.

Why: under overload on a small CPU, inference and preprocessing threads keep every core busy,
and the event loop (which accepts connections, sheds with 429 and answers) waits its turn
with them: a 429 that costs the server well under a millisecond then takes seconds. Linux
schedules threads, and a thread's nice value is its own, inherited by the threads it starts;
so the threads that compute (the batcher's, the preprocessing pool's, and the ones that load
the models, whose onnxruntime and OpenMP pools are created there) run at a higher nice value,
and the event loop, at the process's own, gets the CPU first whenever it has work. When the
loop is idle they get all of it, so an unloaded server is as fast as before.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("equiserve.priority")


def lower_this_thread(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (0: leave it). Best effort:
    only Linux has per-thread nice values; elsewhere this does nothing."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:  # e.g. a sandbox that forbids it: run at the same priority
        log.debug("cannot lower the priority of thread %d: %s", tid, exc)
