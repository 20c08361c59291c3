"""ClipEmbedder: open_clip image and text embeddings and the image-text cosine ``clip_score``.

Methods: LAION-5B (Schuhmann et al., 2022) keeps pairs whose ViT-B/32 image-text cosine is at
least 0.28 (English); DataComp (Gadre et al., 2023) keeps the top 30% by CLIP score. This
operator computes the scores (every caption of a sample, and the maximum) and applies the
absolute threshold; the global top fraction is a phase-2 step over the whole run.

The model is named by a spec: an open_clip model name plus a pretrained tag, an
``hf-hub:`` id, or a checkpoint at a local path, ``file://`` or ``s3://``. With
``pretrained: null`` the weights are random (tests, dry run), and the run manifest says so.
On CUDA, JPEG bytes are decoded on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``)
and resized there in batches of equal-sized images; on CPU, Pillow plus open_clip's own
preprocessing is used (the reference path).
"""

from __future__ import annotations

import io
import logging
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, Field

from operators.base import (DROPPED, FAILED, Operator, Resources, StageResources, alive_mask, mark,
                            model_stage_resources, set_columns)
from operators.storage import StorageConfig, local_copy

log = logging.getLogger(__name__)


class ClipConfig(StageResources):
    """CLIP stage settings (``clip:`` in the job config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = False
    model: str = Field("ViT-B-32", description="open_clip model name, or hf-hub:ORG/NAME")
    pretrained: str | None = Field("laion2b_s34b_b79k",
                                   description="pretrained tag, checkpoint path / file:// / s3://, or null = random")
    model_config_path: str | None = Field(None, description="JSON of a custom open_clip architecture to register")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    decode: Literal["auto", "gpu", "cpu"] = Field("auto", description="auto: nvJPEG on CUDA, Pillow on CPU")
    min_score: float | None = Field(None, ge=-1, le=1, description="drop below this cosine (LAION: 0.28, ViT-B/32)")
    write_embeddings: bool = True
    cache_dir: str | None = Field(None, description="where s3:// checkpoints are copied (default: a temp dir)")
    batch_size: int = Field(256, ge=1)
    micro_batch: int = Field(256, ge=1, description="images decoded while the previous ones are encoded")

    def random_weights(self) -> bool:
        return self.pretrained is None and not self.model.startswith("hf-hub:")


def threshold_reason(min_score: float) -> str:
    return f"clip_below_{min_score:g}"


def is_checkpoint_spec(spec: str | None) -> bool:
    return spec is not None and ("://" in spec or spec.startswith(("/", ".")) or spec.endswith((".pt", ".bin",
                                                                                                  ".safetensors")))


def load_clip(cfg: ClipConfig, storage: StorageConfig | None = None, device: str = "cpu"):
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
    import torch

    # Random weights are seeded (without touching the process's RNG), so every actor, and a
    # rerun, score with the same random model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=None if cfg.model.startswith("hf-hub:") else pretrained, precision=precision,
            device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return model, preprocess, tokenizer


class ClipEmbedder(Operator):
    """Writes ``clip_image_embedding``, ``clip_text_embedding`` (best caption), ``clip_scores``, ``clip_score``."""

    name: ClassVar[str] = "clip"
    reads = ("status", "image", "captions")
    writes = ("clip_image_embedding", "clip_text_embedding", "clip_scores", "clip_score", "clip_best_caption")

    def __init__(self, config: ClipConfig | dict | None = None, storage: StorageConfig | dict | None = None):
        self.config = config if isinstance(config, ClipConfig) else ClipConfig(**(config or {}))
        self.storage = storage if isinstance(storage, StorageConfig) or storage is None else StorageConfig(**storage)
        self._model = None

    @classmethod
    def resources(cls, config: ClipConfig) -> Resources:
        return model_stage_resources(config)

    # -- state, once per actor ----------------------------------------------------------------
    def _setup(self):
        if self._model is not None:
            return
        import torch

        c = self.config
        if c.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = c.device
        self._model, self._preprocess, self._tokenizer = load_clip(c, self.storage, self.device)
        self.dtype = next(self._model.parameters()).dtype
        with torch.inference_mode():  # the embedding width, so every block has the same schema
            self.dim = int(self._model.encode_text(self._tokenizer(["a"]).to(self.device)).shape[-1])
        self.gpu_decode = self.device.startswith("cuda") and c.decode in ("auto", "gpu")
        size = self._model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        mean = getattr(self._model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(self._model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    # -- batch ---------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        import torch

        alive = alive_mask(batch)
        n = batch.num_rows
        outcomes: list = [None] * n
        img_out: list = [None] * n
        txt_out: list = [None] * n
        scores_out: list = [None] * n
        best_out: list = [None] * n
        idx = [i for i in range(n) if alive[i]]
        self._setup()
        if idx:
            images = batch.column("image").to_pylist()
            captions = batch.column("captions").to_pylist()
            img, ok = self._encode_images([images[i] for i in idx])
            for k, i in enumerate(idx):
                if not ok[k]:
                    outcomes[i] = (FAILED, "decode_error", "image bytes could not be decoded for CLIP")
            good = [i for k, i in enumerate(idx) if ok[k]]
            if good:
                with torch.inference_mode():
                    texts, owner = [], []
                    for k, i in enumerate(good):
                        for c in captions[i] or []:
                            texts.append(c)
                            owner.append(k)
                    txt = None
                    if texts:
                        tokens = self._tokenizer(texts).to(self.device)
                        txt = torch.nn.functional.normalize(self._model.encode_text(tokens).float(), dim=-1)
                img_np = img.cpu().numpy()
                txt_np = txt.cpu().numpy() if txt is not None else None
                owner_np = np.asarray(owner, dtype=np.int64)
                for k, i in enumerate(good):
                    img_out[i] = img_np[k]
                    rows = np.nonzero(owner_np == k)[0] if len(owner) else np.empty(0, np.int64)
                    if len(rows) == 0:
                        scores_out[i] = []
                        if self.config.min_score is not None:
                            outcomes[i] = (DROPPED, "no_caption", "no caption to score")
                        continue
                    s = txt_np[rows] @ img_np[k]
                    best = int(np.argmax(s))
                    scores_out[i] = [float(x) for x in s]
                    best_out[i] = best
                    txt_out[i] = txt_np[rows[best]]
                    if self.config.min_score is not None and float(s[best]) < self.config.min_score:
                        outcomes[i] = (DROPPED, threshold_reason(self.config.min_score),
                                       f"clip_score {float(s[best]):.4f} < {self.config.min_score}")
        emb_type = pa.list_(pa.float16(), self.dim)
        cols = {
            "clip_scores": pa.array(scores_out, pa.list_(pa.float32())),
            "clip_score": pa.array([max(s) if s else None for s in scores_out], pa.float32()),
            "clip_best_caption": pa.array(best_out, pa.int16()),
        }
        if self.config.write_embeddings:
            cols["clip_image_embedding"] = _fixed_f16(img_out, emb_type)
            cols["clip_text_embedding"] = _fixed_f16(txt_out, emb_type)
        batch = set_columns(batch, cols)
        return mark(batch, self.name, outcomes)

    # -- decoding and image encoding, overlapped ---------------------------------------------------
    def _encode_images(self, blobs: list[bytes | None]):
        """L2-normalized image embeddings of the decodable blobs, and which decoded.

        Micro-batches are decoded in a helper thread (on CUDA: on its own stream) while the
        model encodes the previous one, so decode and model overlap (double buffering).
        """
        import torch
        from concurrent.futures import ThreadPoolExecutor

        m = self.config.micro_batch
        chunks = [blobs[s:s + m] for s in range(0, len(blobs), m)]
        stream = torch.cuda.Stream() if self.device.startswith("cuda") else None

        def decode(chunk):
            if stream is None:
                return self._decode(chunk), None
            with torch.cuda.stream(stream):
                out = self._decode(chunk)
                done = torch.cuda.Event()
                done.record(stream)
            return out, done

        embs, ok_all = [], []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-decode") as pool:
            fut = pool.submit(decode, chunks[0])
            for j in range(len(chunks)):
                (pixels, ok), done = fut.result()
                if j + 1 < len(chunks):
                    fut = pool.submit(decode, chunks[j + 1])
                ok_all.extend(ok)
                if pixels is None:
                    continue
                if done is not None:
                    torch.cuda.current_stream().wait_event(done)
                    # Allocated on the decode stream, read on this one: without this the caching
                    # allocator could hand the block to the next decode while the encoder still reads it.
                    pixels.record_stream(torch.cuda.current_stream())
                with torch.inference_mode():
                    e = self._model.encode_image(pixels)
                    embs.append(torch.nn.functional.normalize(e.float(), dim=-1))
        img = torch.cat(embs) if embs else None
        return img, ok_all

    def _decode(self, blobs: list[bytes | None]):
        """A float tensor (N_ok, 3, S, S) on the device, and which inputs decoded."""
        import torch

        if self.gpu_decode:
            return self._decode_gpu(blobs)
        from PIL import Image

        tensors, ok = [], []
        for b in blobs:
            try:
                if b is None:
                    raise ValueError("no image")
                with Image.open(io.BytesIO(b)) as im:
                    tensors.append(self._preprocess(im.convert("RGB")))
                ok.append(True)
            except Exception:  # noqa: BLE001 - recorded per row by the caller
                ok.append(False)
        if not tensors:
            return None, ok
        return torch.stack(tensors).to(self.device, self.dtype), ok

    def _decode_gpu(self, blobs: list[bytes | None]):
        """nvJPEG batch decode; non-JPEG or failing images fall back to Pillow one by one."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded: list = [None] * len(blobs)
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
        from PIL import Image

        for i, b in enumerate(blobs):  # what nvJPEG did not decode, JPEG or not
            if decoded[i] is None and b is not None:
                try:
                    with Image.open(io.BytesIO(b)) as im:
                        arr = np.asarray(im.convert("RGB"))
                    decoded[i] = torch.from_numpy(arr).permute(2, 0, 1).to(self.device)
                except Exception:  # noqa: BLE001
                    decoded[i] = None
        ok = [d is not None for d in decoded]
        good = [d for d in decoded if d is not None]
        if not good:
            return None, ok
        return self._gpu_preprocess(good), ok

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


def _fixed_f16(rows: list, typ: pa.DataType) -> pa.Array:
    """Embeddings as a fixed-size list of float16 (nulls where not computed)."""
    if not pa.types.is_fixed_size_list(typ):
        return pa.array([None] * len(rows), pa.list_(pa.float16()))
    dim = typ.list_size
    flat = np.zeros((len(rows), dim), dtype=np.float16)
    valid = np.zeros(len(rows), dtype=bool)
    for i, v in enumerate(rows):
        if v is not None:
            flat[i] = v
            valid[i] = True
    values = pa.array(flat.reshape(-1), pa.float16())
    arr = pa.FixedSizeListArray.from_arrays(values, dim)
    if not valid.all():
        arr = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))
    return arr


def model_report(cfg: ClipConfig) -> dict:
    """What the run manifest says about the CLIP model (random weights are called so)."""
    return {"model": cfg.model, "pretrained": cfg.pretrained, "random_weights": cfg.random_weights(),
            "min_score": cfg.min_score}
