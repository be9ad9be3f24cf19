"""A torch backbone's ``encode`` through ``torch.compile`` or CUDA graphs, one graph per batch bucket.

Why buckets: a compiled graph (or a captured CUDA graph) is specialised to its input shape,
and the engine's batches come in every size from 1 to ``|G|·max_batch_size`` rows. Rounding
the rows up to the next power of two (padding with copies of the last row, whose outputs are
dropped) bounds the graphs to a handful, each built once. Eval-mode backbones treat every row
on its own, so padding never changes the real rows' features.

Modes (``EQUISERVE_COMPILE_MODE``): ``none`` (eager), ``compile`` (``torch.compile`` with a
static shape per bucket; any device), ``cudagraphs`` (CUDA only: each bucket's eager pass is
captured once into a ``torch.cuda.CUDAGraph`` and replayed from static buffers, which removes
the per-kernel launch cost that dominates small batches on a fast GPU). Whether either pays is
measured (bench/bench_gpu.py), not assumed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MODES = ("none", "compile", "cudagraphs")
Encode = Callable[[Tensor], Tensor]


def bucket_rows(rows: int) -> int:
    """The bucket a batch of ``rows`` runs in: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with copies of its last row appended up to ``rows`` rows."""
    missing = rows - x.shape[0]
    return x if missing <= 0 else torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


class CudaGraph:
    """One bucket's captured pass: inputs are copied into a static buffer, the graph replays,
    the static output is copied out (it is overwritten by the next replay)."""

    def __init__(self, encode: Encode, example: Tensor, pool: Any = None) -> None:
        self.static_input = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):  # warm up outside the capture, as CUDA graphs require
            for _ in range(2):
                encode(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_output = encode(self.static_input)

    @property
    def pool(self) -> Any:
        return self.graph.pool()

    def __call__(self, x: Tensor) -> Tensor:
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output.clone()


class BucketedEncoder:
    """``encode`` run per batch-size bucket in ``mode``; ``none`` calls it as it is.

    ``graph_factory(encode, example, pool)`` builds a bucket's CUDA graph (``CudaGraph``; a test
    passes a stand-in to run the bucket logic on the CPU); ``backend`` is ``torch.compile``'s.
    """

    def __init__(
        self,
        encode: Encode,
        mode: str = "none",
        *,
        backend: str = "inductor",
        graph_factory: Callable[[Encode, Tensor, Any], Callable[[Tensor], Tensor]] = CudaGraph,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose from {MODES}")
        self.encode, self.mode = encode, mode
        self._graph_factory = graph_factory
        self._graphs: dict[tuple[int, ...], Callable[[Tensor], Tensor]] = {}
        self._pool: Any = None
        self._lock = threading.Lock()  # warmup (the load thread) and serving may meet
        self._compiled: Encode | None = None
        if mode == "compile":
            import torch._dynamo

            # One graph per bucket (and input size); the default limit would fall back to eager.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._compiled = torch.compile(encode, backend=backend, dynamic=False)

    @property
    def buckets(self) -> list[int]:
        return sorted({shape[0] for shape in self._graphs})

    def __call__(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return self.encode(x)
        rows = x.shape[0]
        padded = pad_rows(x, bucket_rows(rows))
        if self.mode == "compile":
            assert self._compiled is not None
            return self._compiled(padded)[:rows]
        return self._graph(padded)(padded)[:rows]

    def _graph(self, padded: Tensor) -> Callable[[Tensor], Tensor]:
        key = (*padded.shape, padded.device.index or 0)
        graph = self._graphs.get(key)
        if graph is None:
            with self._lock:
                graph = self._graphs.get(key)
                if graph is None:
                    log.info("capturing a CUDA graph for %d rows", padded.shape[0])
                    graph = self._graph_factory(self.encode, padded, self._pool)
                    self._pool = getattr(graph, "pool", None)  # every bucket shares one memory pool
                    self._graphs[key] = graph
        return graph

    def warm(self, max_rows: int, example: Tensor) -> None:
        """Build every bucket up to ``max_rows`` now (at startup), from ``example`` rows."""
        if self.mode == "none":
            return
        rows = 1
        while rows <= bucket_rows(max_rows):
            self(pad_rows(example[:rows], rows))
            rows *= 2
