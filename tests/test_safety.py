"""SafetyScorer with tiny random-weight heads and models built by the test (no downloads)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from jobs.config import CONFIG_DIR, ConfigError, load_config  # noqa: E402
from jobs.stages import chain_errors, models_of, stage  # noqa: E402
from operators.clip import ClipConfig, ClipEmbedder  # noqa: E402
from operators.models.dino import DinoModel  # noqa: E402
from operators.models.laion import build_aesthetic_head, build_nsfw_head, build_watermark_model  # noqa: E402
from operators.safety import (  # noqa: E402
    AestheticSpec, DinoSpec, EmbedderSpec, NsfwSpec, RigidSpec, SafetyConfig, SafetyScorer, WatermarkSpec,
    aesthetic_reason, model_report, nsfw_reason, rigid_reason, watermark_reason,
)
from tests.conftest import ROOT  # noqa: E402
from tests.helpers import image_batch, jpeg  # noqa: E402

DIM = 32
TINY_CLIP = "imgcurate-tiny-clip"
TINY_CLIP_CONFIG = str(ROOT / "configs" / "models" / f"{TINY_CLIP}.json")
TINY_ID = f"{TINY_CLIP}/random"  # what a head trained on the tiny random CLIP names as its embedder
TINY_EMBEDDER = EmbedderSpec(model=TINY_CLIP, pretrained=None, model_config_path=TINY_CLIP_CONFIG)
TINY_CLIP_STAGE = ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, model_config_path=TINY_CLIP_CONFIG,
                             device="cpu")
TINY_TIMM = "test_efficientnet"  # timm's own ~100k-parameter test model, classifier named "classifier"
TINY_DINO_ARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "init_values": 1.0}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision/timm's, as RIGID uses


def embeddings(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    e = np.random.RandomState(seed).randn(n, dim).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def batch(n: int, status=None, emb=None, images=None, dim: int = DIM, fixed: bool = True) -> pa.Table:
    status = status or ["kept"] * n
    emb = embeddings(n, dim=dim) if emb is None else emb
    typ = pa.list_(pa.float16(), dim) if fixed else pa.list_(pa.float16())
    emb_rows = [None if e is None else [float(x) for x in np.asarray(e, np.float16)] for e in emb]
    t = image_batch(images if images is not None else [jpeg(i) for i in range(n)], status=status)
    return t.append_column("clip_image_embedding", pa.array(emb_rows, typ))


def nsfw(**kw) -> NsfwSpec:
    return NsfwSpec(embedder=TINY_ID, **kw)


def aes(**kw) -> AestheticSpec:
    return AestheticSpec(embedder=TINY_ID, **kw)


def scorer(clip: ClipConfig | None = TINY_CLIP_STAGE, storage=None, **cfg) -> SafetyScorer:
    """The heads on the tiny CLIP's embeddings: the CLIP stage's column (it runs the same model)."""
    cfg.setdefault("embedder", TINY_EMBEDDER)
    return SafetyScorer(SafetyConfig(enabled=True, device="cpu", **cfg), storage=storage, clip=clip)


def constant_nsfw(tmp_path, bias: float) -> str:
    """An NSFW head whose output is sigmoid(bias) for every input (zero last layer)."""
    head = build_nsfw_head(nsfw(hidden_dims=[8]), DIM)
    with torch.no_grad():
        head.linear_2.weight.zero_()
        head.linear_2.bias.fill_(bias)
    path = tmp_path / f"nsfw_{bias}.pt"
    torch.save(head.state_dict(), path)
    return str(path)


def smooth_image(size=(96, 128)) -> bytes:
    """A photo-like smooth gradient (JPEG), unlike the white-noise images of ``jpeg``."""
    from PIL import Image

    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    arr = np.stack([xx * 255 // size[1], yy * 255 // size[0], (xx + yy) * 127 // sum(size)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


# --- embedding heads ---------------------------------------------------------------------------
def test_random_heads_in_range_and_reported_random():
    cfg = dict(nsfw=nsfw(max_punsafe=None), aesthetic=aes())
    out = scorer(**cfg)(batch(6)).to_pylist()
    assert all(0.0 <= r["punsafe"] <= 1.0 for r in out)
    assert all(np.isfinite(r["aesthetic"]) for r in out)
    assert all(r["status"] == "kept" for r in out)
    again = scorer(**cfg)(batch(6)).column("punsafe").to_pylist()  # seeded random heads: reproducible
    assert again == [r["punsafe"] for r in out]
    rep = model_report(SafetyConfig(enabled=True, embedder=TINY_EMBEDDER, **cfg), TINY_CLIP_STAGE)
    for head in ("nsfw", "aesthetic"):
        assert rep[head]["random_weights"] is True and rep[head]["embedder_random_weights"] is True
        assert rep[head]["embedder"] == TINY_ID and rep[head]["embeddings"] == "clip stage (clip_image_embedding)"


def test_checkpoints_from_path_file_url_and_s3(tmp_path, s3_server, s3fs_client):
    torch.manual_seed(1)
    n_head = build_nsfw_head(nsfw(), DIM)
    a_head = build_aesthetic_head(aes(), DIM)
    for m in (n_head, a_head):  # weights that differ from the code's seeded random ones
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    torch.save(n_head.state_dict(), tmp_path / "nsfw.pth")
    torch.save(a_head.state_dict(), tmp_path / "aes.pth")
    e = embeddings(4, seed=3)
    with torch.no_grad():
        x = torch.nn.functional.normalize(torch.from_numpy(e.astype(np.float16).astype(np.float32)), dim=-1)
        want_p, want_a = n_head(x).numpy(), a_head(x).numpy()

    def run(nsfw_ckpt, aes_ckpt, **kw):
        s = scorer(nsfw=nsfw(checkpoint=nsfw_ckpt, max_punsafe=None), aesthetic=aes(checkpoint=aes_ckpt),
                   storage={"endpoint_url": s3_server}, **kw)
        t = s(batch(4, emb=e))
        return np.array(t.column("punsafe").to_pylist()), np.array(t.column("aesthetic").to_pylist())

    for prefix in ("", "file://"):
        p, a = run(f"{prefix}{tmp_path}/nsfw.pth", f"{prefix}{tmp_path}/aes.pth")
        np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, want_a, rtol=1e-5, atol=1e-6)
    s3fs_client.mkdir("imgcurate-safety")
    s3fs_client.put(str(tmp_path / "nsfw.pth"), "imgcurate-safety/heads/nsfw.pth")
    s3fs_client.put(str(tmp_path / "aes.pth"), "imgcurate-safety/heads/aes.pth")
    p, a = run("s3://imgcurate-safety/heads/nsfw.pth", "s3://imgcurate-safety/heads/aes.pth",
               cache_dir=str(tmp_path / "cache"))
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, want_a, rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    rep = model_report(SafetyConfig(nsfw=NsfwSpec(checkpoint="s3://imgcurate-safety/heads/nsfw.pth")))
    assert rep["nsfw"]["random_weights"] is False


def test_nsfw_threshold_is_strictly_above(tmp_path):
    at = constant_nsfw(tmp_path, 0.0)  # sigmoid(0) == 0.5 exactly
    out = scorer(nsfw=nsfw(hidden_dims=[8], checkpoint=at, max_punsafe=0.5))(batch(2)).to_pylist()
    assert [r["punsafe"] for r in out] == [0.5, 0.5] and all(r["status"] == "kept" for r in out)
    above = constant_nsfw(tmp_path, 1e-3)
    out = scorer(nsfw=nsfw(hidden_dims=[8], checkpoint=above))(batch(2)).to_pylist()
    assert all((r["status"], r["drop_stage"], r["drop_reason"]) == ("dropped", "safety", "nsfw_above_0.5")
               for r in out)
    assert nsfw_reason(0.5) == "nsfw_above_0.5" and watermark_reason(0.8) == "watermark_above_0.8"


def test_aesthetic_threshold_is_strictly_below(tmp_path):
    head = build_aesthetic_head(aes(), DIM)
    with torch.no_grad():
        head.layers[7].weight.zero_()
        head.layers[7].bias.fill_(5.0)
    torch.save(head.state_dict(), tmp_path / "aes.pth")
    ckpt = str(tmp_path / "aes.pth")
    out = scorer(aesthetic=aes(checkpoint=ckpt, min_aesthetic=5.0))(batch(2)).to_pylist()
    assert [r["aesthetic"] for r in out] == [5.0, 5.0] and all(r["status"] == "kept" for r in out)
    out = scorer(aesthetic=aes(checkpoint=ckpt, min_aesthetic=5.25))(batch(1)).to_pylist()
    assert (out[0]["status"], out[0]["drop_reason"]) == ("dropped", aesthetic_reason(5.25))
    assert aesthetic_reason(5.25) == "aesthetic_below_5.25"


def test_dropped_rows_untouched_and_null_embeddings_skipped(tmp_path):
    e = list(embeddings(3))
    e[2] = None
    t = batch(3, status=["failed", "kept", "kept"], emb=e, images=[b"garbage", jpeg(1), jpeg(2)])
    s = scorer(nsfw=nsfw(hidden_dims=[8], checkpoint=constant_nsfw(tmp_path, 5.0)),
               watermark=WatermarkSpec(timm_model=TINY_TIMM, max_pwatermark=None))
    out = s(t).to_pylist()
    assert (out[0]["status"], out[0]["drop_stage"], out[0]["drop_reason"]) == ("failed", "download", "http_404")
    assert out[0]["punsafe"] is None and out[0]["pwatermark"] is None  # no compute, no decode of the garbage
    assert out[1]["drop_reason"] == "nsfw_above_0.5" and out[1]["pwatermark"] is None  # cheap heads drop first
    assert out[2]["punsafe"] is None and out[2]["status"] == "kept" and out[2]["pwatermark"] is not None
    fresh = scorer(nsfw=nsfw(), watermark=WatermarkSpec(timm_model=TINY_TIMM))
    only_dropped = fresh(batch(2, status=["dropped", "failed"]))
    assert only_dropped.column("punsafe").null_count == 2 and not fresh._ready  # no model was even built
    assert only_dropped.schema.field("punsafe").type == pa.float32()


def test_embedding_width_mismatch_is_a_clear_error(tmp_path):
    # Known models: at config load.
    with pytest.raises(ValidationError, match=r"safety\.nsfw\.embed_dim is 512 but safety\.embedder .* 768"):
        SafetyConfig(nsfw=NsfwSpec(embed_dim=512))
    # A custom model: on the first batch, from the column's type (also when nothing is kept) or rows.
    s = scorer(nsfw=nsfw(embed_dim=768))
    with pytest.raises(ValueError, match=r"safety\.nsfw\.embed_dim is 768 but clip_image_embedding has width 32"):
        s(batch(2))
    with pytest.raises(ValueError, match="width 32"):
        s(batch(1, status=["dropped"]))
    with pytest.raises(ValueError, match=r"safety\.aesthetic\.embed_dim is 768 but .* width 32"):
        scorer(aesthetic=aes(embed_dim=768))(batch(2, fixed=False))  # variable-size lists: checked on the rows
    # embed_dim null: the head takes the embedder's width (32, from the tiny CLIP's open_clip config).
    assert scorer(nsfw=nsfw(max_punsafe=None))(batch(2)).column("punsafe").null_count == 0
    torch.save(build_nsfw_head(nsfw(), DIM).state_dict(), tmp_path / "n.pth")
    with pytest.raises(ValueError, match=r"safety\.nsfw: checkpoint .* does not fit"):
        scorer(nsfw=nsfw(hidden_dims=[16], checkpoint=str(tmp_path / "n.pth")))(batch(1))


# --- each head on the embedder it was trained on --------------------------------------------------
def test_defaults_are_laions_released_embedder():
    cfg = SafetyConfig(enabled=True, nsfw={}, aesthetic={})
    assert (cfg.embedder.model, cfg.embedder.pretrained) == ("ViT-L-14-quickgelu", "openai")
    assert cfg.embedder.id() == "ViT-L-14/openai" == cfg.nsfw.embedder == cfg.aesthetic.embedder
    assert cfg.nsfw.layout() == (64, 512, 256) and cfg.embedder.width() == 768
    b32 = SafetyConfig(embedder={"model": "ViT-B-32-quickgelu"}, nsfw={"embedder": "ViT-B-32/openai"})
    assert b32.nsfw.layout() == (32, 32) and b32.embedder.width() == 512
    assert tuple(build_nsfw_head(b32.nsfw, 512).linear_1.weight.shape) == (32, 512)


def test_head_embedder_mismatch_is_a_config_error():
    # A B/32 CLIP stage's width matches nothing here, and an L/14 laion2b embedder is 768-d like the
    # heads' own: only the embedder names tell them apart.
    with pytest.raises(ValidationError, match=r"safety\.nsfw\.embedder is 'ViT-L-14/openai'.*safety\.embedder "
                                              r"is 'ViT-L-14/laion2b_s32b_b82k'"):
        SafetyConfig(embedder={"model": "ViT-L-14", "pretrained": "laion2b_s32b_b82k"}, nsfw={})
    with pytest.raises(ValidationError, match=r"safety\.aesthetic\.embedder is 'ViT-L-14/openai'"):
        SafetyConfig(embedder={"model": "ViT-B-32-quickgelu"}, aesthetic={})
    with pytest.raises(ValidationError, match="QuickGELU.*ViT-L-14-quickgelu"):
        SafetyConfig(embedder={"model": "ViT-L-14", "pretrained": "openai"}, nsfw={})
    # A mirrored copy of OpenAI's weights names what it is.
    ok = SafetyConfig(embedder={"model": "ViT-L-14", "pretrained": "s3://b/l14.bin", "known_as": "ViT-L-14/openai"},
                      nsfw={})
    assert ok.embedder.id() == "ViT-L-14/openai"
    # Through the job config: a ConfigError at load that names the keys.
    with pytest.raises(ConfigError, match=r"safety\.nsfw\.embedder.*safety\.embedder"):
        load_config(CONFIG_DIR / "dryrun.yaml", ["safety.nsfw.embedder=ViT-L-14/openai"])


def test_copy_embedder_is_named_by_its_path():
    """A checkpoint path is not the tag it may have come from unless known_as says so."""
    with pytest.raises(ValidationError, match=r"safety\.embedder is 'ViT-L-14/s3://b/x\.bin'"):
        SafetyConfig(embedder={"model": "ViT-L-14-quickgelu", "pretrained": "s3://b/x.bin"}, nsfw={})


def test_reuses_the_clip_stage_embeddings_only_for_the_same_model():
    cfg = SafetyConfig(enabled=True, embedder=TINY_EMBEDDER, nsfw=nsfw())
    same = TINY_CLIP_STAGE
    assert "clip_image_embedding" in SafetyScorer.columns(cfg, same).reads
    assert "image" not in SafetyScorer.columns(cfg, same).reads
    assert SafetyScorer.resources(cfg.model_copy(update={"device": "auto"}), same).num_gpus == 0
    for other in (same.model_copy(update={"pretrained": "laion2b_s34b_b79k"}),  # same architecture, other weights
                  same.model_copy(update={"model_config_path": "/elsewhere/tiny.json"}),
                  same.model_copy(update={"enabled": False}), None):
        cols = SafetyScorer.columns(cfg, other).reads
        assert "image" in cols and "clip_image_embedding" not in cols, other
        assert SafetyScorer.resources(cfg.model_copy(update={"device": "auto"}), other).num_gpus == 1
    # The same model without its embeddings written: the chain check refuses it (not a second copy of the model).
    assert "clip_image_embedding" in SafetyScorer.columns(cfg, same.model_copy(update={"write_embeddings": False})).reads
    with pytest.raises(ConfigError, match="safety stage reads 'clip_image_embedding'.*clip.write_embeddings"):
        load_config(CONFIG_DIR / "dryrun.yaml", ["clip.write_embeddings=false"])
    # The job's chain check sees the same: the dry run reuses, LAION-style (B/32 CLIP, L/14 heads) does not.
    dry, laion = load_config(CONFIG_DIR / "dryrun.yaml"), load_config(CONFIG_DIR / "laion-style.yaml")
    assert "clip_image_embedding" in stage("safety").columns(dry).reads
    assert "clip_image_embedding" not in stage("safety").columns(laion).reads
    assert "image" in stage("safety").columns(laion).reads and chain_errors(laion) == []
    assert stage("safety").resources(dry).num_gpus == 0  # device cpu there


def test_own_embedder_equals_the_clip_stage_embeddings(tmp_path):
    """Not reusing, the stage embeds the images itself: the same scores as on the CLIP stage's column."""
    open_clip.add_model_config(TINY_CLIP_CONFIG)
    torch.manual_seed(5)
    path = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(TINY_CLIP, pretrained=None).state_dict(), path)
    clip = TINY_CLIP_STAGE.model_copy(update={"pretrained": str(path)})
    imgs = [jpeg(i, (64, 64)) for i in range(3)] + [b"\xff\xd8\xffbroken"]
    t = ClipEmbedder(clip)(image_batch(imgs, [["a"]] * 4))
    heads = dict(nsfw=nsfw(max_punsafe=None), aesthetic=aes())
    emb = EmbedderSpec(model=TINY_CLIP, pretrained=str(path), model_config_path=TINY_CLIP_CONFIG, known_as=TINY_ID)
    reused = scorer(clip=clip, embedder=emb, **heads)
    own = scorer(clip=None, embedder=emb, **heads)
    assert reused.reuse and not own.reuse
    a = reused(t.select(["sample_id", "status", "drop_stage", "drop_reason", "error_message", "image",
                         "clip_image_embedding"]))
    b = own(image_batch(imgs))  # no embedding column at all
    for col in ("punsafe", "aesthetic"):
        np.testing.assert_allclose(b.column(col).to_pylist()[:3], a.column(col).to_pylist()[:3], atol=2e-3)
    assert b.column("drop_reason").to_pylist()[3] == "decode_error"
    assert model_report(own.config)["nsfw"]["embeddings"] == "safety.embedder (this stage)"


# --- LAION's released weights: key names and shapes as released -------------------------------------
# From LAION-AI/CLIP-based-NSFW-Detector src/models.py (NSFWModel_L14 / NSFWModel_B32, the state
# dicts convert_heads_to_pytorch.py saves) and improved-aesthetic-predictor's MLP.
NSFW_L14_KEYS = {"norm.mean": (768,), "norm.variance": (768,),
                 "linear_1.weight": (64, 768), "linear_1.bias": (64,), "linear_2.weight": (512, 64),
                 "linear_2.bias": (512,), "linear_3.weight": (256, 512), "linear_3.bias": (256,),
                 "linear_4.weight": (1, 256), "linear_4.bias": (1,)}
NSFW_B32_KEYS = {"norm.mean": (512,), "norm.variance": (512,),
                 "linear_1.weight": (32, 512), "linear_1.bias": (32,), "linear_2.weight": (32, 32),
                 "linear_2.bias": (32,), "linear_3.weight": (1, 32), "linear_3.bias": (1,)}
AESTHETIC_KEYS = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                  "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                  "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                  "layers.7.bias": (1,)}
# LAION-5B-WatermarkDetection inference.py: timm efficientnet_b3a + Sequential(Linear(1536, 625),
# ReLU, Dropout, Linear(625, 256), ReLU, Linear(256, 2)); B3's stem has 40 channels, its head 1536.
WATERMARK_HEAD_KEYS = {"classifier.0.weight": (625, 1536), "classifier.0.bias": (625,),
                       "classifier.3.weight": (256, 625), "classifier.3.bias": (256,),
                       "classifier.5.weight": (2, 256), "classifier.5.bias": (2,)}
WATERMARK_BACKBONE_KEYS = {"conv_stem.weight": (40, 3, 3, 3), "bn1.weight": (40,),
                           "conv_head.weight": (1536, 384, 1, 1), "bn2.weight": (1536,), "bn2.running_var": (1536,)}


def released(keys: dict, seed: int) -> dict:
    """A state dict with the released names and shapes (values: seeded random; variances positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        v = torch.randn(shape, generator=g) * 0.05
        out[k] = v.abs() + 0.5 if k.endswith("variance") else v
    return out


def nsfw_reference(sd: dict, e: np.ndarray) -> np.ndarray:
    """LAION's NSFWModel forward, written from src/models.py: Normalization, ReLU linears, sigmoid."""
    x = e / np.linalg.norm(e, axis=1, keepdims=True)
    x = (x - sd["norm.mean"].numpy()) / (np.sqrt(sd["norm.variance"].numpy()) + 1e-10)
    n = len([k for k in sd if k.endswith(".weight")])
    for i in range(1, n + 1):
        x = x @ sd[f"linear_{i}.weight"].numpy().T + sd[f"linear_{i}.bias"].numpy()
        if i < n:
            x = np.maximum(x, 0)
    return (1 / (1 + np.exp(-x)))[:, 0]


def aesthetic_reference(sd: dict, e: np.ndarray) -> np.ndarray:
    """improved-aesthetic-predictor's MLP at inference: five linears, no activations (dropout off)."""
    x = e / np.linalg.norm(e, axis=1, keepdims=True)
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{i}.weight"].numpy().T + sd[f"layers.{i}.bias"].numpy()
    return x[:, 0]


def test_released_head_state_dicts_load_by_path_and_s3(tmp_path, s3_server, s3fs_client):
    s3fs_client.mkdir("imgcurate-released")
    files = {}
    for name, keys, seed in (("nsfw_l14", NSFW_L14_KEYS, 1), ("nsfw_b32", NSFW_B32_KEYS, 2),
                             ("aesthetic", AESTHETIC_KEYS, 3)):
        sd = released(keys, seed)
        torch.save(sd, tmp_path / f"{name}.pth")
        s3fs_client.put(str(tmp_path / f"{name}.pth"), f"imgcurate-released/{name}.pth")
        files[name] = sd
    storage = {"endpoint_url": s3_server}
    # Released L/14 heads on a CLIP stage running OpenAI ViT-L/14 (its 768-d column is reused; no model loads).
    l14 = ClipConfig(enabled=True, model="ViT-L-14-quickgelu", pretrained="openai")
    e768 = embeddings(3, seed=7, dim=768)
    for where in (str(tmp_path), "s3://imgcurate-released"):
        s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", cache_dir=str(tmp_path / "cache"),
                                      nsfw={"checkpoint": f"{where}/nsfw_l14.pth", "max_punsafe": None},
                                      aesthetic={"checkpoint": f"{where}/aesthetic.pth"}), storage=storage, clip=l14)
        out = s(batch(3, emb=e768, dim=768))
        e16 = e768.astype(np.float16).astype(np.float64)
        np.testing.assert_allclose(out.column("punsafe").to_pylist(), nsfw_reference(files["nsfw_l14"], e16),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out.column("aesthetic").to_pylist(), aesthetic_reference(files["aesthetic"], e16),
                                   rtol=1e-4, atol=1e-5)
    # The released B/32 head, on OpenAI ViT-B/32 embeddings.
    b32 = ClipConfig(enabled=True, model="ViT-B-32-quickgelu", pretrained="openai")
    e512 = embeddings(3, seed=8, dim=512)
    s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", cache_dir=str(tmp_path / "cache"),
                                  embedder={"model": "ViT-B-32-quickgelu"},
                                  nsfw={"embedder": "ViT-B-32/openai", "max_punsafe": None,
                                        "checkpoint": "s3://imgcurate-released/nsfw_b32.pth"}),
                     storage=storage, clip=b32)
    out = s(batch(3, emb=e512, dim=512))
    np.testing.assert_allclose(out.column("punsafe").to_pylist(),
                               nsfw_reference(files["nsfw_b32"], e512.astype(np.float16).astype(np.float64)),
                               rtol=1e-4, atol=1e-6)
    # An L/14 head file given to a B/32 head: a clear error naming the key, not a wrong score.
    s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", embedder={"model": "ViT-B-32-quickgelu"},
                                  nsfw={"embedder": "ViT-B-32/openai", "checkpoint": str(tmp_path / "nsfw_l14.pth")}),
                     clip=b32)
    with pytest.raises(ValueError, match=r"safety\.nsfw: checkpoint .* does not fit"):
        s(batch(1, emb=embeddings(1, dim=512), dim=512))


def test_released_watermark_state_dict_loads_by_path_and_s3(tmp_path, s3_server, s3fs_client):
    """LAION's watermark model.pt layout: timm efficientnet_b3 keys plus classifier.0/.3/.5."""
    from torch import nn

    # LAION's model exactly as inference.py builds it (timm maps efficientnet_b3a to efficientnet_b3).
    ref = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    ref.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(625, 256),
                                   nn.ReLU(), nn.Linear(256, 2))
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.")}
    for k, shape in WATERMARK_BACKBONE_KEYS.items():
        assert tuple(sd[k].shape) == shape, k
    sd.update(released(WATERMARK_HEAD_KEYS, 4))
    with torch.no_grad():  # a head far from the seeded random one, so a load that did nothing would show
        sd["classifier.5.bias"] = torch.tensor([1.5, -1.5])
    ref.load_state_dict(sd)
    ref.eval()
    torch.save(sd, tmp_path / "model.pt")
    s3fs_client.mkdir("imgcurate-wm-released")
    s3fs_client.put(str(tmp_path / "model.pt"), "imgcurate-wm-released/model.pt")
    imgs = [smooth_image(), jpeg(3, (80, 60))]
    from PIL import Image
    from torchvision import transforms as T

    pre = T.Compose([T.Resize((64, 64)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.no_grad():
        x = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in imgs])
        want = torch.softmax(ref(x), dim=1)[:, 0].numpy()
    for ckpt in (str(tmp_path / "model.pt"), "s3://imgcurate-wm-released/model.pt"):
        s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", cache_dir=str(tmp_path / "cache"),
                                      watermark={"checkpoint": ckpt, "image_size": 64, "max_pwatermark": None}),
                         storage={"endpoint_url": s3_server})
        got = s(image_batch(imgs)).column("pwatermark").to_pylist()
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert {k: tuple(v.shape) for k, v in build_watermark_model(WatermarkSpec()).state_dict().items()
            if k.startswith("classifier.")} == WATERMARK_HEAD_KEYS


# --- watermark --------------------------------------------------------------------------------
def test_watermark_on_jpeg_bytes_checkpoint_and_decode_error(tmp_path, s3_server, s3fs_client):
    spec = WatermarkSpec(timm_model=TINY_TIMM, image_size=64, max_pwatermark=None)
    imgs = [jpeg(1), b"\xff\xd8\xff\xe0not a jpeg", jpeg(2, (80, 40))]
    out = scorer(watermark=spec)(batch(3, images=imgs)).to_pylist()
    assert 0.0 <= out[0]["pwatermark"] <= 1.0 and 0.0 <= out[2]["pwatermark"] <= 1.0
    assert (out[1]["status"], out[1]["drop_stage"], out[1]["drop_reason"]) == ("failed", "safety", "decode_error")
    assert out[1]["pwatermark"] is None
    # A model saved by the test, loaded back from a path and from S3: identical outputs.
    torch.manual_seed(2)
    model = build_watermark_model(spec)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    torch.save(model.state_dict(), tmp_path / "wm.pt")
    local = scorer(watermark=spec.model_copy(update={"checkpoint": str(tmp_path / "wm.pt")}))
    got_local = local(batch(3, images=imgs)).column("pwatermark").to_pylist()
    s3fs_client.mkdir("imgcurate-wm")
    s3fs_client.put(str(tmp_path / "wm.pt"), "imgcurate-wm/wm.pt")
    remote = SafetyScorer(SafetyConfig(enabled=True, device="cpu", cache_dir=str(tmp_path / "cache"),
                                       watermark=spec.model_copy(update={"checkpoint": "s3://imgcurate-wm/wm.pt"})),
                          storage={"endpoint_url": s3_server})
    assert remote(batch(3, images=imgs)).column("pwatermark").to_pylist() == got_local
    assert got_local != [r["pwatermark"] for r in out]  # the checkpoint was really used


def test_watermark_threshold(tmp_path):
    spec = WatermarkSpec(timm_model=TINY_TIMM, image_size=32)
    model = build_watermark_model(spec)
    with torch.no_grad():
        model.classifier[5].weight.zero_()
        model.classifier[5].bias.copy_(torch.tensor([2.0, 0.0]))  # P(watermark) = sigmoid(2) = 0.8808
    torch.save(model.state_dict(), tmp_path / "wm.pt")
    spec = spec.model_copy(update={"checkpoint": str(tmp_path / "wm.pt")})
    out = scorer(watermark=spec)(batch(1)).to_pylist()[0]
    assert out["pwatermark"] == pytest.approx(0.8808, abs=1e-4)
    assert (out["status"], out["drop_stage"], out["drop_reason"]) == ("dropped", "safety", "watermark_above_0.8")
    out = scorer(watermark=spec.model_copy(update={"max_pwatermark": 0.9}))(batch(1)).to_pylist()[0]
    assert out["status"] == "kept"


# --- RIGID ------------------------------------------------------------------------------------
def tiny_dino(**kw) -> DinoSpec:
    return DinoSpec(model="vit_small_patch14_dinov2", pretrained=None, model_args=TINY_DINO_ARGS, **kw)


@pytest.fixture(scope="module")
def dino_ckpt(tmp_path_factory) -> str:
    """A tiny DINOv2 saved at 56 px (a 4 x 4 grid) with weights far from timm's init, so features
    depend on the image; loading it at 224 px resamples its position embeddings."""
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56,
                              **TINY_DINO_ARGS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # LayerNorms stay at (1, 0)
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.05))
    path = tmp_path_factory.mktemp("dino") / "tiny_dinov2.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_rigid_defaults_are_the_papers():
    r = RigidSpec()
    assert r.backbone == "dinov2" and r.noise_scale == 0.05
    assert (r.dinov2.model, r.dinov2.pretrained, r.dinov2.image_size) == ("vit_large_patch14_dinov2", "lvd142m", 224)
    big = timm.create_model(r.dinov2.model, pretrained=False, num_classes=0, img_size=224)  # ViT-L/14: 1024-d, 24 blocks
    assert (big.num_features, len(big.blocks), big.patch_embed.proj.kernel_size) == (1024, 24, (14, 14))
    assert tuple(big.pretrained_cfg["mean"]) == tuple(IMAGENET_MEAN) and tuple(big.pretrained_cfg["std"]) == tuple(
        IMAGENET_STD)


def test_rigid_preprocessing_is_the_papers():
    """Resize((224, 224)) (a squash: no crop, aspect not kept), ToTensor, ImageNet Normalize."""
    from PIL import Image
    from torchvision import transforms as T

    m = DinoModel(tiny_dino())
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in (jpeg(1, (60, 200)), smooth_image((300, 90)))]
    ref = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    want = torch.stack([ref(im) for im in imgs])
    got = m.preprocess_pil(imgs)
    assert got.shape == (2, 3, 224, 224)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rigid_noise_in_normalised_space_deterministic_per_sample(monkeypatch):
    seen = []
    real = DinoModel.encode_pixels

    def spy(self, pixels, normalize=False):
        seen.append(pixels.clone())
        return real(self, pixels, normalize)

    monkeypatch.setattr(DinoModel, "encode_pixels", spy)
    imgs = [smooth_image(), jpeg(1, (64, 64)), jpeg(2, (50, 90))]
    s = scorer(rigid=RigidSpec(dinov2=tiny_dino()))
    s(batch(3, images=imgs))
    pixels = seen[-1]
    clean, noisy = pixels[:3], pixels[3:]
    torch.testing.assert_close(clean, s._rigid.preprocess_pil([s_im for s_im in _decode(imgs)]))
    noise = noisy - clean  # added to the normalized tensor, not to [0, 1] pixels, and not clamped
    assert abs(float(noise.std()) - 0.05) < 0.002 and abs(float(noise.mean())) < 0.002
    assert float(noisy.max()) > float(clean.max())  # not clipped to the clean range
    # The same sample_id gets the same noise in another batch, in another position; others differ.
    t = batch(3, images=imgs)
    shuffled = t.take(pa.array([2, 0, 1]))
    s(shuffled)
    again = seen[-1]
    torch.testing.assert_close(again[3:] - again[:3], noise[[2, 0, 1]])
    assert not torch.allclose(noise[0], noise[1])
    other_seed = scorer(rigid=RigidSpec(dinov2=tiny_dino(), seed=1))
    other_seed(t)
    assert not torch.allclose(seen[-1][3:] - seen[-1][:3], noise)


def _decode(blobs):
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]


def test_rigid_dinov2_scores_from_checkpoint_path_and_s3(dino_ckpt, tmp_path, s3_server, s3fs_client):
    imgs = [smooth_image(), jpeg(1, (96, 128)), smooth_image((64, 200)), jpeg(4, (64, 64))]

    def sims(scale=0.05, ckpt=dino_ckpt, **kw):
        s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", cache_dir=str(tmp_path / "cache"),
                                      rigid=RigidSpec(noise_scale=scale, dinov2=tiny_dino().model_copy(
                                          update={"pretrained": ckpt}), **kw)),
                         storage={"endpoint_url": s3_server})
        return np.array(s(image_batch(imgs)).column("rigid_similarity").to_pylist())

    small = sims()
    np.testing.assert_allclose(sims(0.0), 1.0, atol=1e-5)
    # A random ViT averages 256 patches: noise of 0.05 moves its CLS token little, but measurably.
    assert np.all(small < 1.0 - 1e-6) and np.all(small > -1.0)
    assert sims(1.0).mean() < small.mean()
    # A photo-like gradient and white noise respond differently to the same perturbation.
    assert abs(small[0] - small[1]) > 1e-5 and abs(small[2] - small[3]) > 1e-5
    np.testing.assert_array_equal(sims(), small)  # seeded by sample_id: reruns agree
    s3fs_client.mkdir("imgcurate-dino")
    s3fs_client.put(dino_ckpt, "imgcurate-dino/tiny_dinov2.pth")
    np.testing.assert_allclose(sims(ckpt="s3://imgcurate-dino/tiny_dinov2.pth"), small, atol=1e-6)
    random = sims(ckpt=None)
    assert not np.allclose(random, small)  # the checkpoint was really loaded
    lo = np.sort(small)
    t = float((lo[1] + lo[2]) / 2)  # the two least robust are dropped
    out = SafetyScorer(SafetyConfig(enabled=True, device="cpu", rigid=RigidSpec(
        dinov2=tiny_dino().model_copy(update={"pretrained": dino_ckpt}), min_similarity=t)))(image_batch(imgs))
    assert out.column("drop_reason").to_pylist() == [rigid_reason(t) if v < t else None for v in small]
    rep = model_report(SafetyConfig(rigid=RigidSpec(dinov2=tiny_dino())))["rigid"]
    assert rep["backbone"] == "dinov2" and rep["random_weights"] is True and "vit_small_patch14_dinov2" in rep["model"]
    assert model_report(SafetyConfig(rigid=RigidSpec()))["rigid"]["random_weights"] is False


def test_rigid_checkpoint_of_another_architecture_is_a_clear_error(dino_ckpt):
    spec = DinoSpec(model="vit_small_patch14_dinov2", pretrained=dino_ckpt, model_args={"depth": 2, "embed_dim": 32,
                                                                                        "num_heads": 2})
    with pytest.raises(ValueError, match=r"safety\.rigid\.dinov2: checkpoint .* does not fit"):
        DinoModel(spec)


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> ClipConfig:
    open_clip.add_model_config(TINY_CLIP_CONFIG)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(open_clip.create_model(TINY_CLIP, pretrained=None).state_dict(), path)
    return ClipConfig(model=TINY_CLIP, pretrained=str(path), model_config_path=TINY_CLIP_CONFIG, device="cpu")


def test_rigid_open_clip_backbone(clip_ckpt):
    imgs = [jpeg(i, (64, 64)) for i in range(4)]

    def sims(scale, **kw):
        s = SafetyScorer(SafetyConfig(enabled=True, device="cpu",
                                      rigid=RigidSpec(backbone="open_clip", noise_scale=scale, **kw)),
                         clip=clip_ckpt)  # encoder null: the CLIP stage's model
        return np.array(s(batch(4, images=imgs)).column("rigid_similarity").to_pylist())

    zero, small, large = sims(0.0), sims(0.05), sims(1.0)
    np.testing.assert_allclose(zero, 1.0, atol=1e-5)
    assert np.all((small >= -1) & (small <= 1)) and np.all(small < 1.0)
    assert large.mean() < small.mean()
    s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", rigid=RigidSpec(
        backbone="open_clip", encoder=clip_ckpt, min_similarity=0.9999)))
    assert all(r["drop_reason"] == "rigid_below_0.9999" for r in s(batch(4, images=imgs)).to_pylist())
    rep = model_report(SafetyConfig(rigid=RigidSpec(backbone="open_clip")), clip=ClipConfig(pretrained=None))
    assert rep["rigid"]["random_weights"] is True and rep["rigid"]["encoder"] == "clip"
    assert rep["rigid"]["backbone"] == "open_clip"


def test_rigid_backbone_and_encoder_must_agree():
    with pytest.raises(ValueError, match="rigid.encoder is null"):
        SafetyScorer(SafetyConfig(enabled=True, rigid=RigidSpec(backbone="open_clip")))
    with pytest.raises(ValidationError, match="backbone is dinov2"):
        RigidSpec(encoder=ClipConfig())
    SafetyScorer(SafetyConfig(enabled=True, rigid=RigidSpec()))  # dinov2 needs no CLIP stage


# --- configs --------------------------------------------------------------------------------------
def test_laion_style_config_is_laions_recipe():
    cfg = load_config(CONFIG_DIR / "laion-style.yaml")
    assert cfg.clip.enabled and (cfg.clip.model, cfg.clip.pretrained, cfg.clip.min_score) == (
        "ViT-B-32-quickgelu", "openai", 0.28)
    s = cfg.safety
    assert s.enabled and s.embedder.id() == "ViT-L-14/openai" and not s.reuses_clip(cfg.clip)
    assert s.nsfw.embedder == s.aesthetic.embedder == "ViT-L-14/openai" and s.nsfw.layout() == (64, 512, 256)
    for head in (s.nsfw, s.aesthetic, s.watermark):
        assert head.checkpoint.startswith("s3://")
    assert s.watermark.timm_model == "efficientnet_b3" and s.watermark.image_size == 256
    models = models_of(cfg)
    assert models["safety.nsfw"]["embeddings"] == "safety.embedder (this stage)"
    assert not any(m["random_weights"] for m in models.values())


def test_dryrun_config_reuses_the_tiny_clip_and_runs_a_tiny_dinov2():
    cfg = load_config(CONFIG_DIR / "dryrun.yaml")
    s = cfg.safety
    assert s.reuses_clip(cfg.clip) and s.rigid.backbone == "dinov2" and s.rigid.dinov2.pretrained is None
    assert s.rigid.dinov2.image_size == 224 and s.rigid.noise_scale == 0.05
    models = models_of(cfg)
    assert models["safety.rigid"]["random_weights"] and models["safety.nsfw"]["embedder_random_weights"]


# --- config and resources -----------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        SafetyConfig(nsfw={"embed_dim": 768, "threshold": 0.5})
    with pytest.raises(ValidationError, match="extra"):
        SafetyConfig(nsfw_threshold=0.5)
    with pytest.raises(ValidationError):
        SafetyConfig(watermark={"max_pwatermark": 1.5})
    with pytest.raises(ValidationError, match="no head is configured"):
        SafetyConfig(enabled=True)
    with pytest.raises(ValidationError, match="extra"):
        SafetyConfig(rigid={"dinov2": {"img_size": 224}})
    cfg = SafetyConfig.model_validate({"enabled": True, "nsfw": {}, "watermark": {"checkpoint": "s3://b/wm.pt"}})
    assert cfg.nsfw.max_punsafe == 0.5 and cfg.watermark.max_pwatermark == 0.8 and cfg.nsfw.embed_dim is None


def test_resources_declared_by_config_not_probed():
    heads_only = SafetyScorer.resources(SafetyConfig(enabled=True, embedder=TINY_EMBEDDER, nsfw=nsfw(), num_gpus=1),
                                        TINY_CLIP_STAGE)
    assert heads_only.num_gpus == 0  # MLP heads on the CLIP stage's embeddings: CPU
    r = SafetyScorer.resources(SafetyConfig(enabled=True, watermark={}, num_gpus=0.5, batch_size=128, pool_max=4))
    assert (r.num_gpus, r.batch_size, r.pool) == (0.5, 128, (1, 4))
    assert SafetyScorer.resources(SafetyConfig(enabled=True, watermark={}, device="cpu")).num_gpus == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(clip_ckpt, dino_ckpt):
    imgs = [jpeg(i, (64, 64)) for i in range(3)]
    cfg = dict(enabled=True, embedder=TINY_EMBEDDER, nsfw=nsfw(max_punsafe=None), aesthetic=aes(),
               watermark=WatermarkSpec(timm_model=TINY_TIMM, image_size=64, max_pwatermark=None),
               rigid=RigidSpec(dinov2=tiny_dino().model_copy(update={"pretrained": dino_ckpt, "precision": "fp32"})))
    cpu = SafetyScorer(SafetyConfig(device="cpu", **cfg), clip=TINY_CLIP_STAGE)(batch(3, images=imgs))
    gpu_scorer = SafetyScorer(SafetyConfig(device="auto", num_gpus=1, **cfg), clip=TINY_CLIP_STAGE)
    gpu = gpu_scorer(batch(3, images=imgs))
    assert gpu_scorer.device == "cuda"
    for col in ("punsafe", "aesthetic", "pwatermark", "rigid_similarity"):
        np.testing.assert_allclose(gpu.column(col).to_pylist(), cpu.column(col).to_pylist(), atol=1e-3)
