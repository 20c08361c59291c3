"""An open_clip model from a spec, and its public encoders: images (from bytes or PIL images) and texts.

The CLIP stage (operators/clip.py), RIGID (operators/safety.py) and the reward model's open_clip
backbone (operators/models/reward.py) all load and call the model through ``ClipModel``.

The model is named by a spec (``ClipConfig``): an open_clip model name plus a pretrained tag,
an ``hf-hub:`` id, or a checkpoint at a local path, ``file://`` or ``s3://``. With
``pretrained: null`` the weights are random and seeded (tests, dry run). On CUDA, JPEG bytes
are decoded on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``) and resized there in
batches of equal-sized images; on CPU, Pillow plus open_clip's own preprocessing is used (the
reference path). Micro-batches are decoded in a helper thread while the model encodes the
previous one (double buffering).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from operators.models.common import decode_all, decode_failure, decode_rgb, resolve_device, seeded
from operators.storage import StorageConfig, local_copy

if TYPE_CHECKING:
    from operators.clip import ClipConfig

# open_clip's (OpenAI's) normalization, for models that do not carry their own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_checkpoint_spec(spec: str | None) -> bool:
    return spec is not None and ("://" in spec or spec.startswith(("/", ".")) or spec.endswith((".pt", ".bin",
                                                                                                  ".safetensors")))


def load_clip(cfg: "ClipConfig", storage: StorageConfig | None = None, device: str = "cpu"):
    """(model, preprocess, tokenizer) for a spec; weights are never downloaded for null/paths."""
    import open_clip

    if cfg.model_config_path:
        open_clip.add_model_config(cfg.model_config_path)
    pretrained = cfg.pretrained
    if is_checkpoint_spec(pretrained):
        pretrained = local_copy(pretrained, storage, cfg.cache_dir)
    precision = cfg.precision
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    # Random weights are seeded (without touching the process's RNG), so every actor, and a
    # rerun, score with the same random model.
    model, _, preprocess = seeded(lambda: open_clip.create_model_and_transforms(
        cfg.model, pretrained=None if cfg.model.startswith("hf-hub:") else pretrained, precision=precision,
        device=device))
    model.eval()
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return model, preprocess, tokenizer


class ClipModel:
    """A loaded open_clip model and its encoders (embeddings are L2-normalized float32 unless said).

    Public state: ``model``, ``preprocess`` (open_clip's PIL transform), ``tokenizer``, ``device``,
    ``dtype``, ``dim`` (embedding width), ``image_size``, ``mean`` / ``std`` (tensors (1, 3, 1, 1)
    on the device), ``micro_batch`` and ``gpu_decode`` (nvJPEG on CUDA). The encoders follow the
    caller's grad mode, except ``encode_images``, which runs under ``torch.inference_mode``."""

    def __init__(self, cfg: "ClipConfig", storage: StorageConfig | None = None, device: str | None = None,
                 micro_batch: int | None = None):
        import torch

        self.spec = cfg
        self.device = resolve_device(device or cfg.device)
        self.model, self.preprocess, self.tokenizer = load_clip(cfg, storage, self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.micro_batch = micro_batch or cfg.micro_batch
        with torch.inference_mode():  # the embedding width, so every block has the same schema
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])
        self.gpu_decode = self.device.startswith("cuda") and cfg.decode in ("auto", "gpu")
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        mean = getattr(self.model.visual, "image_mean", None) or CLIP_MEAN
        std = getattr(self.model.visual, "image_std", None) or CLIP_STD
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    # -- texts -----------------------------------------------------------------------------------
    def encode_texts(self, texts: list[str], chunk: int | None = None):
        """(len(texts), dim) text embeddings, tokenized ``chunk`` at a time (None: all at once)."""
        import torch

        step = chunk or max(1, len(texts))
        out = []
        for s in range(0, len(texts), step):
            tokens = self.tokenizer(texts[s:s + step]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    # -- images ----------------------------------------------------------------------------------
    def encode_pixels(self, pixels, normalize: bool = True):
        """Image embeddings (N, dim) of preprocessed pixels (N, 3, S, S), float32."""
        import torch

        e = self.model.encode_image(pixels.to(self.device, self.dtype)).float()
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e

    def preprocess_pil(self, images: list):
        """open_clip's preprocessing of PIL images: a float tensor (N, 3, S, S) on the CPU."""
        import torch

        return torch.stack([self.preprocess(im) for im in images])

    def encode_pil(self, images: list, normalize: bool = True):
        """Image embeddings (N, dim) of PIL images."""
        return self.encode_pixels(self.preprocess_pil(images), normalize)

    def pixels(self, blobs: list[bytes | None], stage: str):
        """Decode and preprocess: a tensor (N_ok, 3, S, S) on the device (None when nothing decoded)
        and per blob ``None`` or the ``decode_error`` outcome of ``stage``."""
        if self.gpu_decode:
            return self._decode_gpu(blobs, stage)
        images, outcomes = decode_all(blobs, stage)
        good = [im for im in images if im is not None]
        if not good:
            return None, outcomes
        return self.preprocess_pil(good).to(self.device, self.dtype), outcomes

    def encode_images(self, blobs: list[bytes | None], stage: str):
        """Image embeddings (N_ok, dim) of the decodable blobs (None when none decoded) and per
        blob ``None`` or its ``decode_error`` outcome.

        Micro-batches are decoded in a helper thread (on CUDA: on its own stream) while the
        model encodes the previous one, so decode and model overlap (double buffering).
        """
        import torch
        from concurrent.futures import ThreadPoolExecutor

        m = self.micro_batch
        chunks = [blobs[s:s + m] for s in range(0, len(blobs), m)]
        if not chunks:
            return None, []
        stream = torch.cuda.Stream() if self.device.startswith("cuda") else None

        def decode(chunk):
            if stream is None:
                return self.pixels(chunk, stage), None
            with torch.cuda.stream(stream):
                out = self.pixels(chunk, stage)
                done = torch.cuda.Event()
                done.record(stream)
            return out, done

        embs, outcomes = [], []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-decode") as pool:
            fut = pool.submit(decode, chunks[0])
            for j in range(len(chunks)):
                (pixels, outs), done = fut.result()
                if j + 1 < len(chunks):
                    fut = pool.submit(decode, chunks[j + 1])
                outcomes.extend(outs)
                if pixels is None:
                    continue
                if done is not None:
                    torch.cuda.current_stream().wait_event(done)
                    # Allocated on the decode stream, read on this one: without this the caching
                    # allocator could hand the block to the next decode while the encoder still reads it.
                    pixels.record_stream(torch.cuda.current_stream())
                with torch.inference_mode():
                    embs.append(self.encode_pixels(pixels))
        return (torch.cat(embs) if embs else None), outcomes

    def _decode_gpu(self, blobs: list[bytes | None], stage: str):
        """nvJPEG batch decode; non-JPEG or failing images fall back to Pillow one by one."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded: list = [None] * len(blobs)
        outcomes: list = [None] * len(blobs)
        jpeg_idx = [i for i, b in enumerate(blobs) if b is not None and b[:3] == b"\xff\xd8\xff"]
        if jpeg_idx:
            datas = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpeg_idx]
            try:
                outs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
                for i, t in zip(jpeg_idx, outs):
                    decoded[i] = t
            except Exception:  # noqa: BLE001 - one bad JPEG fails the batch call: retry one by one
                for i, d in zip(jpeg_idx, datas):
                    try:
                        decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device)
                    except Exception:  # noqa: BLE001 - Pillow tries it below
                        decoded[i] = None
        for i, b in enumerate(blobs):  # what nvJPEG did not decode, JPEG or not
            if decoded[i] is None:
                try:
                    arr = np.asarray(decode_rgb(b))
                    decoded[i] = torch.from_numpy(arr).permute(2, 0, 1).to(self.device)
                except Exception as exc:  # noqa: BLE001 - recorded per row
                    outcomes[i] = decode_failure(stage, exc)
        good = [d for d in decoded if d is not None]
        if not good:
            return None, outcomes
        return self._gpu_preprocess(good), outcomes

    def _gpu_preprocess(self, images: list):
        """Resize the short side to S and center-crop, batched over images of equal size."""
        import torch
        import torch.nn.functional as F

        S = self.image_size
        out = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, t in enumerate(images):
            groups.setdefault(tuple(t.shape[-2:]), []).append(k)
        for (h, w), ks in groups.items():
            x = torch.stack([images[k] for k in ks]).float()
            scale = S / min(h, w)
            nh, nw = max(S, round(h * scale)), max(S, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - S) // 2, (nw - S) // 2
            x = x[:, :, top:top + S, left:left + S].clamp_(0, 255) / 255.0
            x = (x - self.mean) / self.std
            for j, k in enumerate(ks):
                out[k] = x[j]
        return torch.stack(out).to(self.dtype)
