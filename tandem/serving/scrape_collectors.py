"""Prometheus collectors that read live state when scraped: engine load and model, the router's
backends, and the process's CPU, memory and GPUs.

Scrapes run in the metrics server's thread: collectors only read (plain ints, copied lists),
and one that fails drops its own families, not the whole scrape.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.serving.engine_api import Engine

log = logging.getLogger(__name__)


class SafeCollector(Collector):
    """A collector whose failure drops its own families, not the whole scrape."""

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect())
        except Exception:
            log.exception("metrics collector %s failed", type(self).__name__)
            return []

    def describe(self) -> Iterable[Metric]:
        return self.families()

    def _collect(self) -> Iterable[Metric]:
        raise NotImplementedError

    def families(self) -> list[Metric]:
        """Every family this collector may yield, empty (for registration and name checks)."""
        raise NotImplementedError


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class EngineCollector(SafeCollector):
    """An engine's live load and model version, read at scrape time from ``load()``/``info``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def families(self) -> list[Metric]:
        return [
            _gauge("tandem_in_flight_requests", "Sequences being decoded now"),
            _gauge("tandem_queue_depth_requests", "Requests waiting for a decode slot"),
            _gauge("tandem_decode_slots", "Sequences the engine decodes together"),
            _gauge("tandem_queue_capacity_requests", "Queue length past which requests are "
                   "refused"),
            _gauge("tandem_model_info", "The served model (always 1)",
                   ("tier", "node", "version", "model", "precision")),
        ]

    def _collect(self) -> Iterable[Metric]:
        load = self.engine.load()
        in_flight, queue, slots, capacity, info = self.families()
        for fam, value in ((in_flight, load.in_flight), (queue, load.queue_depth),
                           (slots, load.slots), (capacity, load.queue_capacity)):
            cast(GaugeMetricFamily, fam).add_metric([], value)
            yield fam
        e, s = self.engine.info, self.engine.info.served_by
        cast(GaugeMetricFamily, info).add_metric(
            [s.tier, s.node_id, s.model_version, e.model_name, e.precision], 1)
        yield info


def _cgroup_memory() -> tuple[int, int] | None:
    """(used, limit) of this container's cgroup (v2, then v1), or None without a limit."""
    for limit_file, usage_file, inactive_key in (
        ("memory.max", "memory.current", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"),
    ):
        root = Path("/sys/fs/cgroup")
        try:
            limit_text = (root / limit_file).read_text().strip()
            used = int((root / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if not limit_text.isdigit():
            return None  # "max": no limit
        stat = (root / limit_file).parent / "memory.stat"
        with contextlib.suppress(OSError, ValueError):
            # The kernel reclaims inactive page cache before an OOM kill: the working set
            # (what Kubernetes evicts on) leaves it out.
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    used -= int(value)
        return max(0, used), int(limit_text)
    return None


class ProcessCollector(SafeCollector):
    """CPU and memory (psutil, cgroup limits honoured) and GPUs when torch already uses CUDA."""

    def __init__(self) -> None:
        self.process = psutil.Process()

    def families(self) -> list[Metric]:
        gpu = ("gpu",)
        return [
            CounterMetricFamily("tandem_process_cpu_seconds_total", "CPU time of this process"),
            _gauge("tandem_process_cpu_cores", "CPU cores this process may run on"),
            _gauge("tandem_process_resident_memory_bytes", "Resident memory of this process"),
            _gauge("tandem_memory_used_bytes", "Memory in use: the container's working set "
                   "when it has a limit, else the host's"),
            _gauge("tandem_memory_limit_bytes", "The container's memory limit, else host memory"),
            _gauge("tandem_gpu_utilization_ratio", "GPU busy fraction (NVML)", gpu),
            _gauge("tandem_gpu_memory_used_bytes", "GPU memory in use by all processes", gpu),
            _gauge("tandem_gpu_memory_total_bytes", "GPU memory", gpu),
        ]

    def _collect(self) -> Iterable[Metric]:
        fams = self.families()
        cpu, cores, rss, used, limit = fams[:5]
        times = self.process.cpu_times()
        cast(CounterMetricFamily, cpu).add_metric([], times.user + times.system)
        affinity = getattr(self.process, "cpu_affinity", None)
        cast(GaugeMetricFamily, cores).add_metric(
            [], len(affinity()) if affinity else psutil.cpu_count() or 1)
        cast(GaugeMetricFamily, rss).add_metric([], self.process.memory_info().rss)
        host = psutil.virtual_memory()
        group = _cgroup_memory()
        # cgroup v1 reports "no limit" as a huge number: the tighter bound is the real one.
        mem_used, mem_limit = (group if group is not None and group[1] < host.total
                               else (host.total - host.available, host.total))
        cast(GaugeMetricFamily, used).add_metric([], mem_used)
        cast(GaugeMetricFamily, limit).add_metric([], mem_limit)
        yield from (cpu, cores, rss, used, limit)
        yield from self._gpus(*fams[5:])

    @staticmethod
    def _gpus(util: Metric, mem_used: Metric, mem_total: Metric) -> Iterable[Metric]:
        # Never import torch here (an edge node has none), and never be the one that creates a
        # CUDA context (hundreds of MB per device): only report devices whose memory the
        # caching allocator already holds, i.e. those the engine uses.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        used = [i for i in range(torch.cuda.device_count()) if torch.cuda.memory_reserved(i)]
        if not used:
            return
        has_util = True
        for i in used:
            free, total = torch.cuda.mem_get_info(i)
            cast(GaugeMetricFamily, mem_used).add_metric([str(i)], total - free)
            cast(GaugeMetricFamily, mem_total).add_metric([str(i)], total)
            try:
                cast(GaugeMetricFamily, util).add_metric([str(i)],
                                                         torch.cuda.utilization(i) / 100.0)
            except Exception:  # NVML (pynvml) missing or refused: memory is still worth having
                has_util = False
        yield from (mem_used, mem_total, *((util,) if has_util else ()))


class PoolCollector(SafeCollector):
    """The router's backends (health, circuit, load, model) and its own in-flight count."""

    def __init__(self, pool: Any, in_flight: Callable[[], int]) -> None:
        self.pool = pool  # router.backends.BackendPool (not imported: serving never needs it)
        self.in_flight = in_flight

    def families(self) -> list[Metric]:
        b = ("backend", "tier", "node")
        return [
            _gauge("tandem_router_in_flight_requests", "Requests this router is serving now"),
            _gauge("tandem_router_backend_up", "1 if the backend passes health checks", b),
            _gauge("tandem_router_backend_circuit_open", "1 while the backend's circuit "
                   "breaker is open", b),
            _gauge("tandem_router_backend_in_flight_requests", "A backend's in-flight requests "
                   "as the router estimates them", b),
            _gauge("tandem_router_backend_queue_depth_requests", "A backend's queued requests "
                   "as the router estimates them", b),
            _gauge("tandem_router_backend_model_info", "The model a backend serves (always 1)",
                   (*b, "version")),
        ]

    def _collect(self) -> Iterable[Metric]:
        own, up, circuit, in_flight, queue, model = self.families()
        cast(GaugeMetricFamily, own).add_metric([], self.in_flight())
        # Read from the scrape thread: snapshots() builds plain values from a copied list.
        for s in self.pool.snapshots():
            labels = [s.name, s.tier or "unknown", s.node_id or s.name]
            cast(GaugeMetricFamily, up).add_metric(labels, 1 if s.healthy else 0)
            cast(GaugeMetricFamily, circuit).add_metric(labels, 1 if s.circuit == "open" else 0)
            cast(GaugeMetricFamily, in_flight).add_metric(labels, s.in_flight)
            cast(GaugeMetricFamily, queue).add_metric(labels, s.queue_depth)
            if s.model_version:
                cast(GaugeMetricFamily, model).add_metric([*labels, s.model_version], 1)
        yield from (own, up, circuit, in_flight, queue, model)
