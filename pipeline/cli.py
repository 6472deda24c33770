"""The ``convscope`` command line.

    convscope run MANIFEST [--output DIR] [--address RAY_ADDRESS] [--set key=value ...]
    convscope validate MANIFEST [--set key=value ...]
    convscope layers MODEL-SPEC | MANIFEST
    convscope report RUN_DIR [--out DIR]
    convscope compare RUN_A[@CHECKPOINT] RUN_B[@CHECKPOINT] [--output DIR] [--fail-on accuracy_drop=0.01,flips=0.05]
    convscope schema [--out FILE]

Exit codes: 0 done, 1 an analysis failed (the rest is committed) or a compare threshold was
exceeded, 2 bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convscope", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a manifest's analyses and write the output tables")
    run.add_argument("manifest", type=Path)
    run.add_argument("--output", "-o", help="output folder or URI such as s3://bucket/prefix "
                                            "(overrides the manifest's 'output')")
    run.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a manifest field, e.g. --set execution.batch_size=32 (repeatable)")

    val = sub.add_parser("validate", help="check a manifest fully (files, model, layers) without starting Ray")
    val.add_argument("manifest", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    rep = sub.add_parser("report", help="build RUN_DIR/report/index.html, a static site over a run's output")
    rep.add_argument("run_dir", help="a run's output folder or URI (s3://bucket/prefix, ...)")
    rep.add_argument("--out", help="write the report here instead of RUN_DIR/report (a local folder)")

    cmp = sub.add_parser("compare", help="what changed between two runs: accuracy, flips, top-k overlap, maps, probes")
    cmp.add_argument("run_a", help="the earlier (reference) run's output folder or URI; RUN@CHECKPOINT for one "
                                   "checkpoint of a series")
    cmp.add_argument("run_b", help="the later run's output folder or URI (or RUN@CHECKPOINT)")
    cmp.add_argument("--output", "-o", help="where to write the comparison (a local folder; "
                                            "default: RUN_B/compare-<name of RUN_A's folder>)")
    cmp.add_argument("--fail-on", dest="fail_on", action="append", default=[], metavar="KEY=X[,KEY=X]",
                     help="exit with 1 past a threshold: accuracy_drop=X (accuracy A - B > X), flips=Y "
                          "(fraction of common labelled images whose prediction flipped > Y)")

    sch = sub.add_parser("schema", help="print the manifest's JSON Schema (for editors' YAML language servers)")
    sch.add_argument("--out", type=Path, help="write it to this file instead of standard output")

    lay = sub.add_parser("layers", help="list a model's layer names and output shapes")
    lay.add_argument("spec", help="a manifest, or SOURCE:NAME such as builtin:cifar_resnet20, "
                                  "torchvision:resnet50, torchscript:model.pt, python:pkg.mod:fn")
    lay.add_argument("--weights", type=Path, help="checkpoint to load (torchvision, builtin, python)")
    lay.add_argument("--size", type=int, help="input side for the dry forward (default: from preprocessing)")
    return p


def _model_spec(text: str, weights: Path | None):
    """``builtin:cifar_resnet20`` etc. -> a validated model spec."""
    from pipeline.manifest import MODEL_SOURCES, validate_model

    source, sep, rest = text.partition(":")
    if not sep or source not in MODEL_SOURCES:
        raise UserError(f"model spec {text!r}: expected SOURCE:NAME with SOURCE one of {', '.join(MODEL_SOURCES)} "
                        "(or a manifest .yaml)")
    key = {"torchvision": "name", "builtin": "name", "python": "entrypoint", "torchscript": "path"}[source]
    raw = {"source": source, key: rest}
    if weights is not None:
        raw["weights"] = str(weights)
    return validate_model(raw, "the command line", Path.cwd())


def cmd_layers(args) -> int:
    from pipeline.manifest import load_manifest
    from pipeline.models import input_shape, layer_shapes, load_model, preprocess_of

    if args.spec.endswith((".yaml", ".yml")):
        spec = load_manifest(args.spec).model
    else:
        spec = _model_spec(args.spec, args.weights)
    model = load_model(spec, allow_untrained_demo=True)
    shape = input_shape(preprocess_of(spec)) if not args.size else (3, args.size, args.size)
    rows = layer_shapes(model, shape)
    width = max(len(n) for n, _, _ in rows)
    print(f"{'layer':<{width}}  {'type':<20} output shape (input {'x'.join(map(str, shape))})")
    for name, kind, out in rows:
        print(f"{name:<{width}}  {kind:<20} {'x'.join(map(str, out)) if out else '-'}")
    return 0


def cmd_validate(args) -> int:
    from pipeline.datasets import list_dataset
    from pipeline.execute import check_dataset
    from pipeline.manifest import load_manifest
    from pipeline.models import check_manifest

    manifest = load_manifest(args.manifest, args.overrides)
    check_manifest(manifest)
    check_dataset(manifest, list_dataset(manifest.dataset))
    print(f"{args.manifest}: valid ({len(manifest.analyses)} analyses: "
          f"{', '.join(a.entry_name for a in manifest.analyses)}; output {manifest.output})")
    return 0


def cmd_run(args) -> int:
    from pipeline.execute import run_manifest
    from pipeline.manifest import load_manifest

    manifest = load_manifest(args.manifest, args.overrides, output=args.output, address=args.address)
    result = run_manifest(manifest)
    if "ray" in sys.modules:
        import ray

        from pipeline.progress import RAY_WORKER_NOISE, StderrFilter

        # Lines Ray's workers printed reach this process late; those still on their way arrive
        # while Ray stops here, filtered as during the run, rather than after the summary.
        with StderrFilter(RAY_WORKER_NOISE):
            ray.shutdown()
    width = max(len(n) for n in result.analyses)
    print(f"\n{manifest.name}: {result.status}; results in {result.output}")
    for name, info in result.analyses.items():
        rows = info.get("rows")
        extra = f"{rows:,} rows" if isinstance(rows, int) else ""
        if info.get("seconds") is not None:
            extra += f", {info['seconds']:.1f}s"
        if info.get("error"):
            extra = info["error"].splitlines()[0][:200]
        print(f"  {name:<{width}}  {info['status']:<9} {extra}")
    if result.errors:
        print(f"  {result.errors} image(s) could not be used: see {str(result.output).rstrip('/')}/errors.parquet")
    if result.error:
        print(f"  failed: {result.error}")
    return 0 if result.ok else 1


def cmd_report(args) -> int:
    from pipeline.report import build_report

    index = build_report(args.run_dir, log=lambda message: print(message, file=sys.stderr), out=args.out)
    print(f"report: {index}")
    return 0


def cmd_compare(args) -> int:
    """``convscope compare``: exit 1 when a ``--fail-on`` threshold is passed."""
    from pipeline.compare import compare_runs

    result = compare_runs(args.run_a, args.run_b, output=args.output, fail_on=args.fail_on,
                          log=lambda message: print(message, file=sys.stderr))
    summary = result.summary
    print(f"compare: {summary['a']['path']} (A) -> {summary['b']['path']} (B); results in {result.output}")
    for row in summary["accuracy"]:
        if row["labelled"]:
            print(f"  {row['entry']}: accuracy {row['accuracy_a']:.4f} -> {row['accuracy_b']:.4f} "
                  f"({row['delta']:+.4f}) on {row['labelled']:,} labelled images; {row['flipped']:,} flipped "
                  f"({row['fixed']:,} fixed, {row['broke']:,} broke)")
        else:
            print(f"  {row['entry']}: {row['images']:,} common images, none labelled")
    for name, entry in summary["entries"].items():
        if not entry["compared"]:
            print(f"  {name}: not compared ({entry['reason']})")
    for note in summary["notes"]:
        print(f"  note: {note}")
    for failure in result.failures:
        print(f"convscope compare: threshold exceeded: {failure}", file=sys.stderr)
    return 1 if result.failures else 0


def cmd_schema(args) -> int:
    from pipeline.manifest import json_schema_text
    from pipeline.store import Store

    text = json_schema_text()
    if args.out is None:
        sys.stdout.write(text)
    else:
        out = args.out.absolute()
        Store.open(out.parent).write_text(out.name, text)
        print(f"schema: {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `convscope layers ... | head` ends quietly
    args = _parser().parse_args(argv)
    handler = {"run": cmd_run, "validate": cmd_validate, "layers": cmd_layers, "report": cmd_report,
               "compare": cmd_compare, "schema": cmd_schema}[args.command]
    try:
        return handler(args)
    except UserError as e:
        print(f"convscope {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; committed analyses are kept, rerun to finish the rest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
