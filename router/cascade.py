"""The cascade: the edge answers first, held back; a low-confidence answer goes to the cloud.

The edge's confidence is its mean loss on its own answer, from two Scores (the prompt's, taken
when the flow decided, and prompt + answer's: ``RoutingPolicy.answer_loss``); the policy says
whether that loss escalates. An escalated answer is logged and handed to
``RouterConfig.on_escalation`` (a training example for that site's next federated round); the
hook never changes what the client gets.

Plain like the flow that calls it (``router.flow``): a decision and a prompt score in, plain
chunks out. No grpc, no protobuf and no servicer context here: backends are called through
the flow's ``BackendCalls``, failures are TandemErrors.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from core.errors import TandemError
from core.request import ChatMessage, GenerationRequest
from router.backends import Backend
from router.calls import BackendCalls, PromptScore, RoutedChunk
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.policy import CLOUD, EDGE, Decision, RoutingPolicy
from router.relay import RelayOutcome

log = logging.getLogger(__name__)


class Cascade:
    """Answers a cascade decision: the edge's answer, or the cloud's when the edge is unsure."""

    def __init__(self, calls: BackendCalls, policy: RoutingPolicy, config: RouterConfig,
                 metrics: RouterMetrics) -> None:
        self.calls = calls
        self.policy = policy
        self.config = config
        self.metrics = metrics

    async def answer(
        self, req: GenerationRequest, decision: Decision, score: PromptScore | None,
        deadline: float, buffered: bool, record: dict[str, Any],
    ) -> AsyncIterator[RoutedChunk]:
        """The edge answers first (held back); a low-confidence answer goes to the cloud.

        ``score`` is the flow's Score of the prompt (None: not scored, confidence unknown);
        the confidence, reason and who served go into ``record``.
        """
        backends = self.calls.resolve(decision.candidates)
        first = RelayOutcome()
        held = [c async for c in self.calls.generate(backends, req, deadline, first,
                                                     buffered=True)]
        edge = first.backend
        assert edge is not None  # relay raises when no candidate served
        words = ""
        if edge.tier == EDGE:
            answer = "".join(c.chunk.text for c in held)
            loss, record["confidence"] = await self._answer_loss(edge, req, answer, score,
                                                                  deadline)
            escalate, words = self.policy.escalation(loss)
            clouds = [b for b in backends if b.tier == CLOUD]
            if escalate and not clouds:
                words += ", but no cloud backend is free; kept the edge answer"
            elif escalate:
                up = RelayOutcome()
                texts: list[str] = []
                try:
                    async for chunk in self.calls.generate(clouds, req, deadline, up,
                                                           buffered=buffered):
                        if chunk.labelled and up.backend is not None:
                            record["reason"] = reason = up.reason(
                                f"cascade: {words} -> cloud {up.backend.label}")
                            chunk = replace(chunk, route_reason=reason)
                        texts.append(chunk.chunk.text)
                        yield chunk
                except TandemError as e:
                    if up.committed:
                        raise
                    words += f"; escalation failed ({e.status}), kept the edge answer"
                else:
                    record["served_by"] = up.backend.label if up.backend else None
                    self.metrics.escalation()
                    node = next((c.served_by.node_id for c in held if c.labelled), "")
                    await self._escalated(req, answer, "".join(texts), node or edge.label)
                    return
        reason = first.reason(f"cascade: {words} -> {edge.tier} {edge.label}" if words
                              else decision.reason)
        record["reason"], record["served_by"] = reason, edge.label
        for chunk in held:
            yield replace(chunk, route_reason=reason) if chunk.labelled else chunk

    async def _answer_loss(
        self, edge: Backend, req: GenerationRequest, answer: str, score: PromptScore | None,
        deadline: float,
    ) -> tuple[float | None, str]:
        """The edge model's mean loss on its own answer (two Scores), or None and why not."""
        if score is None:
            return None, "prompt not scored"
        if not answer:
            return None, "empty answer"
        try:
            # A conversation's rendering with the answer as the assistant's turn starts with the
            # rendering the prompt was scored on (its generation prompt), as a raw prompt does.
            prompt, messages = ((req.prompt + answer, ()) if not req.messages else
                                ("", (*req.messages, ChatMessage("assistant", answer))))
            full, _ = await self.calls.score(
                [edge], prompt, min(deadline, time.monotonic() + self.config.score_timeout_s),
                attempts=1, messages=messages)
        except TandemError as e:
            return None, f"answer score failed: {e.status}"
        loss = self.policy.answer_loss(score.result.mean_loss, score.result.prompt_tokens,
                                       full.result.mean_loss, full.result.prompt_tokens)
        return loss, "answer loss " + ("unknown" if loss is None else f"{loss:.3f}")

    async def _escalated(self, req: GenerationRequest, edge_answer: str, cloud_answer: str,
                         edge_node: str) -> None:
        log.info("cascade escalated %s (%d prompt bytes) to the cloud", req.request_id,
                 req.prompt_bytes)
        hook = self.config.on_escalation
        if hook is None:
            return
        try:
            # Site data is prompt -> answer text; a conversation goes in as its turns.
            prompt = req.prompt or "\n".join(f"{m.role}: {m.content}" for m in req.messages)
            result = hook(prompt, edge_answer, cloud_answer, edge_node)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the client's answer must not depend on the hook
            log.exception("on_escalation hook failed for %s", req.request_id)
