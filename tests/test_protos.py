"""The committed gRPC modules are what `make protos` generates from the .proto files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "tandem" / "v1"


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    work = tmp_path / "protos" / "tandem" / "v1"
    work.mkdir(parents=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    assert protos, "no .proto files found"
    for p in protos:
        shutil.copy(p, work / p.name)
    args = ["protoc", "-I", str(tmp_path), f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}"]
    rc = protoc.main(args + [str(work / p.name) for p in protos])
    assert rc == 0, "protoc failed"
    generated = sorted(f.name for f in work.iterdir() if f.suffix in (".py", ".pyi"))
    committed = sorted(
        f.name for f in PROTO_DIR.iterdir() if "_pb2" in f.name and f.suffix in (".py", ".pyi")
    )
    assert generated == committed, "generated module set differs: run `make protos`"
    stale = [n for n in generated if (work / n).read_bytes() != (PROTO_DIR / n).read_bytes()]
    assert not stale, f"stale generated modules {stale}: run `make protos` and commit them"


def test_service_names_are_versioned() -> None:
    from protos.tandem.v1 import control_pb2, inference_pb2

    assert inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name == "tandem.v1.Inference"
    assert control_pb2.DESCRIPTOR.services_by_name["Control"].full_name == "tandem.v1.Control"
    methods = {m.name for m in inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods}
    assert methods == {"Generate", "GenerateStream", "Score", "Info"}
    req = inference_pb2.GenerateRequest(prompt="hi", route=inference_pb2.ROUTE_EDGE)
    # Optional fields tell "unset" from an explicit zero (max_tokens 0 is an error, unset is not).
    assert not req.HasField("max_tokens") and not req.HasField("temperature")
