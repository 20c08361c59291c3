"""Train the reward head (operators/reward.py) on caption-preference rankings, with Ray Train.

The entry point; the library (data, pairs, loss, trainer loop, evaluation) and the method
(Compress & Align's rankings as Bradley-Terry pairs, ties, the held-out split) are in
operators/reward_training.py.

Input: Parquet rows with ``image`` (bytes) or ``image_uri`` (path, file://, s3://),
``captions`` (list<string>) and ``ranks`` (list<int>, lower is better, equal is a tie), and
optionally ``id``. Training runs on Ray Train's ``TorchTrainer`` (CPU workers, or GPU workers on a
cluster). The head checkpoint goes to
``OUT/reward_head.pt`` (local or s3://), the report to ``OUT/train_report.json``: held-out
pairwise accuracy of the trained reward, of the untrained head and of the backbone's own
image-text score (the CLIP score, or BLIP's ITC cosine).

    python -m jobs.train_reward configs/train_reward.yaml --set data=prefs.parquet --set dropout=0.2
    python -m jobs.train_reward --data prefs.parquet --out s3://bucket/reward --num-workers 4
    python -m jobs.train_reward --synthetic 96 --data /tmp/prefs.parquet --out /tmp/reward  # tiny dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict

import pyarrow.parquet as pq
from pydantic import ValidationError

from jobs.config import ConfigError, _format_error, apply_override, read_config_file
from jobs.sizing import ResourceError
from operators.clip import model_report as clip_model_report
from operators.models.reward import BASELINES
from operators.reward_training import (
    HEAD_FILE, REPORT_FILE, TrainReport, TrainRewardConfig, _keep_split, synthetic_preferences, tiny_backbone,
    train_loop_per_worker,
)
from operators.storage import arrow_fs, fsspec_fs, is_remote, join, write_bytes_atomic, write_json_atomic

log = logging.getLogger("imgcurate.train_reward")


# Ray Data's read and split tasks feed the workers while they train: they need CPUs beside the
# workers', or the workers wait for data that never comes (Ray Data's default is 1 CPU a task).
INGEST_TASK_CPUS = 0.25


def check_fits(cfg: TrainRewardConfig, cluster: dict) -> None:
    """Refuse, naming the flags, a run whose workers and data ingest cannot all run at once."""
    need_cpus = cfg.num_workers * cfg.cpus_per_worker + INGEST_TASK_CPUS
    have_cpus, have_gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if need_cpus > have_cpus + 1e-9 or (cfg.use_gpu and cfg.num_workers > have_gpus):
        raise ResourceError(
            f"{cfg.num_workers} Ray Train worker(s) of {cfg.cpus_per_worker:g} CPU"
            f"{' and 1 GPU' if cfg.use_gpu else ''} plus {INGEST_TASK_CPUS:g} CPU of data ingest need "
            f"{need_cpus:g} CPUs{f' and {cfg.num_workers} GPUs' if cfg.use_gpu else ''}; the cluster has "
            f"{have_cpus:g} CPUs and {have_gpus:g} GPUs. Change --num-workers or --cpus-per-worker "
            "(or --ray-num-cpus for a local Ray)")


def run(cfg: TrainRewardConfig) -> TrainReport:
    """Split, train on Ray Train, copy the head to OUT/reward_head.pt and write the report (Ray must be up)."""
    import ray
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    check_fits(cfg, ray.cluster_resources())
    data_fs, data_path = arrow_fs(cfg.data, cfg.storage)
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, num_cpus=INGEST_TASK_CPUS)
    split = {"val_fraction": cfg.val_fraction, "seed": cfg.seed}
    train_ds = ds.map_batches(_keep_split, fn_kwargs={"val": False, **split}, batch_format="pyarrow",
                              num_cpus=INGEST_TASK_CPUS)
    val_ds = ds.map_batches(_keep_split, fn_kwargs={"val": True, **split}, batch_format="pyarrow",
                            num_cpus=INGEST_TASK_CPUS)
    out_fs, out_path = arrow_fs(cfg.out, cfg.storage)
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=cfg.run_name, storage_path=out_path,
                             storage_filesystem=out_fs if is_remote(cfg.out) else None),
        datasets={"train": train_ds, "val": val_ds},
        # The training rows are split over workers (Ray Data's equal split may leave out up to
        # num_workers - 1 rows); rank 0 reads all held-out rows.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, HEAD_FILE), "rb") as f:
            blob = f.read()
    head_path = join(cfg.out, HEAD_FILE)
    write_bytes_atomic(head_path, blob, cfg.storage)
    if cfg.backbone_type == "blip":
        backbone = {"model": "blip-itm", "pretrained": cfg.blip_path, "random_weights": False}
    else:
        backbone = clip_model_report(cfg.backbone)
    report = TrainReport(checkpoint=head_path, ray_checkpoint=str(result.checkpoint.path), backbone=backbone,
                         head_hidden=list(cfg.head_hidden), unfreeze_last_blocks=cfg.unfreeze_last_blocks,
                         num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         metrics={k: v for k, v in result.metrics.items() if not k.startswith("_")},
                         seconds=round(time.time() - t0, 2), baseline=BASELINES[cfg.backbone_type])
    write_json_atomic(join(cfg.out, REPORT_FILE), asdict(report), cfg.storage)  # last: the run is complete
    return report


# --- CLI --------------------------------------------------------------------------------------------
# Flags that are shorthands for config keys (flag dest -> key of TrainRewardConfig).
FLAG_KEYS = {"data": "data", "out": "out", "epochs": "epochs", "lr": "lr", "batch_rows": "batch_rows",
             "num_workers": "num_workers", "cpus_per_worker": "cpus_per_worker", "val_fraction": "val_fraction",
             "seed": "seed", "ties": "ties", "unfreeze_last_blocks": "unfreeze_last_blocks",
             "backbone_type": "backbone_type", "blip_path": "blip_path", "endpoint_url": "storage.endpoint_url",
             "backbone_model": "backbone.model", "model_config_path": "backbone.model_config_path"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_reward", description=__doc__.splitlines()[0],
                                epilog="Every key of the config (TrainRewardConfig) can be set with --set KEY=VALUE; "
                                       "the flags are shorthands for the commonest ones (see configs/train_reward.yaml)")
    p.add_argument("config", nargs="?", help="YAML config (optional: the flags and --set can give everything)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dropout=0.2 --set backbone.pretrained=null (repeatable)")
    p.add_argument("--data", help="Parquet file/dir of preference rows (local or s3://)")
    p.add_argument("--out", help="output dir or s3:// prefix")
    p.add_argument("--synthetic", type=int, metavar="N", help="first write a synthetic set of N images to --data "
                                                               "(and default to the tiny random backbone)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-rows", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each Ray Train worker asks for")
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--ties", choices=["half", "skip"])
    p.add_argument("--head-hidden", help="comma-separated hidden widths")
    p.add_argument("--unfreeze-last-blocks", type=int)
    p.add_argument("--backbone-type", choices=["open_clip", "blip"])
    p.add_argument("--backbone-model", help="open_clip model (default ViT-B-32; tiny with --synthetic)")
    p.add_argument("--backbone-pretrained", help="tag, path, file://, s3://, or 'none' for random weights")
    p.add_argument("--model-config-path", help="JSON of a custom open_clip architecture")
    p.add_argument("--blip-path")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")
    p.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS or a new local Ray")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of a local Ray started here")
    p.add_argument("--progress-bars", action="store_true", help="Ray Data progress bars (off by default)")
    return p


def config_from_args(args) -> TrainRewardConfig:
    """The YAML config (if any), then the flags given, then ``--set``; a bad key or value is a ConfigError."""
    data: dict = read_config_file(args.config) if args.config else {}
    flags = [f"{key}={json.dumps(getattr(args, dest))}" for dest, key in FLAG_KEYS.items()
             if getattr(args, dest) is not None]
    if args.use_gpu:
        flags.append("use_gpu=true")
    if args.head_hidden is not None:
        flags.append(f"head_hidden=[{args.head_hidden}]")
    if args.backbone_pretrained is not None:
        none = args.backbone_pretrained.lower() in ("none", "null")
        flags.append(f"backbone.pretrained={'null' if none else json.dumps(args.backbone_pretrained)}")
    for o in flags + list(args.overrides):
        apply_override(data, o)
    backbone = data.get("backbone") or {}
    if args.synthetic and "model" not in backbone:
        data["backbone"] = {**tiny_backbone().model_dump(exclude_unset=True), **backbone}
    try:
        return TrainRewardConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def main(argv: list[str] | None = None) -> int:
    import ray

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.synthetic:
        fs, p = fsspec_fs(cfg.data, cfg.storage)
        parent = p.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(p, "wb") as f:
            pq.write_table(synthetic_preferences(args.synthetic, seed=cfg.seed), f)
        log.info("wrote a synthetic preference set of %d images to %s", args.synthetic, cfg.data)
    if not ray.is_initialized():  # only jobs/ touch process-wide state
        kwargs: dict = {"address": args.ray_address, "include_dashboard": False}
        if args.ray_address is None and args.ray_num_cpus:
            kwargs["num_cpus"] = args.ray_num_cpus
        ray.init(**kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = args.progress_bars
    try:
        report = run(cfg)
    except ResourceError as exc:  # check_fits: the workers and the ingest do not fit the cluster
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.text())
    print(json.dumps({k: report.metrics.get(k) for k in ("val_accuracy", "val_accuracy_untrained",
                                                         "val_accuracy_backbone")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
