"""CLIP stage benchmark: the operator against the raw model (GPU) or against itself in Ray (CPU).

GPU (run on the device machine; no Ray needed there):
    python benchmarks/clip_bench.py gpu --model ViT-B-32 --n 16384 --batch 1024
  prints raw open_clip image+text encoding on synthetic fp16 tensors (images/s), the
  ClipEmbedder from JPEG bytes to scores (images/s), and their ratio (target >= 0.70).

CPU (here, with the tiny random model):
    python benchmarks/clip_bench.py cpu --n 2000
  prints the operator alone and the same operator inside a Ray Data pipeline, and the ratio
  (Ray's overhead). Every figure is measured in the same run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.clip import ClipConfig, ClipEmbedder  # noqa: E402

TINY = "imgcurate-tiny-clip"
TINY_CONFIG = str(ROOT / "configs" / "models" / f"{TINY}.json")


def synthetic_jpegs(n: int, size: int, distinct: int = 256) -> list[bytes]:
    """JPEG bytes of random-ish images (``distinct`` different ones, cycled)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = []
    for _ in range(min(n, distinct)):
        small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        base.append(buf.getvalue())
    return [base[i % len(base)] for i in range(n)]


def make_table(jpegs: list[bytes]) -> pa.Table:
    n = len(jpegs)
    return pa.table({
        "sample_id": [f"s{i}" for i in range(n)],
        "status": ["kept"] * n,
        "drop_stage": pa.array([None] * n, pa.string()),
        "drop_reason": pa.array([None] * n, pa.string()),
        "error_message": pa.array([None] * n, pa.string()),
        "image": pa.array(jpegs, pa.binary()),
        "captions": pa.array([[f"a photo of thing number {i % 1000}"] for i in range(n)], pa.list_(pa.string())),
    })


def run_operator(op: ClipEmbedder, table: pa.Table, batch: int) -> float:
    op(table.slice(0, min(batch, table.num_rows)))  # warm-up: model load, kernels, caches
    start = time.perf_counter()
    for s in range(0, table.num_rows, batch):
        op(table.slice(s, batch))
    return time.perf_counter() - start


def gpu(args) -> None:
    import open_clip
    import torch

    assert torch.cuda.is_available(), "gpu mode needs CUDA"
    dev = "cuda"
    model, _, _ = open_clip.create_model_and_transforms(args.model, pretrained=None, precision="fp16", device=dev)
    model.eval()
    tok = open_clip.get_tokenizer(args.model)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    x = torch.randn(args.batch, 3, size, size, device=dev, dtype=torch.float16)
    t = tok([f"a photo of thing number {i}" for i in range(args.batch)]).to(dev)
    with torch.inference_mode():
        for _ in range(3):
            model.encode_image(x), model.encode_text(t)
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps = max(1, args.n // args.batch)
        for _ in range(steps):
            model.encode_image(x)
            model.encode_text(t)
        torch.cuda.synchronize()
    raw = steps * args.batch / (time.perf_counter() - start)

    ckpt = Path(args.work_dir) / f"{args.model}-random.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ckpt)
    del model
    table = make_table(synthetic_jpegs(args.n, args.image_px))
    op = ClipEmbedder(ClipConfig(enabled=True, model=args.model, pretrained=str(ckpt), device="cuda",
                                 decode="gpu", batch_size=args.batch))
    secs = run_operator(op, table, args.batch)
    torch.cuda.synchronize()
    ours = args.n / secs
    print(f"clip benchmark (GPU: {torch.cuda.get_device_name(0)}), {args.model} fp16, random weights, "
          f"batch {args.batch}, {args.n} JPEGs of {args.image_px}px")
    print(f"raw open_clip image+text encode (synthetic tensors): {raw:,.0f} images/s")
    print(f"ClipEmbedder, JPEG bytes -> scores (nvJPEG decode):  {ours:,.0f} images/s")
    print(f"ratio operator / raw: {ours / raw:.2f}   target >= 0.70")


def cpu(args) -> None:
    import ray

    table = make_table(synthetic_jpegs(args.n, args.image_px))
    cfg = ClipConfig(enabled=True, model=TINY, pretrained=None, model_config_path=TINY_CONFIG, device="cpu",
                     batch_size=args.batch)
    alone_s = run_operator(ClipEmbedder(cfg), table, args.batch)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False
    blocks = max(1, args.n // args.batch)
    ds = ray.data.from_arrow([table.slice(i * args.batch, args.batch) for i in range(blocks)])
    ds.materialize()
    warm = ray.data.from_arrow(table.slice(0, args.batch)).map_batches(
        ClipEmbedder, fn_constructor_kwargs={"config": cfg}, batch_format="pyarrow", batch_size=args.batch,
        num_cpus=1, compute=ActorPoolStrategy(size=1))
    warm.count()  # worker start and imports are not what is measured
    start = time.perf_counter()
    out = ds.map_batches(ClipEmbedder, fn_constructor_kwargs={"config": cfg}, batch_format="pyarrow",
                         batch_size=args.batch, num_cpus=1, compute=ActorPoolStrategy(size=1)).materialize()
    ray_s = time.perf_counter() - start
    assert out.count() == args.n
    ray.shutdown()
    print(f"clip benchmark (CPU, {os.cpu_count()} cores), tiny random model {TINY}, batch {args.batch}, "
          f"{args.n} JPEGs of {args.image_px}px")
    print(f"operator alone:                 {args.n / alone_s:,.0f} images/s")
    print(f"operator in a Ray Data pipeline: {args.n / ray_s:,.0f} images/s (1 actor; includes the actor start)")
    print(f"ratio Ray / alone: {alone_s / ray_s:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["gpu", "cpu"])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument("--work-dir", default="/tmp/imgcurate-clip-bench")
    args = p.parse_args()
    if args.mode == "gpu":
        args.n, args.batch = args.n or 16384, args.batch or 1024
        gpu(args)
    else:
        args.n, args.batch = args.n or 2000, args.batch or 200
        cpu(args)


if __name__ == "__main__":
    main()
