"""The control store on a real SQLite file: join tokens, enrollment, heartbeats, versions,
rollouts and outcomes, with a settable clock. Every refusal is checked by its error type (the
status the servicer will answer) and by what it left unchanged.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Clock

from control.credentials import JOIN_TOKEN_PREFIX
from control.records import ModelVersion, NodeLoad, NodeResources, VersionOutcome
from control.schema import SCHEMA_VERSION
from control.store import ControlStore
from core.errors import InvalidRequest, NotFound, Unauthenticated, WrongState
from core.tokens import parse_token

ADDRESS = "10.0.0.7:50061"


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[ControlStore]:
    with ControlStore(tmp_path / "control.db", clock=clock) as s:
        yield s


def enroll(store: ControlStore, node_id: str = "", host: str = "edge-a") -> tuple[str, str]:
    e = store.enroll(store.create_join_token(3600), hostname=host, inference_address=ADDRESS,
                     resources=NodeResources(4, 8 << 30, ("avx2",)), node_id=node_id)
    return e.node_id, e.credential


def version(name: str, content: bytes | None = None) -> ModelVersion:
    manifest = content or f'{{"model_version":"{name}"}}'.encode()
    return ModelVersion(
        version=name, manifest_path=f"manifests/{name}.json", manifest_json=manifest,
        manifest_sha256=hashlib.sha256(manifest).hexdigest(), signature=b"s" * 64,
        key_id="ed25519:0000000000000000", base_version="demo-edge", parent_version=None,
        quantization="int4", total_size=123, created_at=0.0, notes="")


# --- join tokens and enrollment ----------------------------------------------------------------


def test_join_token_is_single_use(store: ControlStore) -> None:
    token = store.create_join_token(3600, note="rack 4")
    first = store.enroll(token, hostname="edge-a", inference_address=ADDRESS)
    assert first.node_id.startswith("edge-") and first.credential.startswith("tdmn_")
    assert first.model_version == "" and not first.reenrolled
    with pytest.raises(Unauthenticated, match=rf"already used \(by node {first.node_id}"):
        store.enroll(token, hostname="edge-b", inference_address=ADDRESS)
    assert [n.node_id for n in store.nodes()] == [first.node_id]
    [listed] = store.join_tokens()
    assert listed.used_by == first.node_id and listed.note == "rack 4"


def test_join_token_expires(store: ControlStore, clock: Clock) -> None:
    token = store.create_join_token(60)
    clock.now += 60
    with pytest.raises(Unauthenticated, match="expired at"):
        store.enroll(token, hostname="edge-a", inference_address=ADDRESS)
    assert store.nodes() == []


def test_unknown_or_malformed_token_is_refused(store: ControlStore) -> None:
    token = store.create_join_token(60)
    with pytest.raises(Unauthenticated, match="malformed join token"):
        store.enroll("hunter2", hostname="edge-a", inference_address=ADDRESS)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated, match="not recognized"):
        store.enroll(forged, hostname="edge-a", inference_address=ADDRESS)
    # The real one is still unspent.
    store.enroll(token, hostname="edge-a", inference_address=ADDRESS)


def test_bad_fields_leave_the_token_unspent(store: ControlStore) -> None:
    token = store.create_join_token(60)
    with pytest.raises(InvalidRequest, match="inference_address must be host:port"):
        store.enroll(token, hostname="edge-a", inference_address="edge-a")
    with pytest.raises(InvalidRequest, match="node_id must be"):
        store.enroll(token, hostname="edge-a", inference_address=ADDRESS, node_id="../etc")
    assert store.enroll(token, hostname="edge-a", inference_address=ADDRESS).node_id


def test_reenroll_keeps_the_node_and_replaces_its_credential(
        store: ControlStore, clock: Clock) -> None:
    node_id, old = enroll(store)
    enrolled_at = store.node(node_id).enrolled_at
    clock.now += 10
    again = store.enroll(store.create_join_token(60), hostname="edge-a2",
                         inference_address="10.0.0.8:50061", node_id=node_id)
    assert again.node_id == node_id and again.reenrolled and again.credential != old
    with pytest.raises(Unauthenticated, match="not recognized"):
        store.authenticate(old)
    assert store.authenticate(again.credential) == node_id
    [node] = store.nodes()
    assert (node.hostname, node.inference_address) == ("edge-a2", "10.0.0.8:50061")
    assert node.enrolled_at == enrolled_at and node.last_enrolled_at == clock.now


def test_secrets_are_stored_only_as_hashes(store: ControlStore, tmp_path: Path) -> None:
    token = store.create_join_token(60)
    credential = store.enroll(token, hostname="edge-a", inference_address=ADDRESS).credential
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("control.db*"))
    # The shared parser, not rsplit("_"): the urlsafe secret may itself contain '_'.
    parsed = parse_token(JOIN_TOKEN_PREFIX, token)
    assert parsed is not None
    for secret in (parsed[1], credential):
        assert secret.encode() not in raw


def test_authenticate_refuses_missing_and_malformed(store: ControlStore) -> None:
    for bad in ("", "Bearer x", "tdmn_short"):
        with pytest.raises(Unauthenticated, match="missing or malformed"):
            store.authenticate(bad)


# --- heartbeats, versions, rollouts ------------------------------------------------------------


def test_heartbeat_records_state_and_answers_the_desired_version(
        store: ControlStore, clock: Clock) -> None:
    a, _ = enroll(store)
    assert store.heartbeat(a, served_version="") == ""
    store.add_version(version("v1"))  # the first version becomes the fleet's
    assert store.current_version() == "v1"
    clock.now += 5
    desired = store.heartbeat(a, served_version="local-1", loading_version="v1",
                              load=NodeLoad(2, 1, 350.5), healthy=True)
    assert desired == "v1"
    node = store.node(a)
    assert (node.served_version, node.loading_version, node.load) == (
        "local-1", "v1", NodeLoad(2, 1, 350.5))
    assert node.last_heartbeat == clock.now and node.is_live(clock.now + 1, 15)
    assert not node.is_live(clock.now + 16, 15)
    with pytest.raises(InvalidRequest, match="tokens_per_second"):
        store.heartbeat(a, served_version="v1", load=NodeLoad(0, 0, float("nan")))
    with pytest.raises(NotFound):
        store.heartbeat("edge-gone", served_version="v1")


def test_rollout_moves_canaries_then_the_fleet(store: ControlStore) -> None:
    a, _ = enroll(store)
    b, _ = enroll(store, host="edge-b")
    for v in ("v1", "v2", "v3"):
        store.add_version(version(v))
    assert store.current_version() == "v1"  # later versions wait for a rollout

    r = store.start_rollout("v2", [a], fraction=0.5)
    assert (r.state, r.canary_node_ids, r.previous_version) == ("canary", (a,), "v1")
    assert store.active_rollout() == r
    assert (store.heartbeat(a, served_version="v1"), store.heartbeat(b, served_version="v1")) \
        == ("v2", "v1")
    done = store.decide_rollout(r.rollout_id, "promoted", "canary held")
    assert done.state == "promoted" and done.decided_at is not None
    assert store.current_version() == "v2" and store.active_rollout() is None
    assert {store.heartbeat(n, served_version="v2") for n in (a, b)} == {"v2"}
    assert store.node(a).target_version is None

    bad = store.start_rollout("v3", [b], fraction=0.5)
    assert store.heartbeat(b, served_version="v2") == "v3"
    store.decide_rollout(bad.rollout_id, "rolled_back", "error rate 12% vs 1%")
    assert {store.heartbeat(n, served_version="v2") for n in (a, b)} == {"v2"}
    assert [x.state for x in store.rollouts()] == ["promoted", "rolled_back"]


def test_rollout_refusals_change_nothing(store: ControlStore) -> None:
    a, _ = enroll(store)
    store.add_version(version("v1"))
    store.add_version(version("v2"))
    with pytest.raises(WrongState, match="already the fleet's current version"):
        store.start_rollout("v1", [a], 0.2)
    with pytest.raises(NotFound, match="canary node edge-nope is not enrolled"):
        store.start_rollout("v2", [a, "edge-nope"], 0.2)
    # The failed start rolled back whole: no rollout row, no canary target.
    assert store.rollouts() == [] and store.node(a).target_version is None
    with pytest.raises(NotFound, match="not published"):
        store.start_rollout("v9", [a], 0.2)
    with pytest.raises(InvalidRequest, match="fraction"):
        store.start_rollout("v2", [a], 0.0)
    r = store.start_rollout("v2", [a], 0.2)
    with pytest.raises(WrongState, match="still in canary"):
        store.start_rollout("v2", [a], 0.2)
    store.decide_rollout(r.rollout_id, "aborted", "operator")
    with pytest.raises(WrongState, match="already aborted"):
        store.decide_rollout(r.rollout_id, "promoted")
    assert store.heartbeat(a, served_version="v1") == "v1"


def test_add_version_is_idempotent_and_refuses_other_content(store: ControlStore) -> None:
    first, created = store.add_version(version("v1"))
    assert created and first.created_at > 0
    again, created = store.add_version(version("v1"))
    assert not created and again == first
    with pytest.raises(WrongState, match="already published with other files"):
        store.add_version(version("v1", b"other"))
    with pytest.raises(InvalidRequest, match="model version must be"):
        store.add_version(version("../v2"))
    with pytest.raises(NotFound):
        store.version("v2")
    assert [v.version for v in store.versions()] == ["v1"]


# --- outcomes ----------------------------------------------------------------------------------


def test_outcomes_are_stored_per_node_and_version(store: ControlStore, clock: Clock) -> None:
    a, _ = enroll(store)
    b, _ = enroll(store, host="edge-b")
    store.record_outcomes(a, 60.0, [VersionOutcome("v1", 100, 1, 5, 20.0, 80.0),
                                    VersionOutcome("v2", 10, 0, 0, 25.0, 90.0)])
    clock.now += 60
    store.record_outcomes(b, 60.0, [VersionOutcome("v1", 50, 2, 1, 30.0, 95.0)])
    assert [(o.node_id, o.requests) for o in store.outcomes(version="v1")] == [(a, 100), (b, 50)]
    assert [o.version for o in store.outcomes(node_ids=[a])] == ["v1", "v2"]
    assert [o.node_id for o in store.outcomes(since=clock.now)] == [b]
    assert store.outcomes(node_ids=[]) == []
    with pytest.raises(InvalidRequest, match="can't exceed its requests"):
        store.record_outcomes(a, 60.0, [VersionOutcome("v1", 1, 2)])
    with pytest.raises(InvalidRequest, match="window_s"):
        store.record_outcomes(a, 0.0, [VersionOutcome("v1", 1)])
    assert len(store.outcomes()) == 3


# --- durability --------------------------------------------------------------------------------


def test_state_survives_a_reopen(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "control.db"
    with ControlStore(path, clock=clock) as store:
        a, credential = enroll(store)
        spent = store.create_join_token(60)
        store.enroll(spent, hostname="edge-b", inference_address=ADDRESS)
        store.add_version(version("v1"))
        store.add_version(version("v2"))
        store.start_rollout("v2", [a], 0.5)
        store.record_outcomes(a, 30.0, [VersionOutcome("v2", 7)])
    with ControlStore(path, clock=clock) as store:
        assert store.authenticate(credential) == a
        assert store.heartbeat(a, served_version="v1") == "v2"
        assert store.current_version() == "v1" and store.active_rollout() is not None
        assert [o.requests for o in store.outcomes()] == [7]
        with pytest.raises(Unauthenticated, match="already used"):
            store.enroll(spent, hostname="edge-c", inference_address=ADDRESS)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    ControlStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer than this tandem understands"):
        ControlStore(path)
