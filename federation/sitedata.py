"""One site's data for federated fine-tuning: it stays in the site's directory, which the
site's SuperNode names in its node config (``data-path``).

A site directory holds JSON-lines files:

* ``train.jsonl``: ``{"text": ...}`` documents the site trains on;
* ``heldout.jsonl``: ``{"text": ...}`` documents set aside to measure models on this site;
* ``escalations.jsonl``: ``{"prompt": ..., "answer": ...}`` prompts the edge escalated to the
  cloud with the cloud's answers (appended by the router's escalation log): the hard examples
  the edge model is distilled on;
* ``site.json``: ``{"name": ...}``, how results name the site.

``write_corpus_site`` fills one from a family of the demo corpus: each site a different family
is the non-IID split the demo and the tests use.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from core.durable import write_atomic

log = logging.getLogger(__name__)

TRAIN_FILE, HELDOUT_FILE, ESCALATIONS_FILE, SITE_FILE = (
    "train.jsonl", "heldout.jsonl", "escalations.jsonl", "site.json")


@dataclass(frozen=True)
class Escalation:
    """A prompt the edge handed to the cloud, and the cloud's answer."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """As a training document: the answer is what the edge model should have said."""
        return self.prompt + self.answer


@dataclass(frozen=True)
class SiteData:
    """What a site holds (texts, never leaving the site)."""

    name: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    escalations: tuple[Escalation, ...] = ()


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            # An escalation log cut mid-line by a crash loses that line, not the site's data.
            log.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_site(path: str | Path) -> SiteData:
    """The site at ``path``; raises FileNotFoundError when it has nothing to train on."""
    path = Path(path)
    train = tuple(str(r["text"]) for r in _read_jsonl(path / TRAIN_FILE) if r.get("text"))
    escalations = tuple(
        Escalation(str(r["prompt"]), str(r["answer"]))
        for r in _read_jsonl(path / ESCALATIONS_FILE) if r.get("prompt") and r.get("answer"))
    if not train and not escalations:
        raise FileNotFoundError(
            f"no site data in {path}: expected {TRAIN_FILE} (or {ESCALATIONS_FILE}); fill it "
            f"with `tandem fed site --family FAMILY --data-path {path}`")
    heldout = tuple(str(r["text"]) for r in _read_jsonl(path / HELDOUT_FILE) if r.get("text"))
    try:
        name = str(json.loads((path / SITE_FILE).read_text())["name"])
    except (OSError, ValueError, KeyError):
        name = path.name
    return SiteData(name, train, heldout, escalations)


def write_site(path: str | Path, name: str, train: list[str], heldout: list[str]) -> Path:
    """Write a site's documents (each file atomically); escalations already there are kept."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for file, texts in ((TRAIN_FILE, train), (HELDOUT_FILE, heldout)):
        write_atomic(path / file, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_atomic(path / SITE_FILE, json.dumps({"name": name}) + "\n")
    return path


def write_corpus_site(path: str | Path, family: str, name: str | None = None) -> Path:
    """A site holding one family of the demo corpus (its train and held-out documents)."""
    from model.corpus import load_corpus

    corpus = load_corpus()
    return write_site(path, name or family, corpus.texts(family, "train"),
                      corpus.texts(family, "heldout"))


def append_escalation(path: str | Path, prompt: str, answer: str, **extra: object) -> None:
    """Add one escalation to the site's log (one ``write`` of one line, so appends from
    several processes don't interleave)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"prompt": prompt, "answer": answer, **extra}) + "\n").encode()
    fd = os.open(path / ESCALATIONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class EscalationLog:
    """The router's escalation hook: each escalated prompt and the cloud's answer go to the
    site directory of the edge node that escalated (``root/<node id>/``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __call__(self, prompt: str, edge_answer: str, cloud_answer: str, node_id: str) -> None:
        site = node_id.replace("/", "_").replace("..", "_") or "unknown"
        append_escalation(self.root / site, prompt, cloud_answer, edge_answer=edge_answer,
                          at=time.time())
