"""Edge artifact end to end on micro models: export (fp32/int8/int4), manifest, EdgeRuntime.

The micro models, tokenizer and artifacts come from tests/conftest.py: our own tokenizer,
Transformer and training loop, briefly trained on the demo corpus. The reference for every
runtime check is our Transformer loaded from the checkpoint that was exported.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime_genai as og
import pytest
import torch

from edge import runtime as edge_runtime
from edge.runtime import EdgeRuntime
from model.checkpoint import load_checkpoint
from model.export import ExportError, export_edge_artifact
from model.generate import generate_tokens, sequence_nll
from model.manifest import (
    MANIFEST_NAME,
    ArtifactIntegrityError,
    FileEntry,
    Manifest,
    build_manifest,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from model.train import evaluate_nll
from model.transformer import Transformer

if TYPE_CHECKING:
    from conftest import MicroArtifacts, MicroData


@pytest.fixture(scope="module")
def runtimes(micro_artifacts: MicroArtifacts) -> dict[tuple[str, str], EdgeRuntime]:
    return {
        key: EdgeRuntime.load(micro_artifacts.path(*key), threads=1)
        for key in micro_artifacts.manifests
    }


@pytest.fixture(scope="module")
def torch_models(micro_artifacts: MicroArtifacts) -> dict[str, Transformer]:
    """Our Transformer read back from each exported checkpoint, in fp32."""
    return {
        arch: load_checkpoint(path, dtype="float32")
        for arch, path in micro_artifacts.checkpoints.items()
    }


@pytest.fixture(scope="module")
def heldout(micro_data: MicroData) -> list[int]:
    """The held-out split, cut to whole windows of 255 predictions (see the perplexity test)."""
    ids = micro_data.heldout.tolist()
    return ids[: (len(ids) - 1) // 255 * 255 + 1]


# --- export ------------------------------------------------------------------------------------


def test_bad_quantization_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantization must be one of fp32, int8, int4"):
        export_edge_artifact(tmp_path, tmp_path / "out", "int3", "micro-1")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_artifact_is_complete_and_replaces_old(
    micro_artifacts: MicroArtifacts,
    micro_data: MicroData,
    runtimes: dict[tuple[str, str], EdgeRuntime],
) -> None:
    base = micro_artifacts.base_version
    for (arch, q), manifest in micro_artifacts.manifests.items():
        root = micro_artifacts.path(arch, q)
        names = {f.path for f in manifest.files}
        assert {
            "model.onnx",
            "model.onnx.data",
            "genai_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        } <= names
        assert MANIFEST_NAME not in names
        assert read_manifest(root) == manifest
        assert (root / MANIFEST_NAME).read_bytes() == manifest.to_json_bytes()
        verify_artifact(root, manifest)
        assert (manifest.quantization, manifest.base_version) == (q, base)
        assert manifest.model_version == f"{base}-{q}"
        assert "onnxruntime-genai" in manifest.created_by
        # The checkpoint's tokenizer and special ids reach the artifact unchanged.
        ckpt = micro_artifacts.checkpoints[arch]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (root / name).read_bytes() == (ckpt / name).read_bytes(), name
        config = json.loads((ckpt / "config.json").read_text())
        genai = json.loads((root / "genai_config.json").read_text())["model"]
        assert (genai["bos_token_id"], genai["eos_token_id"]) == (
            config["bos_token_id"],
            config["eos_token_id"],
        )
    assert not (micro_artifacts.path("llama", "int8") / "stale.bin").exists()
    assert sorted(p.name for p in micro_artifacts.root.iterdir()) == sorted(
        f"{a}-{q}" for a, q in micro_artifacts.manifests
    ), "export left temporary directories behind"
    rt = runtimes[("llama", "int4")]
    assert (rt.model_version, rt.quantization) == (f"{base}-int4", "int4")
    tok = micro_data.tokenizer
    assert (rt.vocab_size, rt.max_context) == (tok.vocab_size, 256)
    assert (rt.bos_token_id, rt.eos_token_id) == (tok.bos_id, tok.eos_id)


@pytest.mark.slow
def test_builder_failure_leaves_nothing(
    micro_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = shutil.copytree(micro_checkpoint, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with (
        caplog.at_level(logging.ERROR, logger="model.export"),
        pytest.raises(ExportError, match="model builder failed"),
    ):
        export_edge_artifact(broken, tmp_path / "out" / "edge", "int4", "micro-1")
    assert "stderr" in caplog.text
    assert list((tmp_path / "out").iterdir()) == []


# --- runtime -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_greedy_and_score_match_torch(
    runtimes: dict[tuple[str, str], EdgeRuntime],
    torch_models: dict[str, Transformer],
    heldout: list[int],
    arch: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, model = runtimes[(arch, "fp32")], torch_models[arch]
    compared = 0
    # A micro model often ends a sentence soon: several prompts give a long comparison.
    for start in range(0, len(heldout), len(heldout) // 6):
        prompt = heldout[start : start + 16]
        expected = list(generate_tokens(model, prompt, 32, eos_id=rt.eos_token_id))
        # Our reference yields EOS and stops; the runtime stops before it.
        if expected[-1] == rt.eos_token_id:
            expected.pop()
        assert list(rt.generate(prompt, max_new_tokens=32)) == expected, f"prompt at {start}"
        compared += len(expected)
    assert compared >= 64, f"only {compared} tokens compared"
    ids = heldout[:128]
    total, count = sequence_nll(model, ids)
    assert rt.score(ids) == pytest.approx(total / count, rel=1e-4)
    # Prefilled in chunks (never the whole prompt's logits at once), the score is the same.
    monkeypatch.setattr(edge_runtime, "SCORE_CHUNK", 48)
    assert rt.score(ids) == pytest.approx(total / count, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_decode_steps_match_torch_teacher_forced(
    micro_artifacts: MicroArtifacts,
    torch_models: dict[str, Transformer],
    heldout: list[int],
    arch: str,
) -> None:
    # Greedy runs of a micro model soon repeat one token, which would hide a wrong position
    # in the KV cache; feeding held-out text one token at a time checks every decode step.
    ids = heldout[1000:1096]
    with torch.inference_mode():
        expected = torch_models[arch](torch.tensor([ids]))[0].numpy()  # (T, V), no cache
    model = og.Model(str(micro_artifacts.path(arch, "fp32")))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids), batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids[:16]], dtype=np.int32))
    for t in range(16, len(ids)):
        generator.append_tokens(np.array([[ids[t]]], dtype=np.int32))
        logits = generator.get_output("logits")[0, -1]
        np.testing.assert_allclose(logits, expected[t], atol=1e-4, err_msg=f"step {t}")


@pytest.fixture(scope="module")
def llama_perplexity(
    runtimes: dict[tuple[str, str], EdgeRuntime], heldout: list[int]
) -> dict[str, float]:
    """Held-out perplexity of each Llama artifact, by quantization."""
    return {q: rt.perplexity(heldout) for (arch, q), rt in runtimes.items() if arch == "llama"}


@pytest.mark.slow
def test_fp32_perplexity_matches_torch(
    llama_perplexity: dict[str, float], torch_models: dict[str, Transformer], heldout: list[int]
) -> None:
    # The runtime's windows of max_context (256) tokens overlap by one, so each scores 255
    # predictions: evaluate_nll's windows of 255, and `heldout` holds whole windows.
    nll = evaluate_nll(torch_models["llama"], torch.tensor(heldout), seq_len=255)
    assert llama_perplexity["fp32"] == pytest.approx(math.exp(nll), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_perplexity_within_5_percent(
    llama_perplexity: dict[str, float], quantization: str
) -> None:
    fp32 = llama_perplexity["fp32"]
    assert fp32 < 150, f"the micro model did not learn (perplexity {fp32:.1f}): 5% means nothing"
    assert llama_perplexity[quantization] == pytest.approx(fp32, rel=0.05)


@pytest.mark.slow
def test_sampling_is_seeded_and_arguments_are_checked(
    runtimes: dict[tuple[str, str], EdgeRuntime], heldout: list[int]
) -> None:
    rt = runtimes[("llama", "int4")]
    prompt = heldout[100:108]
    first = list(rt.generate(prompt, 24, temperature=0.9, top_k=40, top_p=0.95, seed=7))
    assert first == list(rt.generate(prompt, 24, temperature=0.9, top_k=40, top_p=0.95, seed=7))
    assert 0 < len(first) <= 24
    assert all(0 <= t < rt.vocab_size and t != rt.eos_token_id for t in first)
    with pytest.raises(ValueError, match="context"):
        rt.generate(prompt, rt.max_context)
    with pytest.raises(ValueError, match="temperature"):
        rt.generate(prompt, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="token ids must be in"):
        rt.score([1, rt.vocab_size])
    with pytest.raises(ValueError, match="at least 2"):
        rt.score([1])


@pytest.mark.slow
def test_load_refuses_a_tampered_artifact(micro_artifacts: MicroArtifacts, tmp_path: Path) -> None:
    copy = shutil.copytree(micro_artifacts.path("llama", "int4"), tmp_path / "a")
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"changed: model\.onnx\.data"):
        EdgeRuntime.load(copy)


def test_edge_runtime_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, edge.runtime; bad = {'torch', 'transformers'} & set(sys.modules); "
        "sys.exit(f'edge.runtime imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- manifest ----------------------------------------------------------------------------------


def _fake_artifact(root: Path) -> Manifest:
    (root / "sub").mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"graph")
    (root / "model.onnx.data").write_bytes(bytes(range(256)) * 100)
    (root / "sub" / "tokenizer.json").write_text("{}")
    manifest = build_manifest(
        root, model_version="m-int4", base_version="m", quantization="int4", created_by="test"
    )
    write_manifest(root, manifest)
    return manifest


def test_manifest_is_canonical_and_round_trips(tmp_path: Path) -> None:
    manifest = _fake_artifact(tmp_path)
    assert [f.path for f in manifest.files] == [
        "model.onnx",
        "model.onnx.data",
        "sub/tokenizer.json",
    ]
    data = manifest.to_json_bytes()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert read_manifest(tmp_path) == manifest
    assert Manifest.from_json_bytes(data).to_json_bytes() == data
    # The same files listed in another order give the same bytes (what gets signed).
    shuffled = Manifest(**{**manifest.__dict__, "files": manifest.files[::-1]})
    assert shuffled.to_json_bytes() == data
    verify_artifact(tmp_path, manifest)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda r: (r / "model.onnx").write_bytes(b"grapH"), r"changed: model\.onnx\b"),
        (lambda r: (r / "sub" / "tokenizer.json").unlink(), r"missing: sub/tokenizer\.json"),
        (lambda r: (r / "extra.bin").write_bytes(b""), r"unexpected: extra\.bin"),
    ],
    ids=["changed-byte", "missing", "extra"],
)
def test_verify_artifact_names_each_problem(tmp_path: Path, tamper, expected: str) -> None:
    manifest = _fake_artifact(tmp_path)
    tamper(tmp_path)
    with pytest.raises(ArtifactIntegrityError, match=expected):
        verify_artifact(tmp_path, manifest)


def test_verify_artifact_reports_all_problems_at_once(tmp_path: Path) -> None:
    manifest = _fake_artifact(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"grapH")
    (tmp_path / "sub" / "tokenizer.json").unlink()
    (tmp_path / "sub" / "extra.txt").write_text("x")
    with pytest.raises(ArtifactIntegrityError) as err:
        verify_artifact(tmp_path, manifest)
    assert (err.value.missing, err.value.changed, err.value.unexpected) == (
        ("sub/tokenizer.json",),
        ("model.onnx",),
        ("sub/extra.txt",),
    )


@pytest.mark.parametrize("path", ["../evil", "/etc/passwd", "a/../../b", "a\\b", "./a"])
def test_manifest_rejects_paths_outside_the_artifact(path: str) -> None:
    with pytest.raises(ValueError, match="relative POSIX path"):
        Manifest(
            format="onnxruntime-genai",
            format_version=1,
            model_version="m",
            base_version="m",
            quantization="fp32",
            created_by="t",
            files=(FileEntry(path=path, size=0, sha256="0" * 64),),
        )


def test_read_manifest_rejects_garbage(tmp_path: Path) -> None:
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_bytes(b'{"format": "onnxruntime-genai"}')
    with pytest.raises(ArtifactIntegrityError, match="malformed manifest"):
        read_manifest(tmp_path)
