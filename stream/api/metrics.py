"""The query API's own Prometheus series, registered on the worker's registry (so /metrics
shows them next to the pipeline's) without growing the shared stream/runtime/metrics.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter("evostream_api_requests_total", "API requests answered", ["endpoint", "status"],
                                registry=r)
        self.request_s = Histogram("evostream_api_request_seconds", "API request latency", ["endpoint"],
                                   buckets=_LAT, registry=r)
        self.queue_depth = Gauge("evostream_query_queue_depth", "query requests waiting for a model pass", registry=r)
        self.rejected = Counter("evostream_query_rejected_total", "query requests refused because the queue was full",
                                registry=r)
        self.pass_seconds = Histogram("evostream_query_pass_seconds", "model time of one query pass", buckets=_LAT,
                                      registry=r)
        self.pass_texts = Histogram("evostream_query_pass_texts", "texts per query pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
