"""The content-addressed artifact store, manifest signing and publishing, on small artifacts
built here (real manifests, synthetic files): no export, no server.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from control.artifacts import ArtifactStore
from control.datadir import KEY_NAME, ControlData
from control.publish import publish_model
from core.errors import DataLoss, InvalidRequest, NotFound, OutOfRange, WrongState
from model.manifest import (
    ArtifactIntegrityError,
    Manifest,
    build_manifest,
    write_manifest,
)
from model.signing import SignatureError, SigningKey, public_key_id, verify_manifest


def make_artifact(root: Path, version: str, files: dict[str, bytes]) -> Manifest:
    """An artifact directory holding ``files`` and its manifest."""
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = build_manifest(root, model_version=version, base_version="demo-edge-1",
                              quantization="int4", created_by="tests")
    write_manifest(root, manifest)
    return manifest


FILES = {"model.onnx": b"graph" * 100, "model.onnx.data": os.urandom(300_000),
         "tokenizer.json": b'{"vocab": {}}', "sub/extra.bin": b""}


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    make_artifact(tmp_path / "art-v1", "v1", FILES)
    return tmp_path / "art-v1"


# --- artifact store ----------------------------------------------------------------------------


def test_put_dir_stores_blobs_by_content_and_reads_from_offsets(
        tmp_path: Path, artifact: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    manifest = store.put_dir(artifact)
    assert store.versions() == ["v1"] and store.manifest(manifest.model_version) == manifest
    assert store.manifest_bytes("v1") == (artifact / "manifest.json").read_bytes()
    for entry in manifest.files:
        blob = store.blob_path(entry.sha256)
        assert blob.read_bytes() == FILES[entry.path]
        assert not stat.S_IMODE(blob.stat().st_mode) & 0o222  # blobs are read-only
    with store.open("v1", "model.onnx.data", 1000) as reader:
        assert reader.total_size == 300_000
        data = reader.read(100_000) + reader.read(1 << 20) + reader.read(10)
    assert data == FILES["model.onnx.data"][1000:]
    with store.open("v1", "model.onnx", 500) as reader:
        assert reader.read(10) == b""  # offset == size: nothing left, not an error
    assert list(store.tmp.iterdir()) == []


def test_versions_share_blobs(tmp_path: Path, artifact: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    store.put_dir(artifact)
    make_artifact(tmp_path / "art-v2", "v2", {**FILES, "tokenizer.json": b'{"vocab": {"a": 1}}'})
    store.put_dir(tmp_path / "art-v2")
    blobs = [p for p in store.blobs.rglob("*") if p.is_file()]
    assert len(blobs) == len(FILES) + 1  # only the changed file was stored again


def test_put_dir_repairs_a_damaged_blob(tmp_path: Path, artifact: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    manifest = store.put_dir(artifact)
    entry = next(f for f in manifest.files if f.path == "model.onnx.data")
    blob = store.blob_path(entry.sha256)
    blob.chmod(0o644)
    damaged = bytearray(blob.read_bytes())
    damaged[7] ^= 0x01  # same size, one bit off
    blob.write_bytes(bytes(damaged))
    store.put_dir(artifact)
    assert blob.read_bytes() == FILES["model.onnx.data"]


def test_open_refusals(tmp_path: Path, artifact: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    manifest = store.put_dir(artifact)
    with pytest.raises(NotFound):
        store.open("v9", "model.onnx")
    with pytest.raises(InvalidRequest, match="is not a file of model version v1"):
        store.open("v1", "../../control.db")
    with pytest.raises(InvalidRequest, match="offset must be >= 0"):
        store.open("v1", "model.onnx", -1)
    with pytest.raises(OutOfRange, match="past the end"):
        store.open("v1", "model.onnx", 501)
    with pytest.raises(InvalidRequest):
        store.manifest("../v1")
    entry = next(f for f in manifest.files if f.path == "tokenizer.json")
    blob = store.blob_path(entry.sha256)
    blob.chmod(0o644)
    blob.write_bytes(b"short")
    with pytest.raises(DataLoss, match="damaged"):
        store.open("v1", "tokenizer.json")
    blob.unlink()
    with pytest.raises(DataLoss, match=r"lost tokenizer\.json"):
        store.open("v1", "tokenizer.json")


def test_a_file_changed_after_its_manifest_is_never_stored(
        tmp_path: Path, artifact: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    data = bytearray((artifact / "model.onnx.data").read_bytes())
    data[1234] ^= 0xFF
    (artifact / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError) as err:
        store.put_dir(artifact)
    assert err.value.changed == ("model.onnx.data",)
    assert store.versions() == [] and list(store.tmp.iterdir()) == []
    stored = {p.name for p in store.blobs.rglob("*") if p.is_file()}
    assert hashlib.sha256(bytes(data)).hexdigest() not in stored


# --- signing -----------------------------------------------------------------------------------


def test_signing_key_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    key = SigningKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SigningKey.load_or_create(path)
    assert again.key_id == key.key_id and again.public_pem == key.public_pem
    assert key.key_id.startswith("ed25519:") and public_key_id(key.public_pem) == key.key_id
    assert [p.name for p in path.parent.iterdir()] == ["signing.pem"]


def test_signature_verifies_and_any_flipped_byte_fails(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path / "k.pem")
    manifest = b'{"files":[],"model_version":"v1"}'
    signature = key.sign(manifest)
    verify_manifest(key.public_pem, manifest, signature, key_id=key.key_id)
    for i in (0, len(manifest) // 2, len(manifest) - 1):
        tampered = bytearray(manifest)
        tampered[i] ^= 0x01
        with pytest.raises(SignatureError, match="does not verify"):
            verify_manifest(key.public_pem, bytes(tampered), signature)
    bad_sig = bytearray(signature)
    bad_sig[10] ^= 0x80
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(key.public_pem, manifest, bytes(bad_sig))
    with pytest.raises(SignatureError, match="must be 64 bytes"):
        verify_manifest(key.public_pem, manifest, signature[:-1])
    other = SigningKey.generate()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(other.public_pem, manifest, signature)
    with pytest.raises(SignatureError, match=f"signed by key {key.key_id}"):
        verify_manifest(other.public_pem, manifest, signature, key_id=key.key_id)
    with pytest.raises(SignatureError, match="not a readable PEM"):
        verify_manifest("not a key", manifest, signature)


def test_signing_imports_neither_torch_nor_grpc() -> None:
    # An edge node verifies manifests with onnxruntime alone installed beside cryptography.
    code = ("import sys, model.signing; "
            "bad = [m for m in ('torch', 'grpc', 'sqlite3', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- publish -----------------------------------------------------------------------------------


def test_publish_stores_signs_and_registers(tmp_path: Path, artifact: Path) -> None:
    record, created = publish_model(tmp_path / "control", artifact, notes="first")
    assert created and record.version == "v1" and record.notes == "first"
    with ControlData.open(tmp_path / "control") as data:
        assert stat.S_IMODE((tmp_path / "control" / KEY_NAME).stat().st_mode) == 0o600
        assert data.store.current_version() == "v1"  # the first version becomes current
        assert record.manifest_json == data.artifacts.manifest_bytes("v1")
        assert record.manifest_json == (artifact / "manifest.json").read_bytes()
        verify_manifest(data.key.public_pem, record.manifest_json, record.signature,
                        key_id=record.key_id)
        again, created = publish_model(data, artifact)
        assert not created and again == record
        renamed, created = publish_model(data, artifact, model_version="v1-again")
        assert created and renamed.parent_version == "v1"
        assert Manifest.from_json_bytes(renamed.manifest_json).model_version == "v1-again"
        assert data.store.current_version() == "v1"  # later versions wait for a rollout
        publish_model(data, artifact, model_version="v1-again", make_current=True)
        assert data.store.current_version() == "v1-again"


def test_publish_refuses_a_tampered_or_conflicting_artifact(tmp_path: Path) -> None:
    make_artifact(tmp_path / "a", "v1", FILES)
    (tmp_path / "a" / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(ArtifactIntegrityError, match=r"changed: tokenizer\.json"):
        publish_model(tmp_path / "control", tmp_path / "a")
    (tmp_path / "a" / "tokenizer.json").write_bytes(FILES["tokenizer.json"])
    (tmp_path / "a" / "stray.txt").write_text("not listed")
    with pytest.raises(ArtifactIntegrityError, match=r"unexpected: stray\.txt"):
        publish_model(tmp_path / "control", tmp_path / "a")
    with ControlData.open(tmp_path / "control") as data:
        assert data.store.versions() == [] and data.artifacts.versions() == []
    (tmp_path / "a" / "stray.txt").unlink()
    publish_model(tmp_path / "control", tmp_path / "a")
    make_artifact(tmp_path / "b", "v1", {"model.onnx": b"different"})
    with pytest.raises(WrongState, match="already published with other files"):
        publish_model(tmp_path / "control", tmp_path / "b")
