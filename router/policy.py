"""The routing policy: which backend serves a request, and why. Plain data in, a Decision out.

Signals, in order of precedence (each one is recorded in ``Decision.signals``):
1. the client's hint: ``route`` edge|cloud pins the tier; quality ``best`` prefers the cloud,
   ``fast`` the edge;
2. context fit: prompt tokens + max_tokens within the edge model's context;
3. difficulty: the edge model's mean per-token loss on the prompt, against a threshold;
4. load and latency: the least expected time among the chosen tier's backends;
5. health: unhealthy backends and open circuits are never candidates;
6. spill-over: when the preferred tier is saturated the other tier serves, if it can, and the
   reason says so; when nothing can take the request, ``Overloaded`` at once with a retry hint.

Never imports grpc: the router's transport turns backend state into ``BackendSnapshot``s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core.errors import Overloaded, Unavailable
from router.circuit import CLOSED, OPEN

EDGE = "edge"
CLOUD = "cloud"
TIERS = (EDGE, CLOUD)


@dataclass(frozen=True)
class PolicyConfig:
    """Thresholds and priors of the routing policy."""

    # Edge mean loss (nats/token) on the prompt above which the cloud answers; calibrate per
    # edge model. The demo edge's held-out loss is 3.73 (ppl 41.6). On unseen docstring prompts
    # of 16-96 tokens its INT4 artifact measures median 3.4, 70th percentile 3.9, 90th 4.5
    # (INT4 adds ~0.04 to fp32); text from outside the corpus measures 4.8-8.7. So 4.0, just
    # above the held-out mean, sends ~70% of unseen and ~95% of seen docstring prompts to the
    # edge, and out-of-domain text to the cloud.
    difficulty_threshold: float = 4.0
    # A version calibrated when it was made (federated runs measure the threshold on the
    # sites' own data) brings its own threshold in the Score reply; False ignores it.
    use_calibrated_threshold: bool = True
    # Cascade: the edge answers first; escalate when its mean loss on its own answer is above
    # cascade_threshold (greedy demo-edge answers measure 0.8-1.6; 1.5 escalates the least
    # confident ~10-15%).
    cascade: bool = False
    cascade_threshold: float = 1.5
    # Tokens an engine adds to the prompt (BOS), for the bytes-only bound of the context fit
    # (Score's prompt_tokens already counts them).
    context_margin_tokens: int = 1
    # Backends tried per request: the primary, then failover candidates.
    max_attempts: int = 3
    # Latency assumed for a backend the router has not timed yet.
    prior_ttft_ms: float = 250.0
    prior_per_token_ms: float = 25.0
    prior_completion_tokens: float = 64.0
    # Retry hint when everything is saturated and no backend said when to come back.
    default_retry_after_s: float = 1.0
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.difficulty_threshold):
            raise ValueError(
                f"difficulty_threshold must be a finite loss, got {self.difficulty_threshold}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class RequestView:
    """What the policy needs to know about a request."""

    route: str = "auto"
    quality: str = "default"
    prompt_bytes: int = 0
    max_tokens: int = 128
    # Exact prompt length in edge tokens, when an edge node scored the prompt.
    prompt_tokens: int | None = None
    # Seconds left before the client's deadline (None: no deadline).
    time_left_s: float | None = None


@dataclass(frozen=True)
class BackendSnapshot:
    """One backend's state at decision time (built by the pool; plain values only)."""

    name: str  # the pool's key: the backend's address
    tier: str | None  # None until its Info was read
    node_id: str = ""
    healthy: bool = True
    circuit: str = CLOSED
    in_flight: int = 0
    queue_depth: int = 0
    slots: int | None = None
    capacity: int | None = None
    retry_after_s: float = 0.0
    ttft_ms: float | None = None
    per_token_ms: float | None = None
    completion_tokens: float | None = None
    max_context: int | None = None
    model_version: str = ""
    # Not timed lately and nothing in flight: ranked first once, to refresh its estimate.
    probe: bool = False

    @property
    def label(self) -> str:
        return self.node_id or self.name

    @property
    def available(self) -> bool:
        """Healthy, circuit not open, and its tier known."""
        return self.healthy and self.circuit != OPEN and self.tier in TIERS

    @property
    def down_reason(self) -> str:
        if not self.healthy:
            return "unhealthy"
        if self.circuit == OPEN:
            return "circuit open"
        return "tier unknown" if self.tier not in TIERS else ""


@dataclass(frozen=True)
class Decision:
    """Where a request goes: ``candidates`` in order (primary, then failover), and why."""

    tier: str
    candidates: tuple[BackendSnapshot, ...]
    reason: str
    signals: dict[str, Any] = field(default_factory=dict)
    # Cascade mode chose the edge: the servicer may escalate a low-confidence answer.
    cascade: bool = False
    spilled: bool = False

    @property
    def primary(self) -> BackendSnapshot:
        return self.candidates[0]


def other_tier(tier: str) -> str:
    return CLOUD if tier == EDGE else EDGE


class RoutingPolicy:
    """Decides the path of each request from its view, backend snapshots and difficulty."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()

    # -- the signals ---------------------------------------------------------------------------

    def fits(self, view: RequestView, b: BackendSnapshot) -> bool | None:
        """Does prompt + max_tokens fit ``b``'s context? None when it cannot be known yet."""
        if b.max_context is None:
            return None
        budget = b.max_context - view.max_tokens
        if view.prompt_tokens is not None:
            return view.prompt_tokens <= budget
        # Byte-level BPE never makes more tokens than bytes: a short prompt surely fits.
        return True if view.prompt_bytes + self.config.context_margin_tokens <= budget else None

    def needs_score(self, view: RequestView, backends: list[BackendSnapshot]) -> bool:
        """Would an edge Score of the prompt (difficulty, exact token count) change the path?"""
        if view.route != "auto" or view.quality == "best":
            return False
        edges = [b for b in backends if b.tier == EDGE and b.available]
        if not edges:
            return False
        if view.quality == "default":
            return True
        # quality=fast goes to the edge anyway; a score only settles an uncertain fit.
        return any(self.fits(view, b) is None for b in edges)

    def expected_wait_ms(self, b: BackendSnapshot) -> float:
        """Time to the first token if sent now: prefill, plus queueing when slots are full."""
        cfg = self.config
        ttft = b.ttft_ms if b.ttft_ms is not None else cfg.prior_ttft_ms
        slots = max(1, b.slots or 1)
        load = b.in_flight + b.queue_depth
        if load < slots:
            return ttft
        per_token = b.per_token_ms if b.per_token_ms is not None else cfg.prior_per_token_ms
        tokens = b.completion_tokens if b.completion_tokens is not None else (
            cfg.prior_completion_tokens)
        service = ttft + per_token * tokens
        rounds = (load - slots) // slots + 1
        # Running requests are half-way through on average, so the first slot frees after half
        # a service time; each further round of queued requests takes a whole one.
        return ttft + (rounds - 0.5) * service

    def expected_total_ms(self, view: RequestView, b: BackendSnapshot) -> float:
        per_token = b.per_token_ms if b.per_token_ms is not None else self.config.prior_per_token_ms
        return self.expected_wait_ms(b) + per_token * view.max_tokens

    def saturation(self, view: RequestView, b: BackendSnapshot) -> str | None:
        """Why ``b`` cannot take this request now, or None if it can."""
        if b.retry_after_s > 0:
            return f"refused, retry in {b.retry_after_s:.1f} s"
        load = b.in_flight + b.queue_depth
        if b.capacity is not None and load >= b.capacity:
            return f"full ({load}/{b.capacity})"
        slots = max(1, b.slots or 1)
        if view.time_left_s is not None and load >= slots:
            wait_s = self.expected_wait_ms(b) / 1000.0
            if wait_s > view.time_left_s:
                return f"would queue past the deadline ({wait_s:.2f} s > {view.time_left_s:.2f} s)"
        return None

    def rank(self, view: RequestView, backends: list[BackendSnapshot]) -> list[BackendSnapshot]:
        """A backend due a probe first, then least expected time; ties go to the less loaded,
        then by name (stable)."""
        return sorted(
            backends,
            key=lambda b: (not b.probe, self.expected_total_ms(view, b),
                           b.in_flight + b.queue_depth, b.name),
        )

    def scorers(self, backends: list[BackendSnapshot]) -> list[BackendSnapshot]:
        """Edge nodes to Score a prompt on, best first (available and not refusing)."""
        edges = [b for b in backends if b.tier == EDGE and b.available and b.retry_after_s <= 0]
        return self.rank(RequestView(max_tokens=0), edges)

    # -- the decision --------------------------------------------------------------------------

    def decide(
        self, view: RequestView, backends: list[BackendSnapshot], difficulty: float | None = None,
        signals: dict[str, Any] | None = None, threshold: float | None = None,
    ) -> Decision:
        """Pick the tier and ordered candidates; raise Unavailable or Overloaded if none.

        ``threshold`` is the scoring edge version's calibrated difficulty threshold, if any.

        The signals are recorded into ``signals`` when given (so a refusal can be logged with
        them too), and returned as ``Decision.signals``.
        """
        usable = [b for b in backends if b.available]
        busy = {b.name: self.saturation(view, b) for b in usable}
        fit = {b.name: self.fits(view, b) for b in usable if b.tier == EDGE}
        signals = {} if signals is None else signals
        signals |= {
            "route": view.route, "quality": view.quality, "prompt_bytes": view.prompt_bytes,
            "prompt_tokens": view.prompt_tokens, "max_tokens": view.max_tokens,
            "time_left_s": None if view.time_left_s is None else round(view.time_left_s, 3),
            "fits_edge": _any_fit(fit.values()), "difficulty": difficulty,
            "threshold": self._threshold(threshold),
            "down": {b.label: b.down_reason for b in backends if not b.available},
            "saturated": {b.label: why for b in usable if (why := busy[b.name])},
            "expected_wait_ms": {b.label: round(self.expected_wait_ms(b)) for b in usable},
        }
        if view.route in TIERS:
            return self._pinned(view, backends, busy, signals)
        if not usable:
            raise Unavailable(f"no healthy backend{_details(backends)}")
        # Auto-routed edge candidates must surely fit: an edge refusing the context would be
        # the client's INVALID_ARGUMENT, not something to fail over from.
        free = {
            EDGE: [b for b in usable if b.tier == EDGE and fit[b.name] and not busy[b.name]],
            CLOUD: [b for b in usable if b.tier == CLOUD and not busy[b.name]],
        }
        tier, why, cascade = self._preferred(view, usable, fit, difficulty,
                                             self._threshold(threshold))
        signals["preferred"] = tier
        spilled = False
        if not free[tier]:
            able = [b for b in usable if b.tier == CLOUD or fit.get(b.name)]
            if not free[other_tier(tier)]:
                if able:
                    retry = self._retry_after(able)
                    raise Overloaded(
                        f"every backend that can serve this request is saturated; retry in "
                        f"{retry:.1f} s", retry_after_s=retry)
                raise Unavailable(f"no healthy backend can serve this request{_details(backends)}")
            state = "saturated" if any(b.tier == tier for b in able) else "unavailable"
            why = f"{why}; {tier} {state}, spill-over"
            tier, cascade, spilled = other_tier(tier), False, True
        ranked = self.rank(view, free[tier])
        failover = self.rank(view, free[other_tier(tier)])
        candidates = (ranked[0], *failover)[: self.config.max_attempts]
        signals["spilled"] = spilled
        prefix = "cascade" if cascade else "auto"
        return Decision(
            tier=tier, candidates=candidates, signals=signals, cascade=cascade, spilled=spilled,
            reason=f"{prefix}: {why} -> {tier} {ranked[0].label}",
        )

    def _threshold(self, calibrated: float | None) -> float:
        """The difficulty threshold that applies: the version's own, else the configured one."""
        if calibrated is not None and self.config.use_calibrated_threshold \
                and math.isfinite(calibrated):
            return calibrated
        return self.config.difficulty_threshold

    def _preferred(
        self, view: RequestView, usable: list[BackendSnapshot], fit: dict[str, bool | None],
        difficulty: float | None, thr: float,
    ) -> tuple[str, str, bool]:
        """The tier the signals ask for, the reason, and whether the cascade applies."""
        if view.quality == "best":
            return CLOUD, "quality=best", False
        if not any(b.tier == EDGE for b in usable):
            return CLOUD, "no edge available", False
        if not any(fit.values()):
            ctx = max((b.max_context or 0) for b in usable if b.tier == EDGE)
            if view.prompt_tokens is not None:
                size, verb = f"{view.prompt_tokens} tokens", "does not fit"
            else:
                size, verb = f"{view.prompt_bytes} bytes, token count unknown", "may not fit"
            return CLOUD, f"{verb} the edge (prompt {size} + {view.max_tokens} > {ctx})", False
        if view.quality == "fast":
            return EDGE, "quality=fast", False
        if self.config.cascade:
            return EDGE, "edge answers first", True
        if difficulty is None:
            return CLOUD, "difficulty unknown", False
        if difficulty <= thr:
            return EDGE, f"easy prompt (edge loss {difficulty:.2f} <= {thr:.2f})", False
        return CLOUD, f"hard prompt (edge loss {difficulty:.2f} > {thr:.2f})", False

    def _pinned(
        self, view: RequestView, backends: list[BackendSnapshot], busy: dict[str, str | None],
        signals: dict[str, Any],
    ) -> Decision:
        """route=edge|cloud: that tier or a clear error, never a silent switch."""
        tier = view.route
        in_tier = [b for b in backends if b.tier == tier and b.available]
        if not in_tier:
            down = [b for b in backends if b.tier in (tier, None)]
            raise Unavailable(
                f"route={tier} was requested but no {tier} backend is healthy{_details(down)}")
        free = [b for b in in_tier if not busy[b.name]]
        if not free:
            retry = self._retry_after(in_tier)
            raise Overloaded(
                f"every {tier} backend is saturated; retry in {retry:.1f} s or use route=auto",
                retry_after_s=retry)
        # The context check is the edge's own (same message as a direct call), so no fit here.
        ranked = self.rank(view, free)[: self.config.max_attempts]
        return Decision(tier=tier, candidates=tuple(ranked), signals=signals,
                        reason=f"pinned: route={tier} -> {tier} {ranked[0].label}")

    def _retry_after(self, blocked: list[BackendSnapshot]) -> float:
        """The soonest any blocked backend said it may take work again, else the default."""
        hints = [b.retry_after_s for b in blocked if b.retry_after_s > 0]
        retry = min(hints) if hints else self.config.default_retry_after_s
        return min(max(retry, 0.05), self.config.max_retry_after_s)

    # -- the cascade ---------------------------------------------------------------------------

    @staticmethod
    def answer_loss(
        prompt_loss: float, prompt_tokens: int, full_loss: float, full_tokens: int
    ) -> float | None:
        """Mean loss on the answer's tokens alone, from Scores of prompt and prompt + answer.

        A Score's mean is over the n - 1 predicted tokens of its n (the first, BOS, is given).
        """
        answer_tokens = full_tokens - prompt_tokens
        if answer_tokens <= 0 or prompt_tokens < 1:
            return None
        total = full_loss * (full_tokens - 1) - prompt_loss * (prompt_tokens - 1)
        return total / answer_tokens

    def escalation(self, answer_loss: float | None) -> tuple[bool, str]:
        """Should the cloud answer instead of the edge? And the words for the reason."""
        thr = self.config.cascade_threshold
        if answer_loss is None:
            return False, "edge confidence unknown, kept the edge answer"
        if answer_loss > thr:
            return True, f"escalated (edge answer loss {answer_loss:.2f} > {thr:.2f})"
        return False, f"edge confident (answer loss {answer_loss:.2f} <= {thr:.2f})"


def _any_fit(values: Any) -> bool | None:
    """True if some edge surely fits, False if none can, None if unknown."""
    vals = list(values)
    if any(v is True for v in vals):
        return True
    if vals and all(v is False for v in vals):
        return False
    return None


def _details(backends: list[BackendSnapshot]) -> str:
    down = [f"{b.label}: {b.down_reason}" for b in backends if not b.available]
    return f" ({'; '.join(down)})" if down else ""
