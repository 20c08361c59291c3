"""Reward-head training: preference data, pairs, the Bradley-Terry loss, the trainer loop, evaluation.

Compress & Align (Zhang et al., 2023) trains its reward model on human rankings of several
captions per image, expanded into pairwise comparisons, with ImageReward's (Xu et al., 2023)
Bradley-Terry loss ``-log sigmoid(r_a - r_b)`` for "a preferred over b". Ties are allowed in a
ranking: with ``ties: half`` a tied pair is a comparison with target 0.5 (the loss is symmetric
in the pair and minimal at equal rewards, so ties pull rewards together and never push a
direction); with ``ties: skip`` they yield no pair.

Rows are split into train and held-out by a hash of the image's content (the sha256 of its
bytes), so held-out pairs are of unseen images even when one image comes twice, under two ids or
two URLs; rows given by ``image_uri`` alone are split by the URI (``split_key``). Held-out
pairwise accuracy is reported for the trained head, the untrained head and the backbone's own
image-text score (the CLIP score, or BLIP's ITC cosine: ``BASELINES``).

The backbone is frozen by default and its features are computed once per (image, caption);
``unfreeze_last_blocks`` tunes the last blocks of the towers too. Gradients are averaged over Ray
Train workers with an explicit all-reduce (``Reducer``). The entry point is
``jobs/train_reward.py``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.clip import ClipConfig
from operators.models.common import decode_rgb
from operators.models.reward import (BASELINES, CHECKPOINT_FORMAT, FEATURES, build_head, load_backbone,
                                     save_reward_checkpoint)
from operators.storage import StorageConfig, fsspec_fs

log = logging.getLogger("imgcurate.train_reward")

HEAD_FILE = "reward_head.pt"
REPORT_FILE = "train_report.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "imgcurate-tiny-clip"
TINY_CONFIG = os.path.join(ROOT, "configs", "models", f"{TINY}.json")


class TrainRewardConfig(BaseModel):
    """Settings of a reward-head training run (the CLI flags map onto these)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data: str = Field(..., description="Parquet file or directory of preference rows (local or s3://)")
    out: str = Field(..., description="output dir or prefix: reward_head.pt, train_report.json, Ray Train's run")
    backbone_type: Literal["open_clip", "blip"] = "open_clip"
    backbone: ClipConfig = Field(default_factory=lambda: ClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    blip_path: str | None = None
    head_hidden: list[int] = Field([512, 64])
    dropout: float = Field(0.1, ge=0, lt=1)
    unfreeze_last_blocks: int = Field(0, ge=0, description="0 = frozen backbone (features computed once)")
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    backbone_lr: float = Field(1e-5, gt=0, description="learning rate of unfrozen backbone blocks")
    weight_decay: float = Field(1e-4, ge=0)
    batch_rows: int = Field(32, ge=1, description="images per step (all their pairs)")
    ties: Literal["half", "skip"] = "half"
    val_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    run_name: str = "train_reward"
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _blip_path(self):
        if self.backbone_type == "blip" and not self.blip_path:
            raise ValueError("backbone_type 'blip' needs blip_path (a local transformers directory)")
        return self


# --- preference data ----------------------------------------------------------------------------
def expand_pairs(ranks: list[int], ties: str = "half") -> list[tuple[int, int, float]]:
    """Pairwise comparisons of one ranking: ``(a, b, P(a preferred over b))``; lower rank is better.

    Strict pairs are oriented preferred-first with target 1.0; a tie is ``(a, b, 0.5)`` with
    ``ties="half"`` and nothing with ``ties="skip"``.
    """
    out = []
    for a in range(len(ranks)):
        for b in range(a + 1, len(ranks)):
            if ranks[a] < ranks[b]:
                out.append((a, b, 1.0))
            elif ranks[b] < ranks[a]:
                out.append((b, a, 1.0))
            elif ties == "half":
                out.append((a, b, 0.5))
    return out


@dataclass
class Prefs:
    """Preference rows ready for training: per row its image, captions and pairs."""

    images: list[bytes] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    pairs: list[np.ndarray] = field(default_factory=list)    # (P, 2) local caption indices
    targets: list[np.ndarray] = field(default_factory=list)  # (P,) 1.0 or 0.5
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def counts(self) -> dict[str, int]:
        t = np.concatenate(self.targets) if self.targets else np.zeros(0)
        return {"rows": len(self), "pairs": int((t == 1.0).sum()), "ties": int((t == 0.5).sum())}


def _read_image(row: dict, storage: StorageConfig | None) -> bytes:
    if row.get("image") is not None:
        return row["image"]
    uri = row.get("image_uri")
    if not uri:
        raise LookupError("no_image")
    fs, p = fsspec_fs(uri, storage)
    with fs.open(p, "rb") as f:
        return f.read()


def prefs_from_table(table: pa.Table | None, ties: str = "half", storage: StorageConfig | None = None) -> Prefs:
    """Validate rows and expand rankings; a bad row is skipped and counted by reason, never raised."""
    out = Prefs()
    if table is None:
        return out

    def skip(reason: str) -> None:
        out.skipped[reason] = out.skipped.get(reason, 0) + 1

    for row in table.to_pylist():
        caps, ranks = row.get("captions"), row.get("ranks")
        if not caps or ranks is None or len(caps) != len(ranks) or any(r is None for r in ranks) \
                or any(c is None for c in caps):
            skip("bad_ranking")
            continue
        pairs = expand_pairs(list(ranks), ties)
        if not pairs:
            skip("no_pairs")
            continue
        try:
            blob = _read_image(row, storage)
            decode_rgb(blob)
        except LookupError:
            skip("no_image")
            continue
        except Exception:  # noqa: BLE001 - counted, the run goes on
            skip("image_error")
            continue
        out.images.append(blob)
        out.captions.append(list(caps))
        out.pairs.append(np.asarray([(a, b) for a, b, _ in pairs], np.int64))
        out.targets.append(np.asarray([t for _, _, t in pairs], np.float32))
    return out


def split_key(row: dict) -> bytes:
    """What puts a row on its side of the split: the sha256 of its image bytes, so one image under
    two ids or URLs never sits on both sides. A row without bytes is keyed by its ``image_uri``
    (else its ``id``): the split does not fetch images, so the same image at two URIs can still
    land on both sides; give the bytes, or deduplicate by content first, where that matters."""
    if row.get("image") is not None:
        return hashlib.sha256(row["image"]).digest()
    for col in ("image_uri", "id"):
        if row.get(col) is not None:
            return str(row[col]).encode()
    return b""


def is_val(key: bytes, val_fraction: float, seed: int) -> bool:
    """Deterministic held-out membership by a hash of the row key (no global shuffle)."""
    h = hashlib.blake2b(key, digest_size=8, person=f"split{seed}".encode()[:16]).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < val_fraction


def _keep_split(batch: pa.Table, val: bool, val_fraction: float, seed: int) -> pa.Table:
    cols = [c for c in ("id", "image_uri", "image") if c in batch.column_names]
    keys = batch.select(cols).to_pylist() if cols else [{}] * batch.num_rows
    mask = [is_val(split_key(k), val_fraction, seed) == val for k in keys]
    return batch.filter(pa.array(mask, pa.bool_()))


# --- synthetic preference set (tests, dry run) ------------------------------------------------------
COLOURS = {"red": (215, 35, 35), "green": (35, 190, 60), "blue": (40, 70, 215), "yellow": (225, 210, 40)}
OBJECTS = ["square", "ball", "car", "flower", "house", "cup", "kite", "boat"]
TEMPLATES = ["a {}", "a photo of a {}", "an image showing a {}", "there is a {} here"]


def synthetic_preferences(n_images: int = 64, seed: int = 0, image_px: int = 48) -> pa.Table:
    """Images mostly of one colour; of four captions the one naming that colour is ranked first,
    a colourless one second and two naming other colours tie last: a learnable signal."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = {"id": [], "image": [], "captions": [], "ranks": []}
    for i in range(n_images):
        colour = names[i % len(names)]
        base = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 18, 3)
        px = np.clip(base + rng.normal(0, 25, (image_px, image_px, 3)), 0, 255)
        s = int(rng.integers(image_px // 6, image_px // 3))  # a small block of another colour
        y, x = rng.integers(0, image_px - s, 2)
        px[y:y + s, x:x + s] = COLOURS[names[(i + 1 + int(rng.integers(0, 3))) % len(names)]]
        buf = io.BytesIO()
        Image.fromarray(px.astype(np.uint8)).save(buf, "JPEG", quality=90)
        obj = OBJECTS[int(rng.integers(0, len(OBJECTS)))]
        others = [c for c in names if c != colour]
        wrong = [others[k] for k in rng.choice(len(others), 2, replace=False)]
        # Templates drawn per caption: length and wording carry no rank, only the colour does.
        caps = [TEMPLATES[int(rng.integers(0, len(TEMPLATES)))].format(f"{c} {obj}" if c else obj)
                for c in (colour, None, wrong[0], wrong[1])]
        ranks = [0, 1, 2, 2]
        order = rng.permutation(4)
        rows["id"].append(f"syn{seed}-{i}")
        rows["image"].append(buf.getvalue())
        rows["captions"].append([caps[k] for k in order])
        rows["ranks"].append([ranks[k] for k in order])
    return pa.table({"id": pa.array(rows["id"], pa.string()), "image": pa.array(rows["image"], pa.binary()),
                     "captions": pa.array(rows["captions"], pa.list_(pa.string())),
                     "ranks": pa.array(rows["ranks"], pa.list_(pa.int32()))})


def tiny_backbone() -> ClipConfig:
    """The tiny random open_clip model of the tests and the dry run (no download)."""
    return ClipConfig(model=TINY, pretrained=None, model_config_path=TINY_CONFIG, device="cpu")


# --- training ------------------------------------------------------------------------------------
class Reducer:
    """Sums and maxima over the workers (a no-op for one process)."""

    def __init__(self, world: int = 1):
        self.world = world

    def sum(self, t):
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def average_grads(self, params: list) -> None:
        """Data-parallel gradient averaging, as DDP does (one flat all-reduce, like its buckets),
        written out because the forward spans the head and any unfrozen backbone blocks."""
        import torch

        for p in params:
            if p.grad is None:  # a worker without rows this step still joins the all-reduce
                p.grad = torch.zeros_like(p)
        if self.world == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def max_int(self, v: int, device="cpu") -> int:
        if self.world == 1:
            return v
        import torch
        import torch.distributed as dist

        t = torch.tensor([v], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def _encode(backbone, prefs: Prefs, rows: list[int], grad: bool = False, similarity: bool = False,
            chunk: int = 256):
    """Features of every caption of ``rows`` (concatenated), where each row's captions start, and
    optionally the backbone's plain image-text similarity. Images go through in chunks, so only
    the features are kept (BLIP's per-image hidden states are large)."""
    import torch

    feats, sims, offsets = [], [], [0]
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        states, ok = backbone.image_states([prefs.images[r] for r in part], grad=grad)
        if not all(ok):  # images were checked when loaded: the same bytes cannot fail now
            raise RuntimeError("an image that decoded when loaded failed to decode for the backbone")
        texts, owner = [], []
        for k, r in enumerate(part):
            texts += prefs.captions[r]
            owner += [k] * len(prefs.captions[r])
            offsets.append(offsets[-1] + len(prefs.captions[r]))
        owner_t = torch.as_tensor(owner, device=states.device)
        feats.append(backbone.features(states, texts, owner_t))
        if similarity:
            sims.append(backbone.similarity(states, texts, owner_t).float())
    return torch.cat(feats), offsets, (torch.cat(sims) if similarity else None)


def _pair_index(prefs: Prefs, rows, offsets):
    a = np.concatenate([prefs.pairs[r][:, 0] + offsets[k] for k, r in enumerate(rows)])
    b = np.concatenate([prefs.pairs[r][:, 1] + offsets[k] for k, r in enumerate(rows)])
    t = np.concatenate([prefs.targets[r] for r in rows])
    return a, b, t


def bt_loss(margin, target):
    """Bradley-Terry pairwise loss on ``r_a - r_b``: ``-t log s(m) - (1 - t) log s(-m)``, mean over pairs."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(margin, target)


@dataclass
class Eval:
    """Scores of every caption of a set and its pairs."""

    a: np.ndarray
    b: np.ndarray
    t: np.ndarray

    def accuracy(self, scores: np.ndarray) -> float | None:
        strict = self.t == 1.0
        if not strict.any():
            return None
        d = scores[self.a[strict]] - scores[self.b[strict]]
        return float(((d > 0) + 0.5 * (d == 0)).mean())

    def tie_margin(self, scores: np.ndarray) -> float | None:
        tie = self.t == 0.5
        return float(np.abs(scores[self.a[tie]] - scores[self.b[tie]]).mean()) if tie.any() else None


@dataclass
class FitResult:
    head: object
    backbone_state: dict | None
    meta: dict
    metrics: dict


def fit(cfg: TrainRewardConfig, train: Prefs, val: Prefs | None = None, device: str = "cpu",
        reducer: Reducer | None = None, rank: int = 0, on_epoch: Callable[[int, float], None] | None = None) -> FitResult:
    """Train the head on this worker's rows (every worker calls it; gradients are averaged).

    ``val`` is evaluated where given (rank 0): trained head, the untrained head, and the backbone's
    own image-text score (``val_accuracy_backbone``: CLIP score or BLIP ITC, ``BASELINES``).
    """
    import torch

    threads = torch.get_num_threads()
    if not str(device).startswith("cuda"):
        # A worker computes with the CPUs it was given (Ray sets OMP_NUM_THREADS the same way);
        # on a shared machine more threads than that only spin against each other.
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    try:
        return _fit(cfg, train, val, device, reducer or Reducer(), rank, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _fit(cfg: TrainRewardConfig, train: Prefs, val: Prefs | None, device: str, reducer: Reducer, rank: int,
         on_epoch: Callable[[int, float], None] | None) -> FitResult:
    import torch

    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.backbone_type, cfg.backbone.model_copy(update={"device": _device_kind(device)}),
                             cfg.blip_path, cfg.storage, _device_kind(device))
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    tunable = backbone.tunable(cfg.unfreeze_last_blocks) if cfg.unfreeze_last_blocks else {}
    for p in tunable.values():
        p.requires_grad_(True)
    frozen = not tunable
    head = build_head(backbone.feature_dim, list(cfg.head_hidden), cfg.dropout, seed=cfg.seed).to(backbone.device)
    metrics: dict = {}

    def evaluate(prefs: Prefs, cache=None):
        """(head scores, Eval of the pairs, cache of features) over a whole set; the cache holds
        the backbone's features and its own image-text score, reusable while the backbone is frozen."""
        rows = list(range(len(prefs)))
        with torch.inference_mode():
            head.eval()
            cache = cache or _encode(backbone, prefs, rows, similarity=True)
            s = head(cache[0]).squeeze(-1).float().cpu().numpy()
        a, b, t = _pair_index(prefs, rows, cache[1])
        return s, Eval(a, b, t), cache

    val_cache = None
    if val is not None and len(val):
        s0, ev, val_cache = evaluate(val)
        sim = val_cache[2].cpu().numpy()
        metrics.update(val_rows=len(val), val_pairs=int((ev.t == 1.0).sum()), val_ties=int((ev.t == 0.5).sum()),
                       val_accuracy_untrained=ev.accuracy(s0), val_accuracy_backbone=ev.accuracy(sim),
                       val_tie_margin_untrained=ev.tie_margin(s0))
    cache = None
    if frozen and len(train):  # features once; training touches the head only
        with torch.inference_mode():
            feats, offsets, _ = _encode(backbone, train, list(range(len(train))))
        cache = (feats.clone(), offsets)  # a normal tensor: inference tensors cannot enter autograd

    params = [{"params": list(head.parameters()), "lr": cfg.lr}]
    if tunable:
        params.append({"params": list(tunable.values()), "lr": cfg.backbone_lr})
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    trainable = [p for g in params for p in g["params"]]
    n = len(train)
    steps = reducer.max_int(math.ceil(n / cfg.batch_rows) if n else 0, backbone.device)
    rng = np.random.default_rng(cfg.seed + 1000 * rank)
    for epoch in range(cfg.epochs):
        head.train()
        perm = rng.permutation(n) if n else np.zeros(0, np.int64)
        loss_sum = torch.zeros(2, device=backbone.device)
        for step in range(steps):
            opt.zero_grad(set_to_none=False)
            if n:
                rows = [int(perm[(step * cfg.batch_rows + k) % n]) for k in range(min(cfg.batch_rows, n))]
                if cache is not None:
                    feats_all, offs_all = cache
                    parts = [feats_all[offs_all[r]:offs_all[r + 1]] for r in rows]
                    offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
                    feats = torch.cat(parts)
                else:
                    feats, offsets, _ = _encode(backbone, train, rows, grad=True)
                a, b, t = _pair_index(train, rows, offsets)
                s = head(feats).squeeze(-1)
                loss = bt_loss(s[torch.as_tensor(a)] - s[torch.as_tensor(b)],
                               torch.as_tensor(t, device=s.device))
                loss.backward()
                loss_sum += torch.stack([loss.detach() * len(t), torch.tensor(float(len(t)), device=s.device)])
            reducer.average_grads(trainable)
            opt.step()
        reducer.sum(loss_sum)
        epoch_loss = float(loss_sum[0] / loss_sum[1]) if float(loss_sum[1]) else float("nan")
        metrics["train_loss"] = epoch_loss
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
    head.eval()

    # Standardize as ImageReward: mean and std of the trained reward over the training captions.
    with torch.inference_mode():
        if n:
            feats = cache[0] if cache is not None else _encode(backbone, train, list(range(n)))[0]
            s = head(feats).squeeze(-1).double()
            stats = torch.stack([s.sum(), (s * s).sum(), torch.tensor(float(len(s)), device=s.device,
                                                                      dtype=torch.float64)])
        else:
            stats = torch.zeros(3, dtype=torch.float64, device=backbone.device)
    reducer.sum(stats)
    count = max(float(stats[2]), 1.0)
    mean = float(stats[0]) / count
    std = math.sqrt(max(float(stats[1]) / count - mean * mean, 0.0)) or 1.0
    c = train.counts()
    counts = torch.tensor([c["rows"], c["pairs"], c["ties"]], dtype=torch.int64, device=backbone.device)
    reducer.sum(counts)
    metrics.update(train_rows=int(counts[0]), train_pairs=int(counts[1]), train_ties=int(counts[2]),
                   reward_mean=mean, reward_std=std, epochs=cfg.epochs)
    if val is not None and len(val):
        s, ev, _ = evaluate(val, cache=val_cache if frozen else None)
        metrics.update(val_accuracy=ev.accuracy(s), val_tie_margin=ev.tie_margin(s))
    meta = {
        "backbone_type": backbone.kind, "backbone": backbone.describe(), "feature_dim": backbone.feature_dim,
        "features": FEATURES[backbone.kind], "baseline": BASELINES[backbone.kind],
        "head_hidden": list(cfg.head_hidden), "reward_mean": mean, "reward_std": std,
        "unfreeze_last_blocks": cfg.unfreeze_last_blocks, "ties": cfg.ties,
        "trained": {k: v for k, v in metrics.items() if isinstance(v, (int, float, type(None)))},
        "format": CHECKPOINT_FORMAT,
    }
    bstate = {k: p.detach() for k, p in tunable.items()} if tunable else None
    return FitResult(head=head, backbone_state=bstate, meta=meta, metrics=metrics)


def _device_kind(device) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


# --- Ray Train ------------------------------------------------------------------------------------
def _collect(shard) -> pa.Table | None:
    if shard is None:
        return None
    parts = list(shard.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(parts, promote_options="default") if parts else None


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: its shard of the training rows; rank 0 also evaluates the held-out rows."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainRewardConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # "cuda" below is this worker's own GPU
    train = prefs_from_table(_collect(ray.train.get_dataset_shard("train")), cfg.ties, cfg.storage)
    val = prefs_from_table(_collect(ray.train.get_dataset_shard("val")), "half", cfg.storage) if rank == 0 else None
    log.info("worker %d/%d: %d training rows (%s skipped)", rank, world, len(train), train.skipped or "none")
    skipped = torch.tensor([sum(train.skipped.values())], dtype=torch.int64,
                           device="cuda" if device.type == "cuda" else "cpu")
    reducer = Reducer(world)
    reducer.sum(skipped)

    def on_epoch(epoch: int, loss: float) -> None:
        # Logged, not ray.train.report()ed: a report is a barrier across workers (about a
        # second each here), and only the final one carries the checkpoint.
        if rank == 0 and (epoch + 1) % max(1, cfg.epochs // 10) == 0:
            log.info("epoch %d/%d: train loss %.4f", epoch + 1, cfg.epochs, loss)

    res = fit(cfg, train, val, device=str(device), reducer=reducer, rank=rank, on_epoch=on_epoch)
    metrics = dict(res.metrics, skipped_train_rows=int(skipped.item()),
                   skipped_val_rows=sum(val.skipped.values()) if val is not None else None)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            res.meta["trained"].update(skipped_train_rows=metrics["skipped_train_rows"])
            save_reward_checkpoint(os.path.join(d, HEAD_FILE), res.head, res.meta, res.backbone_state)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


@dataclass
class TrainReport:
    """What a training run produced; printed by the CLI and written to OUT/train_report.json."""

    checkpoint: str
    ray_checkpoint: str
    backbone: dict
    head_hidden: list[int]
    unfreeze_last_blocks: int
    num_workers: int
    use_gpu: bool
    metrics: dict
    seconds: float
    baseline: str  # what metrics["val_accuracy_backbone"] measured (BASELINES)

    def text(self) -> str:
        m = self.metrics
        b = self.backbone
        rnd = ": RANDOM WEIGHTS" if b.get("random_weights") else ""
        tuned = f"last {self.unfreeze_last_blocks} blocks tuned" if self.unfreeze_last_blocks else "frozen"

        def f(v):
            return "n/a" if v is None else f"{v:.3f}"

        lines = [
            f"reward training: backbone {b.get('model')} (pretrained={b.get('pretrained')}{rnd}, {tuned}), "
            f"head hidden {self.head_hidden}",
            f"data: train {m.get('train_rows')} images / {m.get('train_pairs')} pairs + {m.get('train_ties')} ties "
            f"(skipped {m.get('skipped_train_rows')}); held-out {m.get('val_rows', 0)} images / "
            f"{m.get('val_pairs', 0)} pairs + {m.get('val_ties', 0)} ties",
            f"{self.num_workers} Ray Train worker(s) ({'GPU' if self.use_gpu else 'CPU'}), {m.get('epochs')} epochs, "
            f"final train loss {f(m.get('train_loss'))}, {self.seconds:.1f}s",
            f"held-out pairwise accuracy ({m.get('val_pairs', 0)} pairs of unseen images; chance 0.5):",
            f"  trained reward model   {f(m.get('val_accuracy'))}",
            f"  untrained head         {f(m.get('val_accuracy_untrained'))}",
            f"  {self.baseline:<22} {f(m.get('val_accuracy_backbone'))}   (the backbone alone: its image-text cosine)",
            f"held-out tied pairs, mean |reward gap| (raw): trained {f(m.get('val_tie_margin'))}, "
            f"untrained {f(m.get('val_tie_margin_untrained'))}",
            f"checkpoint: {self.checkpoint}   (reward.head_checkpoint: {self.checkpoint})",
            f"Ray Train checkpoint: {self.ray_checkpoint}",
        ]
        return "\n".join(lines)


