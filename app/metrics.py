"""Prometheus metrics, named as in the architecture contract (prefix ``equiserve_``).

One ``Metrics`` object per app, on its own registry: several apps (tests, benchmarks) can
live in one process without clashing on prometheus_client's global registry.

Several server processes on one port (``serve --processes N``) are one replica to whoever
scrapes it: the supervisor gives them a shared ``PROMETHEUS_MULTIPROC_DIR``, prometheus_client
then keeps every value in a file there, and ``/metrics``, whichever process answers, reports
all of them: counters and histograms summed, the gauges as their modes below say.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

# ``*_created`` timestamps double the series count and no dashboard of ours reads them.
disable_created_metrics()

# Geometric buckets from 0.5 ms to 10 s: resolve sub-millisecond queue waits and slow batches.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
LAMBDA_ENTROPY_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.1, 2.2)

__all__ = ["CONTENT_TYPE_LATEST", "LATENCY_BUCKETS", "MULTIPROCESS_DIR", "Metrics", "batch_size_buckets"]

# prometheus_client's own variable: set before the process creates its first metric.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to and including ``max_batch_size``."""
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(float(b))
        b *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


class Metrics:
    def __init__(self, max_batch_size: int = 32, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Called before each exposition: gauges whose owners learn of some changes late (the
        # decoded-pixel budget counts what the garbage collector gave back on its next use).
        self.before_exposition: list[Callable[[], None]] = []
        r = self.registry
        self.requests = Counter(
            "equiserve_requests", "HTTP requests answered", ["model", "endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "equiserve_request_duration_seconds", "Request latency, body received to answer",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "equiserve_queue_duration_seconds", "Time an image waited in the batch queue",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "equiserve_inference_duration_seconds", "Fused forward pass time per batch",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "equiserve_batch_size", "Images per fused forward pass",
            ["model"], buckets=batch_size_buckets(max_batch_size), registry=r,
        )  # fmt: skip
        # Across processes (multiprocess mode only): each process queues and handles its own
        # requests, so the replica's figure is the sum over the live ones.
        self.queue_depth = Gauge(
            "equiserve_queue_depth", "Images waiting in the batch queue", ["model"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.inflight = Gauge(
            "equiserve_inflight_requests", "Inference requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.rejected = Counter(
            "equiserve_rejected_requests", "Requests refused before inference", ["model", "reason"], registry=r
        )
        self.lambda_entropy = Histogram(
            "equiserve_lambda_entropy", "Entropy (nats) of the λ-net's weights over the copies, per item",
            ["model"], buckets=LAMBDA_ENTROPY_BUCKETS, registry=r,
        )  # fmt: skip
        self.selected_transform = Counter(
            "equiserve_selected_transform", "Copies chosen by equizero", ["model", "transform"], registry=r
        )
        self.decoded_pixels = Gauge(
            "equiserve_decoded_pixels", "Decoded image pixels held by requests (EQUISERVE_MAX_DECODED_PIXELS)",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.model_info = Gauge(
            "equiserve_model_info", "Loaded models (value 1)", ["model", "backbone", "group", "device", "dtype"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip

    def exposition(self) -> bytes:
        """The text format of every metric: this process's, or every process's in multiprocess mode."""
        for refresh in self.before_exposition:
            refresh()
        folder = os.environ.get(MULTIPROCESS_DIR)
        if not folder:
            return generate_latest(self.registry)
        everyone = CollectorRegistry()
        MultiProcessCollector(everyone, path=folder)
        return generate_latest(everyone)
