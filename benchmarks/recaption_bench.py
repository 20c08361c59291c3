"""Recaption benchmark: images/s and tokens/s of the batched Recaptioner against one-image-at-a-time generation.

Both runs call the same operator class (``operators.recaption.Recaptioner``, no Ray) on the same
JPEG bytes, from bytes to captions in the output columns; only ``micro_batch`` differs (B images
per ``generate`` call against 1). Every caption is forced to exactly ``--tokens`` new tokens
(``min_new_tokens == max_new_tokens``), so both runs generate the same number of tokens and
random weights cannot end captions early.

GPU (run on the device machine; no Ray needed there), a BLIP-base-shaped model (ViT-B/16 at
384 px + a 12-layer BERT-base decoder, 30,524-token vocabulary) with random weights, fp16:
    python benchmarks/recaption_bench.py gpu --n 2048 --batch 128 --single 64 --tokens 32
CPU (here), the dry run's tiny random captioner:
    python benchmarks/recaption_bench.py cpu --n 128 --batch 32 --single 32 --tokens 16
``--textualize`` adds Image Textualization's passes 2 and 3 (Pi et al., 2024) with the dry run's
tiny random OWL-ViT and rewriter (CPU) or OWL-ViT-B/16- and 0.5B-Llama-shaped random ones (GPU), their
micro-batches the same as the captioner's; the threshold is set so random detectors find some objects.
Every figure is measured in the same run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_bench import synthetic_jpegs  # noqa: E402
from benchmarks.reward_bench import make_table  # noqa: E402
from operators.recaption import (RecaptionConfig, Recaptioner, write_tiny_captioner,  # noqa: E402
                                 write_tiny_detector, write_tiny_rewriter)

TINY_DIR = str(ROOT / "configs" / "models" / "imgcurate-tiny-captioner")
TINY_OWL_DIR = str(ROOT / "configs" / "models" / "imgcurate-tiny-owlvit")
TINY_REWRITER_DIR = str(ROOT / "configs" / "models" / "imgcurate-tiny-rewriter")


def timed(cfg: RecaptionConfig, table: pa.Table, batch_rows: int, sync=None) -> tuple[float, int]:
    """Seconds for the operator over ``table`` (after a warm-up batch) and the tokens it generated."""
    op = Recaptioner(cfg)
    op(table.slice(0, min(cfg.micro_batch, table.num_rows)))  # warm-up: load, kernels, allocator
    if sync:
        sync()
    tokens = 0
    start = time.perf_counter()
    for s in range(0, table.num_rows, batch_rows):
        out = op(table.slice(s, batch_rows))
        tokens += sum(t or 0 for t in out.column("recaption_tokens").to_pylist())
    if sync:
        sync()
    return time.perf_counter() - start, tokens


def config(common: dict, micro_batch: int, args) -> RecaptionConfig:
    """The benchmark's settings at one micro-batch (every pass's, with ``--textualize``)."""
    c = {**common, "micro_batch": micro_batch, "batch_size": args.batch}
    if args.textualize:
        t = c["textualize"] = {"enabled": True, "object_words": args.objects.split(","), **args.textualize}
        t["detector"] = {**t["detector"], "micro_batch": micro_batch, "score_threshold": 0.5}
        t["rewriter"] = {**t["rewriter"], "micro_batch": micro_batch, "max_new_tokens": args.tokens,
                         "min_new_tokens": args.tokens}
    return RecaptionConfig(**c)


def run(title: str, base: dict, args, sync=None) -> None:
    table = make_table(synthetic_jpegs(args.n, args.image_px), captions_per_image=1)
    single_table = table.slice(0, args.single)
    common = {"enabled": True, "cache": False, "max_new_tokens": args.tokens, "min_new_tokens": args.tokens,
              "prompt": args.prompt, **base}
    t_b, tok_b = timed(config(common, args.batch, args), table, args.batch, sync)
    t_1, tok_1 = timed(config(common, 1, args), single_table, args.batch, sync)
    ips_b, ips_1 = args.n / t_b, args.single / t_1
    print(title + (", with Image Textualization's detector and rewriter (recaption tokens: the final text's)"
                   if args.textualize else ""))
    print(f"batched (micro_batch {args.batch}), {args.n} images:   {ips_b:,.1f} images/s, {tok_b / t_b:,.0f} tokens/s "
          f"({tok_b} tokens in {t_b:.2f}s)")
    print(f"one image at a time, {args.single} images:    {ips_1:,.1f} images/s, {tok_1 / t_1:,.0f} tokens/s "
          f"({tok_1} tokens in {t_1:.2f}s)")
    print(f"ratio batched / one-at-a-time: {ips_b / ips_1:.1f}x images/s")


def gpu(args) -> None:
    import torch

    assert torch.cuda.is_available(), "gpu mode needs CUDA"
    path = os.path.join(tempfile.mkdtemp(prefix="blip-base-random-"), "model")
    # BLIP-base's shape, random weights saved and loaded back by path (as a real checkpoint is).
    write_tiny_captioner(path, weights=True, image_size=384, hidden=768, layers=12, heads=12, vocab_size=30524)
    if args.textualize:  # OWL-ViT-B/16- and small-Llama-shaped random models, saved and loaded back by path
        args.textualize = {
            "detector": {"model": write_tiny_detector(path + "-owl", weights=True, image_size=768, hidden=768,
                                                      layers=12)},
            "rewriter": {"model": write_tiny_rewriter(path + "-llm", weights=True, hidden=896, layers=24)}}
    run(f"recaption benchmark (GPU: {torch.cuda.get_device_name(0)}), BLIP-base-shaped random model fp16, "
        f"{args.tokens} new tokens per caption, prompt {args.prompt!r}, JPEGs of {args.image_px}px",
        {"model": path, "device": "cuda", "precision": "fp16"}, args, torch.cuda.synchronize)


def cpu(args) -> None:
    import torch

    run(f"recaption benchmark (CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads), tiny random "
        f"captioner, {args.tokens} new tokens per caption, prompt {args.prompt!r}, JPEGs of {args.image_px}px",
        {"model": None, "model_config_path": TINY_DIR, "device": "cpu"}, args)


def tiny_textualize() -> dict:
    return {"detector": {"model": None, "model_config_path": TINY_OWL_DIR},
            "rewriter": {"model": None, "model_config_path": TINY_REWRITER_DIR}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["gpu", "cpu"])
    p.add_argument("--n", type=int, default=None, help="images for the batched run")
    p.add_argument("--batch", type=int, default=None, help="micro-batch of the batched run")
    p.add_argument("--single", type=int, default=None, help="images for the one-at-a-time run")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per caption (forced)")
    p.add_argument("--prompt", default="a picture of")
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument("--textualize", action="store_true", help="add Image Textualization's detector and rewriter")
    p.add_argument("--objects", default="dog,cat,bird,car,bus,tree,flower,house,table,chair,cup,hat",
                   help="textualize: the object words looked for in the descriptions")
    args = p.parse_args()
    if args.textualize:
        args.textualize = tiny_textualize()  # gpu mode replaces them with larger shapes
    if args.mode == "gpu":
        args.n, args.batch, args.single, args.tokens = (args.n or 2048, args.batch or 128, args.single or 64,
                                                        args.tokens or 32)
        gpu(args)
    else:
        args.n, args.batch, args.single, args.tokens = (args.n or 128, args.batch or 32, args.single or 32,
                                                        args.tokens or 16)
        cpu(args)


if __name__ == "__main__":
    main()
