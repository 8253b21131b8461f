"""Export quality on real exports of the demo edge model: the manifest's perplexity measurement,
the publish gate, per-model recipes and calibration, and ``tandem model info``.

The shared int4 artifact is conftest's ``demo_edge_int4``; the degraded artifact is a real export
of the same checkpoint with only 2 of its 4 layers (the builder's ``num_hidden_layers``), so it
is far worse than its source, deterministically. Every command runs in-process through
``tandem.cli.main``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.model_slot import read_difficulty_threshold
from edge.runtime import EdgeRuntime
from model.catalog import import_model, model_record
from model.checkpoint import checkpoint_version
from model.demo import DEMO_DIR
from model.export import export_edge_artifact
from model.manifest import Manifest, read_manifest, write_manifest
from model.quality import (
    QUALITY_BUDGET,
    WINDOWS_PER_TEXT,
    heldout_texts,
    perplexity_windows,
)
from model.recipes import QUANT_OPTIONS, RECIPES, Recipe
from model.tokenizer import Tokenizer
from tandem.cli import main

EDGE = DEMO_DIR / "edge"
# Half the layers: a real artifact of the demo checkpoint that is much worse than its source.
TWO_LAYERS = Recipe("int4-two-layers", "int4", (*QUANT_OPTIONS, "num_hidden_layers=2"))


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("degraded") / "demo-edge-two-layers"
    export_edge_artifact(EDGE, out, TWO_LAYERS, checkpoint_version(EDGE))
    return out


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog holding the demo edge checkpoint as model ``demo-edge``."""
    root = tmp_path_factory.mktemp("models")
    import_model(EDGE, "demo-edge", root)
    return root


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- the measurement ---------------------------------------------------------------------------


def test_the_manifest_carries_the_artifacts_perplexity_against_its_source(
    demo_edge_int4: Path,
) -> None:
    manifest = read_manifest(demo_edge_int4)
    q = manifest.quality
    assert q is not None
    assert manifest.recipe == RECIPES["int4"]
    assert q.relative_change == pytest.approx(q.artifact_perplexity / q.source_perplexity - 1,
                                              abs=1e-4)
    assert q.relative_change <= QUALITY_BUDGET  # today's int4 recipe holds for the demo model
    assert [t.text for t in q.texts] == [name for name, _ in heldout_texts()]
    assert all(t.windows == WINDOWS_PER_TEXT for t in q.texts)
    # The windows are deterministic: recut here, they hash the same.
    windows = perplexity_windows(Tokenizer.from_dir(EDGE), 512)
    assert (q.window_tokens, q.tokens_sha256) == (512, windows.sha256)
    # The edge runtime scores the same windows to the same perplexity.
    runtime = EdgeRuntime.load(demo_edge_int4, threads=1)
    total = count = 0.0
    for _, group in windows.texts:
        for ids in group:
            total += runtime.score(ids) * (len(ids) - 1)
            count += len(ids) - 1
    assert math.exp(total / count) == pytest.approx(q.artifact_perplexity, rel=1e-3)
    # Signed bytes carry it, and read back equal.
    assert Manifest.from_json_bytes(manifest.to_json_bytes()) == manifest
    assert b'"quality"' in manifest.to_json_bytes()


def test_a_manifest_from_before_the_measurement_keeps_its_bytes(demo_edge_int4: Path) -> None:
    old = dataclasses.replace(read_manifest(demo_edge_int4), recipe=None, quality=None)
    raw = json.loads(old.to_json_bytes())
    assert "quality" not in raw and "recipe" not in raw
    assert Manifest.from_json_bytes(old.to_json_bytes()).to_json_bytes() == old.to_json_bytes()


def test_a_degraded_export_is_measured_as_such(degraded: Path) -> None:
    manifest = read_manifest(degraded)
    assert manifest.recipe == TWO_LAYERS
    assert manifest.model_version.endswith("-int4-two-layers")
    assert manifest.quality is not None and manifest.quality.relative_change > 0.5


# --- the publish gate --------------------------------------------------------------------------


def test_publish_refuses_a_degraded_artifact_and_the_override_publishes_it(
    degraded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q = read_manifest(degraded).quality
    assert q is not None
    data = str(tmp_path / "control")
    code, _, err = cli(capsys, "model", "publish", str(degraded), "--data-dir", data)
    assert code == 1
    assert f"{q.artifact_perplexity:.2f} vs {q.source_perplexity:.2f}" in err
    assert "3.0% limit" in err and "--allow-degraded" in err
    code, out, _ = cli(capsys, "model", "versions", "--data-dir", data)
    assert "no versions published yet" in out

    code, out, err = cli(capsys, "model", "publish", str(degraded), "--data-dir", data,
                         "--allow-degraded")
    assert code == 0, err
    assert "WARNING: publishing a degraded artifact" in err
    assert "published" in out
    code, out, _ = cli(capsys, "model", "versions", "--data-dir", data)
    assert read_manifest(degraded).model_version in out
    assert f"{q.relative_change:+.1%}" in out


def test_the_budget_flag_sets_the_limit(
    demo_edge_int4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q = read_manifest(demo_edge_int4).quality
    assert q is not None and q.relative_change > 0
    below = f"{q.relative_change * 100 / 2:.3f}"
    data = str(tmp_path / "control")
    code, _, err = cli(capsys, "model", "publish", str(demo_edge_int4), "--data-dir", data,
                       "--max-ppl-increase", below)
    assert code == 1 and "--allow-degraded" in err
    code, _, err = cli(capsys, "model", "publish", str(demo_edge_int4), "--data-dir", data)
    assert code == 0, err
    assert "warning" not in err.lower()


def test_an_unmeasured_artifact_publishes_with_a_warning(
    demo_edge_int4_copy: Callable[[Path, str | None], Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    artifact = demo_edge_int4_copy(tmp_path / "old", None)
    write_manifest(artifact, dataclasses.replace(read_manifest(artifact), quality=None))
    code, _, err = cli(capsys, "model", "publish", str(artifact), "--data-dir",
                         str(tmp_path / "control"))
    assert code == 0, err
    assert "warning" in err and "no perplexity measurement" in err


# --- per-model recipe, calibration and model info ----------------------------------------------


def test_a_catalog_model_exports_with_its_recipe_and_calibration(
    catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TANDEM_MODELS", str(catalog))
    record = model_record("demo-edge", catalog)
    (catalog / "demo-edge" / "catalog.json").write_text(json.dumps(
        dataclasses.asdict(dataclasses.replace(record, edge_recipe="int8")), indent=2))
    out_dir = tmp_path / "art"
    code, out, err = cli(capsys, "model", "export", "--checkpoint", "demo-edge", "--out",
                         str(out_dir))
    assert code == 0, err
    manifest = read_manifest(out_dir)
    assert manifest.recipe == RECIPES["int8"] and manifest.quality is not None
    assert "quality: perplexity" in out
    # Calibrated on the artifact's own losses, in the format the edge engine reads.
    calibration = json.loads((out_dir / "calibration.json").read_text())
    assert {"difficulty_threshold", "quantile", "per_site", "measured_on",
            "cascade_threshold"} <= set(calibration)
    threshold = read_difficulty_threshold(out_dir)
    assert threshold is not None and threshold != 4.0 and 0 < threshold < 20
    assert "calibration.json" in {f.path for f in manifest.files}

    code, out, _ = cli(capsys, "model", "info", "demo-edge")
    assert code == 0
    assert "demo-edge (model)" in out
    for words in ("parameters", "2.4M", "qwen2", "512 tokens", "edge recipe   int8",
                  f"{manifest.model_version} (int8", "perplexity", str(out_dir)):
        assert words in out, words
    code, out, _ = cli(capsys, "model", "info", str(out_dir), "--json")
    facts = json.loads(out)
    assert facts["kind"] == "edge artifact" and facts["recipe"]["name"] == "int8"
    assert facts["quality"]["relative_change"] == manifest.quality.relative_change
    assert facts["calibration"]["difficulty_threshold"] == threshold
    assert facts["eos"] and facts["bos"]["id"] == 1
    code, out, _ = cli(capsys, "model", "list")
    assert "int8 " in out.splitlines()[1] and "%" in out.splitlines()[1]


def test_model_info_shows_the_chat_template_and_special_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "chat"
    checkpoint.mkdir()
    for f in EDGE.iterdir():
        (checkpoint / f.name).write_bytes(f.read_bytes())
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}\n{{ m['content'] }}{% endfor %}"
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    code, out, err = cli(capsys, "model", "info", str(checkpoint))
    assert code == 0, err
    assert "chat template yes: {% for m in messages %}" in out
    assert "bos" in out and "eos" in out
    code, _, err = cli(capsys, "model", "info", "no-such-model")
    assert code == 1 and "no model 'no-such-model'" in err
