"""Prometheus collectors that read live state when scraped: engine load and model, and the
process's CPU, memory and GPUs; ``SafeCollector`` is the base every component's collectors use.

Scrapes run in the metrics server's thread: collectors only read (plain ints, copied lists),
and one that fails drops its own families, not the whole scrape.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.engine_api import Engine

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


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    """An empty gauge family (a collector fills it at scrape time)."""
    return GaugeMetricFamily(name, doc, labels=list(labels))


class EngineCollector(SafeCollector):
    """An engine's live load and model version, read at scrape time from ``load()``/``info``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def families(self) -> list[Metric]:
        return [
            gauge("tandem_in_flight_requests", "Sequences being decoded now"),
            gauge("tandem_queue_depth_requests", "Requests waiting for a decode slot"),
            gauge("tandem_decode_slots", "Sequences the engine decodes together"),
            gauge("tandem_queue_capacity_requests", "Queue length past which requests are "
                   "refused"),
            gauge("tandem_model_info", "The served model (always 1)",
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
            gauge("tandem_process_cpu_cores", "CPU cores this process may run on"),
            gauge("tandem_process_resident_memory_bytes", "Resident memory of this process"),
            gauge("tandem_memory_used_bytes", "Memory in use: the container's working set "
                   "when it has a limit, else the host's"),
            gauge("tandem_memory_limit_bytes", "The container's memory limit, else host memory"),
            gauge("tandem_gpu_utilization_ratio", "GPU busy fraction (NVML)", gpu),
            gauge("tandem_gpu_memory_used_bytes", "GPU memory in use by all processes", gpu),
            gauge("tandem_gpu_memory_total_bytes", "GPU memory", gpu),
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
