"""The ``imgcurate`` command: ``run CONFIG``, ``phase2 CONFIG``, ``refresh CONFIG``, ``dry-run``, ``validate CONFIG``,
``index build|add|remove``, ``search`` (jobs/index_cli.py), ``serve`` (jobs/serve.py) and ``report RUN_OUTPUT``
(jobs/report.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jobs.config import ConfigError, load_config
from operators.lock import LockHeld


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgcurate", description="Curate web-scale image-text datasets on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the job described by CONFIG")
    run.add_argument("config")
    ph2 = sub.add_parser("phase2", help="rerun only phase 2 (dedup, selections, coreset, a new snapshot) over the "
                                        "finished phase-1 output of CONFIG: nothing is downloaded again")
    ph2.add_argument("config")
    ref = sub.add_parser("refresh", help="refresh the dataset of CONFIG from the crawl its input names: only new "
                                         "samples are downloaded, old ones re-checked, takedowns applied, and the "
                                         "next snapshot version published (jobs/refresh.py)")
    ref.add_argument("config")
    val = sub.add_parser("validate", help="check CONFIG, print it with every default filled in, then the chain of "
                                          "stages: what each reads and writes, where it runs, its model")
    val.add_argument("config")
    val.add_argument("--check-inputs", action="store_true", help="also list the input files (reads storage)")
    dry = sub.add_parser("dry-run", help="serve the bundled sample on 127.0.0.1 and run configs/dryrun.yaml")
    dry.add_argument("--work-dir", default="imgcurate-dryrun", help="where the sample and output go")
    from jobs.index_cli import add_parsers
    from jobs.report import add_parser as add_report_parser

    add_parsers(sub)
    add_report_parser(sub)
    for sp in (run, ph2, ref, val, dry):
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set download.timeout_s=5 (repeatable)")
        sp.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) or args.command != "validate" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        if args.command in ("index", "search", "serve"):
            from jobs import index_cli

            try:
                return index_cli.run(args)
            except ValueError as exc:  # a bad argument or an index that cannot answer: no traceback
                print(f"error: {exc}", file=sys.stderr)
                return 2
        if args.command == "report":
            from jobs import report

            return report.run_cli(args)
        if args.command == "validate":
            cfg = load_config(args.config, args.overrides)
            if args.check_inputs:
                from operators.sources import expand_paths

                files = expand_paths(cfg.input, cfg.storage)
                print(f"{len(files)} input file(s), first: {files[0]}", file=sys.stderr)
            from jobs.stages import describe

            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            print("\nthe chain (stage [where it runs], the columns it reads and writes, its model):")
            print(describe(cfg))
            print("config OK", file=sys.stderr)
            return 0
        if args.command == "refresh":
            from jobs import refresh

            manifest = refresh.run_refresh(refresh.load_refresh_config(args.config, args.overrides))
            print(refresh.summary(manifest))
            return 0
        from jobs import curate

        if args.command in ("run", "phase2"):
            cfg = load_config(args.config, args.overrides)
            manifest, out = curate.run(cfg, phase2_only=args.command == "phase2"), cfg.output.path
        else:
            from jobs.dryrun import run_dryrun

            manifest, out = run_dryrun(args.work_dir, args.overrides)
        print(curate.summary_table(manifest))
        print(f"output: {out}  (run manifest: {out.rstrip('/')}/_manifest.json)")
        return 0
    except (ConfigError, FileNotFoundError, LockHeld) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
