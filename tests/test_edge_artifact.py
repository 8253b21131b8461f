"""Edge artifact end to end on micro models: export (fp32/int8/int4), manifest, EdgeRuntime.

The micro models are Hugging Face Llama and Qwen2 (q/k/v bias) decoders, 2 layers of width 64,
briefly trained on standard-library docstrings so that greedy decoding has clear winners and
perplexity means something. The reference is the PyTorch model that was exported.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from edge.runtime import EdgeRuntime
from model.export import ExportError, export_edge_artifact
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

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TRAIN_MODULES = (
    "json",
    "functools",
    "itertools",
    "collections",
    "pathlib",
    "os",
    "re",
    "enum",
    "argparse",
    "logging",
    "subprocess",
    "string",
    "textwrap",
)
HELD_OUT_MODULES = ("shutil", "heapq", "bisect", "fnmatch", "glob")
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
EOS = 2
MICRO = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
    tie_word_embeddings=False,
)
BASE_VERSION = "micro-1"


def _docstrings(modules: tuple[str, ...]) -> str:
    out = []
    for name in modules:
        module = importlib.import_module(name)
        out.append(inspect.getdoc(module) or "")
        for key, value in sorted(vars(module).items()):
            if not key.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value)):
                out.append(inspect.getdoc(value) or "")
    return "\n\n".join(d for d in out if d)


def _train_tokenizer(text: str) -> tokenizers.Tokenizer:
    # Stand-in for model/tokenizer.py: a byte-level BPE with the same special tokens.
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MICRO["vocab_size"],
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return tok


def _train(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.nn.Module:
    """A few hundred steps of next-token prediction on random windows."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 64, 16
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def corpus() -> dict:
    train_text = _docstrings(TRAIN_MODULES)
    tok = _train_tokenizer(train_text)
    return {
        "tokenizer": tok,
        "train": torch.tensor(tok.encode(train_text).ids),
        "held_out": tok.encode(_docstrings(HELD_OUT_MODULES)).ids[:256],
    }


def _save_checkpoint(model: torch.nn.Module, tok: tokenizers.Tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2], pad_token=SPECIALS[0]
    )
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def micro(corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Trained Llama and Qwen2 micro models, saved as checkpoints, and their artifacts."""
    torch.manual_seed(0)
    llama = _train(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**MICRO)), corpus["train"], steps=300
    )
    torch.manual_seed(1)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MICRO))
    with torch.no_grad():  # random init leaves biases at zero; make q/k/v bias matter
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    qwen = _train(qwen, corpus["train"], steps=100)
    root = tmp_path_factory.mktemp("edge")
    ckpt = {
        "llama": _save_checkpoint(llama, corpus["tokenizer"], root / "llama"),
        "qwen2": _save_checkpoint(qwen, corpus["tokenizer"], root / "qwen2"),
    }
    out = root / "artifacts"
    # A stale artifact where int8 goes: export must replace it whole.
    (out / "llama-int8").mkdir(parents=True)
    (out / "llama-int8" / "stale.bin").write_bytes(b"old")
    jobs = [("llama", "fp32"), ("llama", "int8"), ("llama", "int4"), ("qwen2", "fp32")]
    # Each export is a builder subprocess: two at a time use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            (arch, q): pool.submit(
                export_edge_artifact, ckpt[arch], out / f"{arch}-{q}", q, BASE_VERSION
            )
            for arch, q in jobs
        }
        manifests = {key: f.result() for key, f in futures.items()}
    return {
        "torch": {"llama": llama, "qwen2": qwen},
        "checkpoints": ckpt,
        "out": out,
        "manifests": manifests,
        "runtimes": {key: EdgeRuntime.load(out / f"{key[0]}-{key[1]}", threads=1) for key in jobs},
    }


def _torch_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation: no KV cache, so the ONNX past path is checked."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == EOS:
                break
            ids.append(nxt)
    return ids[len(prompt) :]


def _torch_nll(model: torch.nn.Module, ids: list[int]) -> float:
    with torch.no_grad():
        x = torch.tensor([ids])
        return float(model(input_ids=x, labels=x).loss)


# --- export ------------------------------------------------------------------------------------


def test_bad_quantization_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantization must be one of fp32, int8, int4"):
        export_edge_artifact(tmp_path, tmp_path / "out", "int3", BASE_VERSION)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_artifact_is_complete_and_replaces_old(micro: dict) -> None:
    out: Path = micro["out"]
    for (arch, q), manifest in micro["manifests"].items():
        root = out / f"{arch}-{q}"
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
        assert (manifest.quantization, manifest.base_version) == (q, BASE_VERSION)
        assert manifest.model_version == f"{BASE_VERSION}-{q}"
        assert "onnxruntime-genai" in manifest.created_by
        # The checkpoint's tokenizer and special ids reach the artifact unchanged.
        ckpt = micro["checkpoints"][arch]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (root / name).read_bytes() == (ckpt / name).read_bytes(), name
        config = json.loads((ckpt / "config.json").read_text())
        genai = json.loads((root / "genai_config.json").read_text())["model"]
        assert (genai["bos_token_id"], genai["eos_token_id"]) == (
            config["bos_token_id"],
            config["eos_token_id"],
        )
    assert not (out / "llama-int8" / "stale.bin").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{a}-{q}" for a, q in micro["manifests"]
    ), "export left temporary directories behind"
    rt = micro["runtimes"][("llama", "int4")]
    assert (rt.model_version, rt.quantization) == (f"{BASE_VERSION}-int4", "int4")
    assert (rt.vocab_size, rt.max_context, rt.eos_token_id) == (512, 256, EOS)


@pytest.mark.slow
def test_builder_failure_leaves_nothing(
    micro: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = shutil.copytree(micro["checkpoints"]["llama"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with (
        caplog.at_level(logging.ERROR, logger="model.export"),
        pytest.raises(ExportError, match="model builder failed"),
    ):
        export_edge_artifact(broken, tmp_path / "out" / "edge", "int4", BASE_VERSION)
    assert "stderr" in caplog.text
    assert list((tmp_path / "out").iterdir()) == []


# --- runtime -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_greedy_and_score_match_torch(micro: dict, corpus: dict, arch: str) -> None:
    rt: EdgeRuntime = micro["runtimes"][(arch, "fp32")]
    model = micro["torch"][arch]
    prompt = corpus["held_out"][:16]
    expected = _torch_greedy(model, prompt, 32)
    assert len(expected) == 32  # the micro model never saw EOS: a full-length comparison
    assert list(rt.generate(prompt, max_new_tokens=32)) == expected
    ids = corpus["held_out"][:128]
    assert rt.score(ids) == pytest.approx(_torch_nll(model, ids), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_perplexity_within_5_percent(
    micro: dict, corpus: dict, quantization: str
) -> None:
    held_out = corpus["held_out"]
    fp32 = micro["runtimes"][("llama", "fp32")].perplexity(held_out)
    quantized = micro["runtimes"][("llama", quantization)].perplexity(held_out)
    assert fp32 == pytest.approx(
        torch.exp(torch.tensor(_torch_nll(micro["torch"]["llama"], held_out))).item(), rel=1e-4
    )
    assert quantized == pytest.approx(fp32, rel=0.05)


@pytest.mark.slow
def test_sampling_is_seeded_and_arguments_are_checked(micro: dict, corpus: dict) -> None:
    rt: EdgeRuntime = micro["runtimes"][("llama", "int4")]
    prompt = corpus["held_out"][:8]
    first = list(rt.generate(prompt, 24, temperature=0.9, top_k=40, top_p=0.95, seed=7))
    assert first == list(rt.generate(prompt, 24, temperature=0.9, top_k=40, top_p=0.95, seed=7))
    assert 0 < len(first) <= 24 and all(0 <= t < rt.vocab_size and t != EOS for t in first)
    # Windows cover a text longer than the context.
    assert rt.perplexity(corpus["held_out"] * 3) > 1.0
    with pytest.raises(ValueError, match="context"):
        rt.generate(prompt, rt.max_context)
    with pytest.raises(ValueError, match="temperature"):
        rt.generate(prompt, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="token ids must be in"):
        rt.score([1, rt.vocab_size])
    with pytest.raises(ValueError, match="at least 2"):
        rt.score([1])


@pytest.mark.slow
def test_load_refuses_a_tampered_artifact(micro: dict, tmp_path: Path) -> None:
    copy = shutil.copytree(micro["out"] / "llama-int4", tmp_path / "a")
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
