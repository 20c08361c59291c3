"""SafetyScorer with tiny random-weight heads and models built by the test (no downloads)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from operators.clip import ClipConfig  # noqa: E402
from operators.models.laion import build_aesthetic_head, build_nsfw_head, build_watermark_model  # noqa: E402
from operators.safety import (  # noqa: E402
    AestheticSpec, NsfwSpec, RigidSpec, SafetyConfig, SafetyScorer, WatermarkSpec, aesthetic_reason, model_report,
    nsfw_reason, watermark_reason,
)
from tests.conftest import ROOT  # noqa: E402
from tests.helpers import image_batch, jpeg  # noqa: E402

DIM = 32
TINY_CLIP = "imgcurate-tiny-clip"
TINY_CLIP_CONFIG = str(ROOT / "configs" / "models" / f"{TINY_CLIP}.json")
TINY_TIMM = "test_efficientnet"  # timm's own ~100k-parameter test model, classifier named "classifier"


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


def scorer(**cfg) -> SafetyScorer:
    return SafetyScorer(SafetyConfig(enabled=True, device="cpu", **cfg))


def constant_nsfw(tmp_path, bias: float) -> str:
    """An NSFW head whose output is sigmoid(bias) for every input (zero last layer)."""
    head = build_nsfw_head(NsfwSpec(embed_dim=DIM, hidden_dims=[8]))
    with torch.no_grad():
        head.linear_2.weight.zero_()
        head.linear_2.bias.fill_(bias)
    path = tmp_path / f"nsfw_{bias}.pt"
    torch.save(head.state_dict(), path)
    return str(path)


# --- embedding heads ---------------------------------------------------------------------------
def test_random_heads_in_range_and_reported_random():
    cfg = dict(nsfw=NsfwSpec(embed_dim=DIM, max_punsafe=None), aesthetic=AestheticSpec(embed_dim=DIM))
    out = scorer(**cfg)(batch(6)).to_pylist()
    assert all(0.0 <= r["punsafe"] <= 1.0 for r in out)
    assert all(np.isfinite(r["aesthetic"]) for r in out)
    assert all(r["status"] == "kept" for r in out)
    again = scorer(**cfg)(batch(6)).column("punsafe").to_pylist()  # seeded random heads: reproducible
    assert again == [r["punsafe"] for r in out]
    rep = model_report(SafetyConfig(enabled=True, **cfg))
    assert rep["nsfw"]["random_weights"] is True and rep["aesthetic"]["random_weights"] is True


def test_laion_module_names_kept():
    """The released LAION state_dicts would load: same keys and shapes."""
    nsfw = build_nsfw_head(NsfwSpec())  # ViT-L/14 shape
    assert {k: tuple(v.shape) for k, v in nsfw.state_dict().items()} == {
        "norm.mean": (768,), "norm.variance": (768,),
        "linear_1.weight": (64, 768), "linear_1.bias": (64,), "linear_2.weight": (512, 64), "linear_2.bias": (512,),
        "linear_3.weight": (256, 512), "linear_3.bias": (256,), "linear_4.weight": (1, 256), "linear_4.bias": (1,)}
    aes = build_aesthetic_head(AestheticSpec())
    assert [(k, tuple(v.shape)) for k, v in aes.state_dict().items() if k.endswith("weight")] == [
        ("layers.0.weight", (1024, 768)), ("layers.2.weight", (128, 1024)), ("layers.4.weight", (64, 128)),
        ("layers.6.weight", (16, 64)), ("layers.7.weight", (1, 16))]
    wm = build_watermark_model(WatermarkSpec(timm_model=TINY_TIMM))
    keys = [k for k in wm.state_dict() if k.startswith("classifier.")]
    assert keys == ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
                    "classifier.5.weight", "classifier.5.bias"]
    assert wm.classifier[0].out_features == 625 and wm.classifier[5].out_features == 2


def test_checkpoints_from_path_file_url_and_s3(tmp_path, s3_server, s3fs_client):
    torch.manual_seed(1)
    nsfw = build_nsfw_head(NsfwSpec(embed_dim=DIM))
    aes = build_aesthetic_head(AestheticSpec(embed_dim=DIM))
    for m in (nsfw, aes):  # weights that differ from the code's seeded random ones
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    torch.save(nsfw.state_dict(), tmp_path / "nsfw.pth")
    torch.save(aes.state_dict(), tmp_path / "aes.pth")
    e = embeddings(4, seed=3)
    with torch.no_grad():
        x = torch.nn.functional.normalize(torch.from_numpy(e.astype(np.float16).astype(np.float32)), dim=-1)
        want_p, want_a = nsfw(x).numpy(), aes(x).numpy()

    def run(nsfw_ckpt, aes_ckpt, **kw):
        s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", nsfw=NsfwSpec(embed_dim=DIM, checkpoint=nsfw_ckpt,
                                                                                 max_punsafe=None),
                                      aesthetic=AestheticSpec(embed_dim=DIM, checkpoint=aes_ckpt), **kw),
                         storage={"endpoint_url": s3_server})
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
    out = scorer(nsfw=NsfwSpec(embed_dim=DIM, hidden_dims=[8], checkpoint=at, max_punsafe=0.5))(batch(2)).to_pylist()
    assert [r["punsafe"] for r in out] == [0.5, 0.5] and all(r["status"] == "kept" for r in out)
    above = constant_nsfw(tmp_path, 1e-3)
    out = scorer(nsfw=NsfwSpec(embed_dim=DIM, hidden_dims=[8], checkpoint=above))(batch(2)).to_pylist()
    assert all((r["status"], r["drop_stage"], r["drop_reason"]) == ("dropped", "safety", "nsfw_above_0.5")
               for r in out)
    assert nsfw_reason(0.5) == "nsfw_above_0.5" and watermark_reason(0.8) == "watermark_above_0.8"


def test_aesthetic_threshold_is_strictly_below(tmp_path):
    head = build_aesthetic_head(AestheticSpec(embed_dim=DIM))
    with torch.no_grad():
        head.layers[7].weight.zero_()
        head.layers[7].bias.fill_(5.0)
    torch.save(head.state_dict(), tmp_path / "aes.pth")
    ckpt = str(tmp_path / "aes.pth")
    out = scorer(aesthetic=AestheticSpec(embed_dim=DIM, checkpoint=ckpt, min_aesthetic=5.0))(batch(2)).to_pylist()
    assert [r["aesthetic"] for r in out] == [5.0, 5.0] and all(r["status"] == "kept" for r in out)
    out = scorer(aesthetic=AestheticSpec(embed_dim=DIM, checkpoint=ckpt, min_aesthetic=5.25))(batch(1)).to_pylist()
    assert (out[0]["status"], out[0]["drop_reason"]) == ("dropped", aesthetic_reason(5.25))
    assert aesthetic_reason(5.25) == "aesthetic_below_5.25"


def test_dropped_rows_untouched_and_null_embeddings_skipped(tmp_path):
    e = list(embeddings(3))
    e[2] = None
    t = batch(3, status=["failed", "kept", "kept"], emb=e, images=[b"garbage", jpeg(1), jpeg(2)])
    s = scorer(nsfw=NsfwSpec(embed_dim=DIM, hidden_dims=[8], checkpoint=constant_nsfw(tmp_path, 5.0)),
               watermark=WatermarkSpec(timm_model=TINY_TIMM, max_pwatermark=None))
    out = s(t).to_pylist()
    assert (out[0]["status"], out[0]["drop_stage"], out[0]["drop_reason"]) == ("failed", "download", "http_404")
    assert out[0]["punsafe"] is None and out[0]["pwatermark"] is None  # no compute, no decode of the garbage
    assert out[1]["drop_reason"] == "nsfw_above_0.5" and out[1]["pwatermark"] is None  # cheap heads drop first
    assert out[2]["punsafe"] is None and out[2]["status"] == "kept" and out[2]["pwatermark"] is not None
    fresh = scorer(nsfw=NsfwSpec(embed_dim=DIM), watermark=WatermarkSpec(timm_model=TINY_TIMM))
    only_dropped = fresh(batch(2, status=["dropped", "failed"]))
    assert only_dropped.column("punsafe").null_count == 2 and not fresh._ready  # no model was even built
    assert only_dropped.schema.field("punsafe").type == pa.float32()


def test_embedding_dim_mismatch_is_a_clear_error(tmp_path):
    s = scorer(nsfw=NsfwSpec())  # 768, the ViT-L/14 default, against a width-32 column
    with pytest.raises(ValueError, match=r"safety\.nsfw\.embed_dim is 768 but clip_image_embedding has width 32"):
        s(batch(2))
    with pytest.raises(ValueError, match="width 32"):  # also on an all-dropped batch (checked from the type)
        s(batch(1, status=["dropped"]))
    with pytest.raises(ValueError, match=r"safety\.aesthetic\.embed_dim is 768 but .* width 32"):
        scorer(aesthetic=AestheticSpec())(batch(2, fixed=False))  # variable-size lists: checked on the rows
    torch.save(build_nsfw_head(NsfwSpec(embed_dim=DIM)).state_dict(), tmp_path / "n.pth")
    with pytest.raises(ValueError, match=r"safety\.nsfw: checkpoint .* does not fit"):
        scorer(nsfw=NsfwSpec(embed_dim=DIM, hidden_dims=[16], checkpoint=str(tmp_path / "n.pth")))(batch(1))


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
    # Reference: LAION's preprocessing (squash-resize, ImageNet norm) and softmax column 0.
    from PIL import Image
    from torchvision import transforms as T

    pre = T.Compose([T.Resize((64, 64)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        x = torch.stack([pre(Image.open(io.BytesIO(imgs[i])).convert("RGB")) for i in (0, 2)])
        want = torch.softmax(model.eval()(x), dim=1)[:, 0].numpy()
    np.testing.assert_allclose([got_local[0], got_local[2]], want, atol=1e-5)


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
@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> ClipConfig:
    open_clip.add_model_config(TINY_CLIP_CONFIG)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(open_clip.create_model(TINY_CLIP, pretrained=None).state_dict(), path)
    return ClipConfig(model=TINY_CLIP, pretrained=str(path), model_config_path=TINY_CLIP_CONFIG, device="cpu")


def test_rigid_similarity(clip_ckpt):
    imgs = [jpeg(i, (64, 64)) for i in range(4)]

    def sims(scale, **kw):
        s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", rigid=RigidSpec(noise_scale=scale, **kw)),
                         clip=clip_ckpt)  # encoder null: the CLIP stage's model
        return np.array(s(batch(4, images=imgs)).column("rigid_similarity").to_pylist())

    zero, small, large = sims(0.0), sims(0.05), sims(1.0)
    np.testing.assert_allclose(zero, 1.0, atol=1e-5)
    assert np.all((small >= -1) & (small <= 1)) and np.all(small < 1.0)
    assert large.mean() < small.mean()
    np.testing.assert_array_equal(sims(0.05), small)  # seeded by sample_id: reruns agree
    s = SafetyScorer(SafetyConfig(enabled=True, device="cpu", rigid=RigidSpec(encoder=clip_ckpt,
                                                                              min_similarity=0.9999)))
    out = s(batch(4, images=imgs)).to_pylist()
    assert all(r["drop_reason"] == "rigid_below_0.9999" for r in out)
    rep = model_report(SafetyConfig(rigid=RigidSpec()), clip=ClipConfig(pretrained=None))
    assert rep["rigid"]["random_weights"] is True and rep["rigid"]["encoder"] == "clip"


def test_rigid_needs_an_encoder():
    with pytest.raises(ValueError, match="rigid.encoder is null"):
        SafetyScorer(SafetyConfig(enabled=True, rigid=RigidSpec()))


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
    cfg = SafetyConfig.model_validate({"enabled": True, "nsfw": {}, "watermark": {"checkpoint": "s3://b/wm.pt"}})
    assert cfg.nsfw.max_punsafe == 0.5 and cfg.watermark.max_pwatermark == 0.8 and cfg.nsfw.embed_dim == 768


def test_resources_declared_by_config_not_probed():
    heads_only = SafetyScorer.resources(SafetyConfig(enabled=True, nsfw={}, num_gpus=1))
    assert heads_only.num_gpus == 0  # MLP heads on embeddings: CPU
    r = SafetyScorer.resources(SafetyConfig(enabled=True, watermark={}, num_gpus=0.5, batch_size=128, pool_max=4))
    assert (r.num_gpus, r.batch_size, r.pool) == (0.5, 128, (1, 4))
    assert SafetyScorer.resources(SafetyConfig(enabled=True, watermark={}, device="cpu")).num_gpus == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(clip_ckpt):
    imgs = [jpeg(i, (64, 64)) for i in range(3)]
    cfg = dict(enabled=True, nsfw=NsfwSpec(embed_dim=DIM, max_punsafe=None), aesthetic=AestheticSpec(embed_dim=DIM),
               watermark=WatermarkSpec(timm_model=TINY_TIMM, image_size=64, max_pwatermark=None),
               rigid=RigidSpec(encoder=clip_ckpt.model_copy(update={"precision": "fp32"})))
    cpu = SafetyScorer(SafetyConfig(device="cpu", **cfg))(batch(3, images=imgs))
    gpu_scorer = SafetyScorer(SafetyConfig(device="auto", num_gpus=1, **cfg))
    gpu = gpu_scorer(batch(3, images=imgs))
    assert gpu_scorer.device == "cuda"
    for col in ("punsafe", "aesthetic", "pwatermark", "rigid_similarity"):
        np.testing.assert_allclose(gpu.column(col).to_pylist(), cpu.column(col).to_pylist(), atol=1e-3)
