"""Flower's links over TLS with SuperNode authentication: a SuperLink serving a certificate
from a private CA and accepting only registered SuperNodes, a registered node and the run CLI
that trust only that CA, a federated round through them, and an unregistered node kept out."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.launcher import free_port
from federation.processes import (
    FlowerTls,
    SuperLinkConfig,
    SuperNodeConfig,
    http_healthy,
    superlink_process,
    supernode_process,
)
from federation.recording import STATUS_FILE
from federation.runner import FlowerCli, LinkInfo
from federation.sitedata import write_corpus_site
from model.demo import DEMO_DIR

pytestmark = pytest.mark.slow


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_tls(root: Path) -> FlowerTls:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tandem test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    raw = serialization.Encoding.PEM
    return FlowerTls(
        ca_cert=_pem(root / "ca.pem", ca.public_bytes(raw)),
        server_cert=_pem(root / "server.pem", cert.public_bytes(raw)),
        server_key=_pem(root / "server.key", key.private_bytes(
            raw, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())))


def node_key(root: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH ECDSA key pair, as `ssh-keygen -t ecdsa` makes: (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = _pem(root / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = _pem(root / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def test_a_round_over_tls_with_authenticated_supernodes(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    tls = FlowerTls(ca_cert=tls.ca_cert, server_cert=tls.server_cert,
                    server_key=tls.server_key, supernode_auth=True)
    link = SuperLinkConfig(state_dir=tmp_path / "link", port=free_port(), tls=tls)
    superlink = superlink_process(link).start()
    node = stranger = None
    try:
        superlink.wait_healthy(60)
        # Plain HTTP fails: the link is TLS only.
        assert not http_healthy(f"http://{link.address}/health")
        cli = FlowerCli(LinkInfo.of(link.address, tls), tmp_path / "cli")
        private, public = node_key(tmp_path, "site")
        cli.register_supernode(public, "site")
        site = write_corpus_site(tmp_path / "site", "text")
        node = supernode_process(SuperNodeConfig(
            superlink=link.address, data_path=site, state_dir=tmp_path / "node",
            port=free_port(), tls=FlowerTls(ca_cert=tls.ca_cert, supernode_key=private))).start()
        node.wait_healthy(60)
        # A node with a key nobody registered is refused.
        stranger_key, _ = node_key(tmp_path, "stranger")
        stranger = supernode_process(SuperNodeConfig(
            superlink=link.address, data_path=site, state_dir=tmp_path / "stranger",
            port=free_port(), tls=FlowerTls(ca_cert=tls.ca_cert, supernode_key=stranger_key)))
        stranger.start()
        run_id = cli.submit({
            "num-server-rounds": 1, "local-steps": 4, "min-nodes": 1, "seq-len": 64,
            "base-checkpoint": str(DEMO_DIR / "edge"), "out-dir": str(tmp_path / "runs")})
        status_path = tmp_path / "runs" / str(run_id) / STATUS_FILE
        end = time.monotonic() + 300
        while not status_path.is_file() or json.loads(
                status_path.read_text())["state"] == "running":
            assert superlink.alive and node.alive, superlink.log_tail() + node.log_tail()
            assert time.monotonic() < end, superlink.log_tail() + node.log_tail()
            time.sleep(1)
        status = json.loads(status_path.read_text())
        assert status["state"] == "finished", status
        train = next(r for r in status["rounds"] if r["round"] == 1)["train"]
        # Only the registered node took part (min-nodes 1; the stranger never joined).
        assert train["answered"] == 1 and train["sampled"] == 1, train
        assert "No SuperNode found with the given public key" in superlink.log_tail(400), \
            superlink.log_tail(60)
    finally:
        for p in (stranger, node):
            if p is not None:
                p.stop()
        superlink.stop()
