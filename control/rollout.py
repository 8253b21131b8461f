"""Canary rollouts decided by numbers.

``RolloutController.start`` sends a version to a fraction of the live fleet; ``evaluate``
compares what the canaries served on it with what the rest of the fleet served on the current
version over a recent window (error rate, p99 latency, escalation rate) and says wait, promote
or roll back; ``tick`` acts on that verdict and is what the control server runs on a timer.
Plain Python over ``ControlStore``, no grpc: ``tandem rollout`` calls the same methods on the
same database from another process. Each decision is one store transaction that refuses a
rollout already decided, so a tick and an operator can't both win.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.records import NodeRecord, OutcomeWindow, Rollout
from control.store import ControlStore
from core.errors import InvalidRequest, WrongState

log = logging.getLogger(__name__)

# Verdict actions.
IDLE, WAIT, PROMOTE, ROLLBACK = "idle", "wait", "promote", "rollback"
# The serving control plane writes its RolloutConfig here, so `tandem rollout status` judges
# with the same thresholds as the server's ticks.
CONFIG_FILE = "rollout-config.json"


@dataclass(frozen=True)
class RolloutConfig:
    """How canaries are picked, how long and on how much traffic they are judged, and what
    counts as worse."""

    # A fifth of the fleet: enough nodes that a bad version shows, few enough that most users
    # never meet it.
    fraction: float = 0.2
    # Outcomes are compared over the last window: long enough to hold many reports (nodes
    # report every 15 s), short enough that the baseline reflects today's traffic mix.
    window_s: float = 600.0
    # Requests each side must have in the window before rates are compared: below ~100 one
    # request moves an error rate by a whole point, so noise would decide.
    min_requests: int = 100
    # Promote no sooner than this after the start, however fast traffic comes: a leak or a
    # crash some minutes after warm-up must get a chance to show.
    min_duration_s: float = 120.0
    # Worse means: error rate more than 2 points above the baseline's (absolute, since a ratio
    # of near-zero rates is noise)...
    max_error_rate_increase: float = 0.02
    # ...or p99 latency over 1.5x the baseline's (a quantized model that fell off its fast
    # kernels, or a much bigger one) and by more than the slack (at a few ms a ratio is
    # jitter)...
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 25.0
    # ...or 5 more points of escalations: the edge model "knowing" less of the site's
    # traffic sends more of it to the cloud, which costs money even when answers look fine.
    max_escalation_rate_increase: float = 0.05
    # A canary failing this share of at least min_requests / 5 requests is broken whatever
    # the baseline shows: roll back at once instead of letting users meet it for a window.
    fail_fast_error_rate: float = 0.5
    # Canaries must serve the version (live, healthy) within this of the start, or it is
    # rolled back: they could not download, verify or load it. Covers a download and warm-up.
    load_timeout_s: float = 300.0
    # A node unheard of this long is not live: three heartbeats at the default 5 s.
    node_stale_s: float = 15.0
    # How often the control server evaluates the active rollout.
    tick_interval_s: float = 10.0
    # False: ticks only log verdicts, and an operator promotes or aborts.
    auto_decide: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"canary fraction must be in (0, 1], got {self.fraction}")
        for name in ("window_s", "node_stale_s", "tick_interval_s", "max_p99_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")

    def save(self, root: str | Path) -> None:
        """Write this config to ``root/rollout-config.json`` (temporary name, then rename)."""
        path = Path(root) / CONFIG_FILE
        tmp = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, root: str | Path) -> RolloutConfig:
        """The config a control server saved in ``root``; the defaults when none did."""
        try:
            raw = json.loads((Path(root) / CONFIG_FILE).read_text())
        except FileNotFoundError:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class SideStats:
    """What one side of the comparison served in the window, summed over its reports."""

    version: str | None
    scope: str  # which nodes and which time, in words
    nodes: tuple[str, ...] = ()  # nodes that reported
    requests: int = 0
    errors: int = 0
    escalations: int = 0
    # Request-weighted means of the reports' percentiles: percentiles of windows don't merge
    # exactly, and weighting keeps a tiny window with one slow request from deciding.
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def escalation_rate(self) -> float:
        return self.escalations / self.requests if self.requests else 0.0

    def describe(self) -> str:
        if not self.requests:
            return f"{self.version or 'none'}: no requests ({self.scope})"
        return (f"{self.version}: {self.requests} requests on {len(self.nodes)} node(s), "
                f"{self.error_rate:.1%} errors, {self.escalation_rate:.1%} escalated, "
                f"p99 {self.latency_p99_ms:.0f} ms ({self.scope})")

    @classmethod
    def of(cls, version: str | None, scope: str, windows: Sequence[OutcomeWindow]) -> SideStats:
        requests = sum(w.requests for w in windows)

        def weighted(attr: str) -> float:
            return sum(getattr(w, attr) * w.requests for w in windows) / requests if requests \
                else 0.0

        return cls(version, scope, tuple(sorted({w.node_id for w in windows})), requests,
                   sum(w.errors for w in windows), sum(w.escalations for w in windows),
                   weighted("latency_p50_ms"), weighted("latency_p99_ms"))


@dataclass(frozen=True)
class Verdict:
    """What the numbers say about the active rollout, and why."""

    action: str  # IDLE (no rollout), WAIT, PROMOTE or ROLLBACK
    reason: str
    rollout: Rollout | None = None
    canary: SideStats | None = None
    baseline: SideStats | None = None
    # Canaries not (yet) live and serving the rollout's version, each with what they do.
    pending: tuple[str, ...] = ()
    evaluated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, with the rates spelled out."""
        out = dataclasses.asdict(self)
        for side in ("canary", "baseline"):
            stats = getattr(self, side)
            if stats is not None:
                out[side].update(error_rate=stats.error_rate,
                                 escalation_rate=stats.escalation_rate)
        return out


class RolloutController:
    """Starts, judges and ends canary rollouts in ``store`` by ``config``."""

    def __init__(self, store: ControlStore, config: RolloutConfig | None = None) -> None:
        self.store = store
        self.config = config or RolloutConfig()
        # What the last tick logged at info, so a tick every few seconds doesn't repeat it.
        self._last_logged: tuple[object, ...] = ()

    def live_nodes(self) -> list[str]:
        """Ids of the nodes healthy and heard from within ``node_stale_s``, sorted."""
        now = self.store.clock()
        return sorted(n.node_id for n in self.store.nodes()
                      if n.is_live(now, self.config.node_stale_s))

    def pick_canaries(self, fraction: float | None = None) -> list[str]:
        """ceil(fraction x live nodes) canaries, at least one, in node id order."""
        fraction = self.config.fraction if fraction is None else fraction
        if not 0 < fraction <= 1:
            raise InvalidRequest(f"canary fraction must be in (0, 1], got {fraction}")
        live = self.live_nodes()
        if not live:
            raise WrongState("no live edge node to use as a canary (none healthy and heard "
                             f"from in the last {self.config.node_stale_s:g} s); check "
                             "`tandem cloud nodes`")
        # Node id order: predictable for operators, and the same nodes each time (a site may
        # well designate its canary hosts by naming them first).
        return live[:max(1, math.ceil(fraction * len(live)))]

    def start(self, version: str, fraction: float | None = None) -> Rollout:
        """Send ``version`` to the canaries; raises WrongState while another rollout runs."""
        fraction = self.config.fraction if fraction is None else fraction
        canaries = self.pick_canaries(fraction)
        rollout = self.store.start_rollout(version, canaries, fraction)
        if len(canaries) == len(self.live_nodes()):
            log.warning("rollout %d: every live node is a canary; %s is judged against what "
                        "the fleet served on %s before the rollout", rollout.rollout_id,
                        version, rollout.previous_version)
        return rollout

    def evaluate(self, now: float | None = None) -> Verdict:
        """The active rollout's verdict at ``now`` (default: the store's clock); decides nothing."""
        rollout = self.store.active_rollout()
        if rollout is None:
            return Verdict(IDLE, "no rollout in canary")
        now = self.store.clock() if now is None else now
        cfg = self.config
        nodes = {n.node_id: n for n in self.store.nodes()}
        pending = tuple(p for p in (self._pending(nodes.get(c), c, rollout.version, now)
                                    for c in rollout.canary_node_ids) if p)
        since = max(rollout.started_at, now - cfg.window_s)
        canary = SideStats.of(
            rollout.version, f"canaries since {_span(now - since)} ago",
            self.store.outcomes(version=rollout.version, node_ids=rollout.canary_node_ids,
                                since=since))
        baseline = self._baseline(rollout, list(nodes), now)
        age = now - rollout.started_at

        def verdict(action: str, reason: str) -> Verdict:
            return Verdict(action, reason, rollout, canary, baseline, pending, now)

        numbers = f"canary {canary.describe()}; baseline {baseline.describe()}"
        fail_fast = max(1, cfg.min_requests // 5)
        if canary.requests >= fail_fast and canary.error_rate >= cfg.fail_fast_error_rate:
            return verdict(ROLLBACK, f"canaries fail {canary.error_rate:.0%} of requests on "
                                     f"{rollout.version}; {numbers}")
        enough = canary.requests >= cfg.min_requests and (
            baseline.requests >= cfg.min_requests or baseline.version is None)
        worse = self._regressions(canary, baseline) if enough else []
        if worse:
            return verdict(ROLLBACK, f"canaries are worse than the baseline: "
                                     f"{'; '.join(worse)}; {numbers}")
        if pending and age >= cfg.load_timeout_s:
            return verdict(ROLLBACK, f"after {_span(age)} not every canary serves "
                                     f"{rollout.version} (load timeout "
                                     f"{_span(cfg.load_timeout_s)}): {'; '.join(pending)}")
        if pending:
            return verdict(WAIT, f"waiting for canaries to serve {rollout.version} "
                                 f"({_span(age)} of {_span(cfg.load_timeout_s)}): "
                                 f"{'; '.join(pending)}")
        if not enough:
            return verdict(WAIT, f"waiting for traffic: {canary.requests} canary and "
                                 f"{baseline.requests} baseline requests of "
                                 f"{cfg.min_requests} each; {numbers}")
        if age < cfg.min_duration_s:
            return verdict(WAIT, f"canaries look fine; promoting after "
                                 f"{_span(cfg.min_duration_s)} ({_span(age)} so far); "
                                 f"{numbers}")
        vs = "no previous version to compare with" if baseline.version is None else \
            "not worse than the baseline"
        return verdict(PROMOTE, f"canaries {vs}; {numbers}")

    def tick(self, now: float | None = None) -> Verdict:
        """Evaluate the active rollout and, when ``auto_decide``, promote or roll it back."""
        verdict = self.evaluate(now)
        rollout = verdict.rollout
        if rollout is None or verdict.action == WAIT or not self.config.auto_decide:
            if rollout is not None:
                # Numbers move every report; say it at info only when the state of things
                # changes (another verdict, other canaries pending).
                key = (rollout.rollout_id, verdict.action, verdict.pending)
                level = logging.INFO if key != self._last_logged else logging.DEBUG
                self._last_logged = key
                log.log(level, "rollout %d of %s: %s: %s", rollout.rollout_id,
                        rollout.version, verdict.action, verdict.reason)
            return verdict
        state = "promoted" if verdict.action == PROMOTE else "rolled_back"
        try:
            self.store.decide_rollout(rollout.rollout_id, state, verdict.reason)
        except WrongState as e:  # decided meanwhile, by an operator or another server
            log.info("rollout %d: %s", rollout.rollout_id, e.message)
            return verdict
        (log.info if state == "promoted" else log.warning)(
            "rollout %d of %s %s automatically: %s", rollout.rollout_id, rollout.version,
            state.replace("_", " "), verdict.reason)
        return verdict

    def promote(self, reason: str = "") -> Rollout:
        """Promote the active rollout now, whatever the numbers say (an operator's call)."""
        return self._decide("promoted", reason)

    def rollback(self, reason: str = "") -> Rollout:
        """Send the canaries back to the fleet's version, as a failed rollout."""
        return self._decide("rolled_back", reason)

    def abort(self, reason: str = "") -> Rollout:
        """End the active rollout without a verdict; the canaries return to the fleet's version."""
        return self._decide("aborted", reason)

    def _decide(self, state: str, reason: str) -> Rollout:
        verdict = self.evaluate()
        rollout = verdict.rollout
        if rollout is None:
            raise WrongState("no rollout is in canary; start one with `tandem rollout start "
                             "VERSION`")
        why = f"{state.replace('_', ' ')} by operator" + (f": {reason}" if reason else "")
        # The numbers at the time go with the decision: a later reader sees what was known.
        return self.store.decide_rollout(
            rollout.rollout_id, state, f"{why} (verdict then: {verdict.action}: "
                                       f"{verdict.reason})")

    def _baseline(self, rollout: Rollout, node_ids: list[str], now: float) -> SideStats:
        """The previous version on the rest of the fleet over the window; when that is too
        thin (a fleet of one or two nodes), on every node since a window before the start."""
        previous = rollout.previous_version
        if previous is None:
            return SideStats(None, "no previous version")
        others = [n for n in node_ids if n not in rollout.canary_node_ids]
        since = now - self.config.window_s
        rest = SideStats.of(previous, f"rest of the fleet, last {_span(self.config.window_s)}",
                            self.store.outcomes(version=previous, node_ids=others, since=since))
        if rest.requests >= self.config.min_requests:
            return rest
        before = rollout.started_at - self.config.window_s
        fleet = SideStats.of(
            previous, f"every node since {_span(now - before)} ago",
            self.store.outcomes(version=previous, since=before))
        return fleet if fleet.requests > rest.requests else rest

    def _pending(self, node: NodeRecord | None, node_id: str, version: str,
                 now: float) -> str:
        """Why a canary is not serving ``version`` yet ("" when it is, live and healthy)."""
        if node is None:
            return f"{node_id} is no longer enrolled"
        if node.last_heartbeat is None:
            return f"{node_id} never sent a heartbeat"
        age = now - node.last_heartbeat
        if age > self.config.node_stale_s:
            return f"{node_id} not heard from for {_span(age)}"
        if node.served_version != version:
            loading = f", loading {node.loading_version}" if node.loading_version else ""
            return f"{node_id} serves {node.served_version or 'nothing'}{loading}"
        if not node.healthy:
            return f"{node_id} serves {version} but reports unhealthy"
        return ""

    def _regressions(self, canary: SideStats, baseline: SideStats) -> list[str]:
        """Each way the canaries are worse than the baseline beyond the thresholds."""
        cfg, worse = self.config, []
        if canary.error_rate - baseline.error_rate > cfg.max_error_rate_increase:
            worse.append(f"error rate {canary.error_rate:.1%} vs {baseline.error_rate:.1%} "
                         f"(limit +{cfg.max_error_rate_increase:.1%})")
        if (baseline.version is not None and baseline.latency_p99_ms > 0
                and canary.latency_p99_ms > baseline.latency_p99_ms * cfg.max_p99_ratio
                and canary.latency_p99_ms - baseline.latency_p99_ms > cfg.p99_slack_ms):
            worse.append(f"p99 latency {canary.latency_p99_ms:.0f} ms vs "
                         f"{baseline.latency_p99_ms:.0f} ms (limit {cfg.max_p99_ratio:g}x)")
        if canary.escalation_rate - baseline.escalation_rate > \
                cfg.max_escalation_rate_increase:
            worse.append(f"escalation rate {canary.escalation_rate:.1%} vs "
                         f"{baseline.escalation_rate:.1%} "
                         f"(limit +{cfg.max_escalation_rate_increase:.1%})")
        return worse


def _span(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2.0 h``: durations in reasons meant for people."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
