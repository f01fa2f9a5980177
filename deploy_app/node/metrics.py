"""The node's Prometheus metrics, served as ``GET /metrics`` beside ``/health`` on ``health_port``.

Counters (since the node started): ``ctfm_node_instances_received_total{outcome}`` (``new``: stored; ``duplicate``:
already held, answered success, not stored again; ``refused``: answered 0xA700 or 0xC000),
``ctfm_node_associations_accepted_total`` and ``ctfm_node_associations_rejected_total{reason}`` (``calling_ae``,
``called_ae``, ``spool_full``).  Histograms: ``ctfm_node_job_run_seconds{outcome}`` (one run of the deploy app,
by the job's state after it) and ``ctfm_node_delivery_seconds{outcome}`` (one delivery run to the PACS).  Read from
the queue and the spool at each scrape: ``ctfm_node_jobs{state}`` (every state listed), ``ctfm_node_spool_bytes``
(received instances held), ``ctfm_node_spool_quota_bytes`` (only with ``spool_quota_mb``) and
``ctfm_node_spool_free_bytes`` (free on the spool's file system).  No label holds an AE title, a UID or a name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds: a deploy app run takes from seconds (a head CT on a GPU) to minutes (a whole body on CPU).
RUN_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
REJECTIONS = ("calling_ae", "called_ae", "spool_full")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Snapshot(Collector):
    """What the queue and the spool hold at scrape time."""

    def __init__(self, jobs: Callable[[], dict[str, int]], spool_bytes: Callable[[], int],
                 free_bytes: Callable[[], int], quota_bytes: int | None) -> None:
        self.jobs = jobs
        self.spool_bytes = spool_bytes
        self.free_bytes = free_bytes
        self.quota_bytes = quota_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("ctfm_node_jobs", "Jobs in the queue per state.", labels=["state"])
        for state, count in self.jobs().items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("ctfm_node_spool_bytes", "Bytes of received instances held in the spool.",
                                value=self.spool_bytes())
        if self.quota_bytes is not None:
            yield GaugeMetricFamily("ctfm_node_spool_quota_bytes", "The spool's quota (spool_quota_mb) in bytes.",
                                    value=self.quota_bytes)
        yield GaugeMetricFamily("ctfm_node_spool_free_bytes", "Bytes free on the spool's file system.",
                                value=self.free_bytes())


class NodeMetrics:
    """The node's metrics in a registry of their own (so two nodes in one process, as in tests, do not clash)."""

    def __init__(self, *, jobs: Callable[[], dict[str, int]], spool_bytes: Callable[[], int],
                 free_bytes: Callable[[], int], quota_bytes: int | None) -> None:
        self.registry = CollectorRegistry()  # the snapshot is not collected at registration
        self.instances = Counter("ctfm_node_instances_received", "Instances received by C-STORE, by outcome.",
                                 ["outcome"], registry=self.registry)
        self.accepted = Counter("ctfm_node_associations_accepted", "Associations accepted.", registry=self.registry)
        self.rejected = Counter("ctfm_node_associations_rejected", "Associations rejected, by reason.", ["reason"],
                                registry=self.registry)
        self.job_run = Histogram("ctfm_node_job_run_seconds", "One run of the deploy app, by the job's state after "
                                 "it.", ["outcome"], buckets=RUN_BUCKETS, registry=self.registry)
        self.delivery = Histogram("ctfm_node_delivery_seconds", "One delivery run to the PACS, by the job's state "
                                  "after it.", ["outcome"], buckets=DELIVERY_BUCKETS, registry=self.registry)
        for outcome in ("new", "duplicate", "refused"):
            self.instances.labels(outcome)  # listed at 0 from the start: a rate needs the series to exist
        for reason in REJECTIONS:
            self.rejected.labels(reason)
        self.registry.register(_Snapshot(jobs, spool_bytes, free_bytes, quota_bytes))

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
