"""Reward stage benchmark: scored (image, caption) pairs/s of RewardScorer against ClipEmbedder.

Both operators take the same batches of JPEG bytes with several captions each and score every
caption; the reward model adds its head (and the wider pair features) on top of the same CLIP
towers, so the ratio is the reward stage's cost over plain CLIP scoring.

GPU (run on the device machine; no Ray needed there, carry open_clip_torch, ftfy, wcwidth):
    python benchmarks/reward_bench.py gpu --model ViT-B-32 --n 8192 --batch 1024
CPU (here, with the tiny random model):
    python benchmarks/reward_bench.py cpu --n 1000 --batch 200
Every figure is measured in the same run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_bench import synthetic_jpegs  # noqa: E402
from operators.clip import ClipConfig, ClipEmbedder  # noqa: E402
from operators.reward import RewardConfig, RewardScorer  # noqa: E402

TINY = "imgcurate-tiny-clip"
TINY_CONFIG = str(ROOT / "configs" / "models" / f"{TINY}.json")


def make_table(jpegs: list[bytes], captions_per_image: int) -> pa.Table:
    n = len(jpegs)
    caps = [[f"a photo of thing number {(i * captions_per_image + k) % 1000}, variant {k}"
             for k in range(captions_per_image)] for i in range(n)]
    return pa.table({
        "sample_id": [f"s{i}" for i in range(n)],
        "status": ["kept"] * n,
        "drop_stage": pa.array([None] * n, pa.string()),
        "drop_reason": pa.array([None] * n, pa.string()),
        "error_message": pa.array([None] * n, pa.string()),
        "image": pa.array(jpegs, pa.binary()),
        "captions": pa.array(caps, pa.list_(pa.string())),
        "caption_sources": pa.array([["caption"] * captions_per_image] * n, pa.list_(pa.string())),
    })


def timed(op, table: pa.Table, batch: int, sync=None) -> float:
    op(table.slice(0, min(batch, table.num_rows)))  # warm-up: model load, kernels, caches
    if sync:
        sync()
    start = time.perf_counter()
    for s in range(0, table.num_rows, batch):
        op(table.slice(s, batch))
    if sync:
        sync()
    return time.perf_counter() - start


def compare(clip_cfg: ClipConfig, reward_cfg: RewardConfig, table: pa.Table, batch: int, rounds: int, sync=None):
    """Alternate the two operators ``rounds`` times (a shared machine drifts); best time of each."""
    clip, reward = ClipEmbedder(clip_cfg), RewardScorer(reward_cfg, clip=clip_cfg)
    t_clip, t_reward = [], []
    for _ in range(rounds):
        t_clip.append(timed(clip, table, batch, sync))
        t_reward.append(timed(reward, table, batch, sync))
    return min(t_clip), min(t_reward)


def report(title: str, pairs: int, t_clip: float, t_reward: float) -> None:
    print(title)
    print(f"ClipEmbedder (CLIP score of every caption):  {pairs / t_clip:,.0f} pairs/s")
    print(f"RewardScorer (reward of every caption):      {pairs / t_reward:,.0f} pairs/s")
    print(f"ratio reward / CLIP scoring: {t_clip / t_reward:.2f}")


def gpu(args) -> None:
    import torch

    assert torch.cuda.is_available(), "gpu mode needs CUDA"
    table = make_table(synthetic_jpegs(args.n, args.image_px), args.captions)
    clip_cfg = ClipConfig(enabled=True, model=args.model, pretrained=None, device="cuda", decode="gpu",
                          batch_size=args.batch, micro_batch=args.batch, write_embeddings=False)
    reward_cfg = RewardConfig(enabled=True, device="cuda", batch_size=args.batch, micro_batch=args.batch)
    t_clip, t_reward = compare(clip_cfg, reward_cfg, table, args.batch, args.rounds, torch.cuda.synchronize)
    report(f"reward benchmark (GPU: {torch.cuda.get_device_name(0)}), {args.model} fp16, random weights and head, "
           f"batch {args.batch}, {args.n} JPEGs of {args.image_px}px x {args.captions} captions",
           args.n * args.captions, t_clip, t_reward)


def cpu(args) -> None:
    import torch

    table = make_table(synthetic_jpegs(args.n, args.image_px), args.captions)
    clip_cfg = ClipConfig(enabled=True, model=TINY, pretrained=None, model_config_path=TINY_CONFIG, device="cpu",
                          batch_size=args.batch, write_embeddings=False)
    reward_cfg = RewardConfig(enabled=True, device="cpu", batch_size=args.batch)
    t_clip, t_reward = compare(clip_cfg, reward_cfg, table, args.batch, args.rounds)
    report(f"reward benchmark (CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads), tiny random "
           f"model {TINY} + random head {reward_cfg.head_hidden}, batch {args.batch}, {args.n} JPEGs of "
           f"{args.image_px}px x {args.captions} captions, best of {args.rounds}",
           args.n * args.captions, t_clip, t_reward)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["gpu", "cpu"])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--captions", type=int, default=4, help="captions per image (each is one scored pair)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-px", type=int, default=256)
    args = p.parse_args()
    if args.mode == "gpu":
        args.n, args.batch = args.n or 8192, args.batch or 1024
        gpu(args)
    else:
        args.n, args.batch = args.n or 1000, args.batch or 200
        cpu(args)


if __name__ == "__main__":
    main()
