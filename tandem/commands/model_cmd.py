"""``tandem model``: inspect, rebuild and export the model pair; publish edge versions.

``publish`` and ``versions`` work on the control plane's data directory (``--data-dir``, as
``tandem cloud control serve`` uses it).

Heavy imports (torch, the exporter) happen inside each command so that ``tandem --help`` and
commands of other groups stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tandem.commands.control_dir import data_dir, data_dir_flag, guarded, when

DEFAULT_DATA_DIR = Path("runs/demo-data")


def register(groups: Any) -> None:
    model = groups.add_parser("model", help="inspect, rebuild and export the model pair")
    sub = model.add_subparsers(dest="command", metavar="ACTION", required=True)

    info = sub.add_parser("info", help="show a catalog model, checkpoint or edge artifact "
                                       "(default: the demo pair)")
    info.add_argument("target", nargs="?", default=None, metavar="NAME|DIR",
                      help="catalog model name, checkpoint or artifact directory (default: the "
                           "demo pair's sizes, perplexities and versions)")
    info.add_argument("--dir", type=Path, default=None, help="pair directory (default: shipped)")
    info.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                      help="catalog directory (env TANDEM_MODELS, default ~/.tandem/models)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    imp = sub.add_parser("import", help="add a model to the catalog from a GGUF file or an HF "
                                        "directory")
    imp.add_argument("source", metavar="SOURCE",
                     help="a .gguf file, an HF checkpoint directory, or a packaged model name "
                          "(smollm2-135m-instruct)")
    imp.add_argument("--name", default=None,
                     help="catalog name (default: the packaged name, or SOURCE's file name)")
    imp.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                     help="catalog directory (env TANDEM_MODELS, default ~/.tandem/models)")
    imp.add_argument("--replace", action="store_true", help="import over a model of that name")
    imp.set_defaults(func=cmd_import)

    listing = sub.add_parser("list", help="show the catalog's models")
    listing.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                         help="catalog directory (env TANDEM_MODELS, default ~/.tandem/models)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)

    data = sub.add_parser("data", help="build the corpus, tokenizer and token streams")
    data.add_argument("--out", type=Path, default=DEFAULT_DATA_DIR)
    data.add_argument("--vocab-size", type=int, default=4096)
    data.set_defaults(func=cmd_data)

    train = sub.add_parser("train", help="rebuild the demo pair (data, then both models)")
    train.add_argument("--out", type=Path, default=None, help="pair directory (default: shipped)")
    train.add_argument("--data", type=Path, default=None,
                       help="use this data directory (from `tandem model data`) as it is")
    train.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--edge-steps", type=int, default=None)
    train.add_argument("--cloud-steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="build an edge artifact (ONNX Runtime GenAI), "
                                           "measured against its source")
    export.add_argument("--checkpoint", default=None, metavar="NAME|DIR",
                        help="catalog model name or checkpoint directory (default: the shipped "
                             "edge model)")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--recipe", "--quantization", dest="recipe", default=None,
                        metavar="RECIPE",
                        help="builder recipe: int4, int8, fp32, a named recipe (model/recipes.py) "
                             "or auto (smallest within --max-ppl-increase); default: the catalog "
                             "model's recipe, else int4")
    export.add_argument("--max-ppl-increase", type=_percent, default=None, metavar="PERCENT",
                        help="budget for --recipe auto: relative perplexity increase over the "
                             "source (default 3)")
    export.add_argument("--no-measure", dest="measure", action="store_false",
                        help="skip the perplexity measurement (publish then warns)")
    calibrate = export.add_mutually_exclusive_group()
    calibrate.add_argument("--calibrate", dest="calibrate", action="store_const", const=True,
                           default=None, help="measure the router calibration on the artifact "
                                              "(default for catalog models)")
    calibrate.add_argument("--no-calibrate", dest="calibrate", action="store_const", const=False,
                           help="ship no calibration.json: the router's default threshold "
                                "applies (default for the demo pair, which it was measured on)")
    export.set_defaults(func=cmd_export)
    register_versions(sub)


def register_versions(sub: Any) -> None:
    """Add ``publish`` and ``versions`` to the ``tandem model`` subcommands."""
    publish = sub.add_parser("publish", help="register an edge artifact as a signed version")
    publish.add_argument("artifact", type=Path, metavar="DIR",
                         help="edge artifact directory (from `tandem model export`)")
    data_dir_flag(publish)
    publish.add_argument("--notes", default="", help="free text kept with the version")
    publish.add_argument("--version", dest="model_version", default=None,
                         help="publish under this version name (default: the manifest's)")
    publish.add_argument("--make-current", action="store_true",
                         help="serve it on every node now, without a canary rollout "
                              "(the first version published becomes current anyway)")
    publish.add_argument("--max-ppl-increase", type=_percent, default=None, metavar="PERCENT",
                         help="refuse an artifact whose perplexity is more than this much above "
                              "its source checkpoint's (default 3); an artifact without a "
                              "measurement is published with a warning")
    publish.add_argument("--allow-degraded", action="store_true",
                         help="publish even over the perplexity limit (warns)")
    publish.set_defaults(func=cmd_publish)
    versions = sub.add_parser("versions", help="list published edge model versions")
    data_dir_flag(versions)
    versions.add_argument("--json", action="store_true", help="machine-readable output")
    versions.set_defaults(func=cmd_versions)


def _percent(text: str) -> float:
    """A percentage flag (``3`` or ``3%``) as a fraction, 0 or more."""
    try:
        value = float(text.rstrip("%")) / 100
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a percentage like 3 or 2.5, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _pair_dir(arg: Path | None) -> Path:
    from model.demo import DEMO_DIR

    return arg if arg is not None else DEMO_DIR


def cmd_info(args: argparse.Namespace) -> int:
    if args.target is not None:
        return _info_of(args.target, args.models_dir, args.json)
    from model.checkpoint import checkpoint_version, read_metadata

    pair = _pair_dir(args.dir)
    rows: dict[str, dict[str, Any]] = {}
    for role in ("cloud", "edge"):
        path = pair / role
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no {role} checkpoint in {pair}; run `tandem model train`")
        meta = read_metadata(path)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        rows[role] = {
            "path": str(path),
            "version": checkpoint_version(path),
            "parameters": meta.get("parameters"),
            "size_bytes": size,
            "heldout_perplexity": meta.get("heldout_perplexity", {}),
            "trained": meta.get("train", {}),
            "device": meta.get("device_name"),
        }
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for role, row in rows.items():
        ppl = row["heldout_perplexity"]
        trained = row["trained"]
        print(f"{role}: {row['version']}")
        print(f"  path        {row['path']}")
        print(f"  parameters  {row['parameters'] / 1e6:.2f}M" if row["parameters"] else "")
        print(f"  size        {row['size_bytes'] / 1e6:.1f} MB (bf16 safetensors + tokenizer)")
        if ppl:
            per_family = ", ".join(f"{k} {v:.1f}" for k, v in ppl.items() if k != "all")
            print(f"  perplexity  {ppl.get('all', float('nan')):.2f} held-out ({per_family})")
        if trained:
            print(f"  trained     {trained.get('steps')} steps x {trained.get('batch_size')} x "
                  f"{trained.get('seq_len')} tokens, seed {trained.get('seed')}, "
                  f"{trained.get('seconds')} s on {row['device']}")
    return 0


def _info_of(target: str, models_dir: Path | None, as_json: bool) -> int:
    from model.catalog import CatalogError
    from tandem.commands.model_info import describe, render

    try:
        facts = describe(target, models_dir)
    except CatalogError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(facts, indent=2) if as_json else "\n".join(render(facts)))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from model.catalog import PACKAGED, CatalogError, import_model

    source = str(args.source)
    name = args.name or (source if source in PACKAGED else
                         Path(source).name.removesuffix(".gguf").lower())
    print(f"importing {source} as {name} ...", flush=True)
    try:
        record = import_model(source, name, args.models_dir, replace=args.replace)
    except CatalogError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 1
    print(f"imported {record.name}: {record.architecture}, {record.parameters / 1e6:.1f}M "
          f"parameters, context {record.context}, "
          f"{'chat template' if record.chat_template else 'no chat template'}, "
          f"{record.size_bytes / 1e6:.0f} MB")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import dataclasses

    from model.catalog import default_root, exports, list_models

    records = list_models(args.models_dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in records], indent=2))
        return 0
    if not records:
        print(f"no models in {args.models_dir or default_root()}; add one with "
              "`tandem model import SOURCE`")
        return 0
    root = args.models_dir or default_root()
    print(f"{'NAME':<28} {'ARCH':<8} {'PARAMS':>8} {'CONTEXT':>8} {'SIZE':>8}  {'TEMPLATE':<8}  "
          "EDGE (latest export: recipe, perplexity vs source)")
    for r in records:
        latest = exports(root / r.name)[-1:]
        edge = (f"{latest[0]['recipe']} {latest[0]['quality']['relative_change']:+.1%}"
                if latest and latest[0].get("quality") else
                f"{latest[0]['recipe']} not measured" if latest else "-")
        print(f"{r.name:<28} {r.architecture:<8} {r.parameters / 1e6:>7.1f}M {r.context:>8} "
              f"{r.size_bytes / 1e6:>6.0f}MB  {'chat' if r.chat_template else '-':<8}  {edge}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from model.demo import prepare_data

    data = prepare_data(args.out, vocab_size=args.vocab_size)
    print(f"wrote {args.out}: tokenizer ({data.tokenizer.vocab_size} tokens), "
          f"{data.stream('train').numel()} train and {data.stream('heldout').numel()} "
          f"held-out tokens over {len(data.families)} families")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from model.demo import DemoConfig, prepare_data, train_pair

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = {k: v for k, v in {
        "seed": args.seed, "device": device, "edge_steps": args.edge_steps,
        "cloud_steps": args.cloud_steps, "batch_size": args.batch_size,
    }.items() if v is not None}
    cfg = dataclasses.replace(DemoConfig(), **overrides)
    out = _pair_dir(args.out)
    if args.data is not None:
        data_dir = args.data
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="tandem-demo-data-"))
        prepare_data(data_dir, vocab_size=cfg.vocab_size)
    report = train_pair(data_dir, out, cfg)
    for role, ppl in report.items():
        print(f"demo-{role}: held-out perplexity {ppl['all']:.2f} -> {out / role}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.catalog import CatalogError, model_dir
    from model.checkpoint import checkpoint_version
    from model.export import ExportError, export_edge_artifact
    from model.quality import QUALITY_BUDGET

    try:
        checkpoint = (_pair_dir(None) / "edge" if args.checkpoint is None
                      else Path(args.checkpoint).expanduser() if "/" in args.checkpoint
                      or Path(args.checkpoint).is_dir() else model_dir(args.checkpoint))
        budget = QUALITY_BUDGET if args.max_ppl_increase is None else args.max_ppl_increase
        print(f"exporting {checkpoint} ({args.recipe or 'its recipe'}) ...", flush=True)
        manifest = export_edge_artifact(
            checkpoint, args.out, args.recipe, checkpoint_version(checkpoint),
            measure=args.measure, calibrate=args.calibrate, budget=budget,
        )
    except (CatalogError, ExportError, ValueError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 1
    recipe = manifest.recipe.name if manifest.recipe else manifest.quantization
    print(f"wrote {args.out}: {manifest.model_version} ({recipe}, "
          f"{manifest.total_size / 1e6:.1f} MB, {len(manifest.files)} files)")
    if manifest.quality is not None:
        over = manifest.quality.relative_change > budget
        print(f"quality: {manifest.quality.describe()}"
              + (f"; over the {budget:.1%} budget: `tandem model publish` will refuse it"
                 if over else ""))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from control.datadir import ControlData
    from control.publish import check_quality, publish_model
    from model.manifest import read_manifest
    from model.quality import QUALITY_BUDGET

    budget = QUALITY_BUDGET if args.max_ppl_increase is None else args.max_ppl_increase

    def publish() -> int:
        verdict = check_quality(read_manifest(args.artifact), budget)
        if not verdict.measured:
            print(f"tandem: warning: {verdict.message}", file=sys.stderr)
        elif not verdict.passed and args.allow_degraded:
            print(f"tandem: WARNING: publishing a degraded artifact (--allow-degraded): "
                  f"{verdict.message}", file=sys.stderr)
        with ControlData.open(data_dir(args)) as data:
            record, created = publish_model(
                data, args.artifact, notes=args.notes, model_version=args.model_version,
                make_current=True if args.make_current else None, max_ppl_increase=budget,
                allow_degraded=args.allow_degraded)
            current = data.store.current_version()
        verb = "published" if created else "already published:"
        print(f"{verb} {record.version} ({record.quantization}, {record.total_size / 1e6:.1f} "
              f"MB), signed by {record.key_id}")
        if current == record.version:
            print("It is the fleet's current version: nodes move to it at their next heartbeat.")
        else:
            print(f"The fleet still serves {current}; a canary rollout sends it to nodes.")
        return 0

    return guarded(publish)


def cmd_versions(args: argparse.Namespace) -> int:
    from control.datadir import ControlData

    with ControlData.open(data_dir(args)) as data:
        versions = data.store.versions()
        current = data.store.current_version()
    if args.json:
        print(json.dumps([{
            "version": v.version, "current": v.version == current, "created_at": v.created_at,
            "quantization": v.quantization, "total_size": v.total_size,
            "base_version": v.base_version, "parent_version": v.parent_version,
            "key_id": v.key_id, "notes": v.notes, "quality": _quality_of(v.manifest_json),
        } for v in versions], indent=2))
        return 0
    if not versions:
        print("no versions published yet: `tandem model publish DIR`")
        return 0
    print(f"  {'VERSION':<36} {'CREATED':<20} {'QUANT':<6} {'SIZE':>9} {'PPL':>7}  NOTES")
    for v in versions:
        mark = "*" if v.version == current else " "
        quality = _quality_of(v.manifest_json)
        change = "-" if quality is None else f"{quality['relative_change']:+.1%}"
        print(f"{mark} {v.version:<36} {when(v.created_at):<20} {v.quantization:<6} "
              f"{v.total_size / 1e6:>7.1f}MB {change:>7}  {v.notes}")
    print("(* the fleet's current version; PPL: perplexity change against the source checkpoint)")
    return 0


def _quality_of(manifest_json: bytes) -> dict[str, Any] | None:
    """The quality measurement a published manifest records, if any."""
    from model.manifest import Manifest

    quality = Manifest.from_json_bytes(manifest_json).quality
    return quality.to_dict() if quality else None
