"""ClipEmbedder with a tiny random-weight open_clip model built from a config (no downloads)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from operators.clip import ClipConfig, ClipEmbedder, threshold_reason  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.helpers import image_batch, jpeg  # noqa: E402

TINY = "imgcurate-tiny-clip"
TINY_CONFIG = str(ROOT / "configs" / "models" / f"{TINY}.json")


def batch(images, captions, status=None) -> pa.Table:
    return image_batch(images, captions, status)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random CLIP saved by the test, so every load below gets the same weights."""
    open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def embedder(pretrained, **kw) -> ClipEmbedder:
    return ClipEmbedder(ClipConfig(enabled=True, model=TINY, pretrained=pretrained, model_config_path=TINY_CONFIG,
                                   device="cpu", **kw))


def direct_scores(ckpt: str, image: bytes, captions: list[str]) -> np.ndarray:
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=ckpt)
    model.eval()
    tok = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        im = model.encode_image(preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None])
        tx = model.encode_text(tok(captions))
    im = im / im.norm(dim=-1, keepdim=True)
    tx = tx / tx.norm(dim=-1, keepdim=True)
    return (tx @ im[0]).numpy()


def test_scores_equal_direct_open_clip(checkpoint):
    imgs = [jpeg(1), jpeg(2)]
    caps = [["a photo of a dog", "a red square"], ["tree"]]
    out = embedder(checkpoint)(batch(imgs, caps)).to_pylist()
    for row, img, cap in zip(out, imgs, caps):
        want = direct_scores(checkpoint, img, cap)
        np.testing.assert_allclose(row["clip_scores"], want, rtol=1e-4, atol=1e-5)
        assert row["clip_score"] == pytest.approx(float(want.max()), abs=1e-5)
        assert row["clip_best_caption"] == int(np.argmax(want))


def test_embeddings_fixed_size_normalized_float16(checkpoint):
    t = embedder(checkpoint)(batch([jpeg(3)], [["x"]]))
    typ = t.schema.field("clip_image_embedding").type
    assert pa.types.is_fixed_size_list(typ) and typ.value_type == pa.float16() and typ.list_size == 32
    emb = np.asarray(t.column("clip_image_embedding").to_pylist()[0], dtype=np.float32)
    assert abs(np.linalg.norm(emb) - 1.0) < 1e-2
    txt = np.asarray(t.column("clip_text_embedding").to_pylist()[0], dtype=np.float32)
    assert float(emb @ txt) == pytest.approx(t.column("clip_score").to_pylist()[0], abs=1e-2)


def test_threshold_edges(checkpoint):
    img, caps = jpeg(4), ["a caption"]
    score = float(direct_scores(checkpoint, img, caps).max())
    at = embedder(checkpoint, min_score=round(score, 6) - 1e-6)(batch([img], [caps])).to_pylist()[0]
    assert at["status"] == "kept"
    above = embedder(checkpoint, min_score=min(1.0, score + 1e-3))(batch([img], [caps])).to_pylist()[0]
    assert above["status"] == "dropped" and above["drop_stage"] == "clip"
    assert above["drop_reason"] == threshold_reason(min(1.0, score + 1e-3))
    assert threshold_reason(0.28) == "clip_below_0.28"


def test_dropped_rows_untouched_and_not_computed(checkpoint):
    t = batch([b"not even an image", jpeg(5)], [["a"], ["b"]], status=["failed", "kept"])
    out = embedder(checkpoint)(t).to_pylist()
    assert out[0]["status"] == "failed" and out[0]["drop_reason"] == "http_404"  # untouched, no decode attempt
    assert out[0]["clip_score"] is None and out[0]["clip_image_embedding"] is None
    assert out[1]["clip_score"] is not None


def test_batch_of_only_dropped_rows_keeps_the_schema(checkpoint):
    t = embedder(checkpoint)(batch([None], [["a"]], status=["dropped"]))
    assert pa.types.is_fixed_size_list(t.schema.field("clip_image_embedding").type)


def test_corrupt_bytes_become_a_recorded_failure(checkpoint):
    out = embedder(checkpoint)(batch([b"\xff\xd8\xff\xe0garbage", jpeg(6)], [["a"], ["b"]])).to_pylist()
    assert (out[0]["status"], out[0]["drop_stage"], out[0]["drop_reason"]) == ("failed", "clip", "decode_error")
    assert out[1]["status"] == "kept"


def test_no_caption(checkpoint):
    out = embedder(checkpoint)(batch([jpeg(7)], [[]])).to_pylist()[0]
    assert out["status"] == "kept" and out["clip_score"] is None and out["clip_scores"] == []
    out = embedder(checkpoint, min_score=0.1)(batch([jpeg(7)], [[]])).to_pylist()[0]
    assert (out["status"], out["drop_reason"]) == ("dropped", "no_caption")


def test_checkpoint_from_file_url_and_s3(checkpoint, s3_server, s3fs_client, tmp_path):
    img, caps = jpeg(8), ["one", "two"]
    want = direct_scores(checkpoint, img, caps)
    got = embedder(f"file://{checkpoint}")(batch([img], [caps])).to_pylist()[0]["clip_scores"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    s3fs_client.mkdir("imgcurate-models")
    s3fs_client.put(checkpoint, "imgcurate-models/clip/tiny.pt")
    e = ClipEmbedder(ClipConfig(enabled=True, model=TINY, pretrained="s3://imgcurate-models/clip/tiny.pt",
                                model_config_path=TINY_CONFIG, device="cpu", cache_dir=str(tmp_path / "cache")),
                     storage={"endpoint_url": s3_server})
    got = e(batch([img], [caps])).to_pylist()[0]["clip_scores"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert list((tmp_path / "cache").iterdir()), "the s3 checkpoint was not cached locally"


def test_resources_declared_by_config_not_probed():
    r = ClipEmbedder.resources(ClipConfig(num_gpus=1, batch_size=512, pool_max=8))
    assert (r.num_gpus, r.batch_size, r.pool) == (1, 512, (1, 8))
    assert ClipEmbedder.resources(ClipConfig(device="cpu")).num_gpus == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_matches_cpu_path(checkpoint):
    imgs = [jpeg(10, (64, 64)), jpeg(11, (64, 64))]
    caps = [["a"], ["b"]]
    cpu = embedder(checkpoint, precision="fp32")(batch(imgs, caps)).column("clip_score").to_pylist()
    gpu = ClipEmbedder(ClipConfig(enabled=True, model=TINY, pretrained=checkpoint, model_config_path=TINY_CONFIG,
                                  device="cuda", precision="fp32", decode="gpu"))(batch(imgs, caps))
    np.testing.assert_allclose(gpu.column("clip_score").to_pylist(), cpu, atol=0.05)


def test_jpegs_nvjpeg_rejects_fall_back_to_pillow(checkpoint, monkeypatch):
    """The GPU decode path on CPU, nvJPEG stood in for: the batch call fails, one JPEG is then
    rejected alone too; it is decoded by Pillow, and bytes neither decodes are a decode_error."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    rejected = jpeg(41)
    calls = []

    def nvjpeg(data, mode, device):
        calls.append("batch" if isinstance(data, list) else "one")
        if isinstance(data, list):
            raise RuntimeError("nvjpeg batch decode failed")
        if bytes(data.numpy()) == rejected:
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", nvjpeg)
    imgs = [jpeg(40), rejected, b"\xff\xd8\xffgarbage"]
    caps = [["a"], ["b"], ["c"]]
    e = embedder(checkpoint)
    e.setup()
    e.model.gpu_decode = True
    out = e(batch(imgs, caps)).to_pylist()
    assert calls == ["batch", "one", "one", "one"]
    assert [r["drop_reason"] for r in out] == [None, None, "decode_error"]
    assert out[1]["clip_image_embedding"] is not None
    cpu = embedder(checkpoint)(batch(imgs[:2], caps[:2])).column("clip_score").to_pylist()
    np.testing.assert_allclose([r["clip_score"] for r in out[:2]], cpu, atol=0.05)


def test_overlapped_micro_batches_keep_rows_aligned(checkpoint):
    imgs = [jpeg(20), jpeg(21), b"\xff\xd8\xffbroken", jpeg(22), None, jpeg(23)]
    caps = [["a"], ["b", "c"], ["d"], ["e"], ["f"], ["g"]]
    whole = embedder(checkpoint)(batch(imgs, caps)).to_pylist()
    micro = embedder(checkpoint, micro_batch=1)(batch(imgs, caps)).to_pylist()
    assert [r["drop_reason"] for r in micro] == [None, None, "decode_error", None, "decode_error", None]
    for a, b in zip(whole, micro):
        assert a["drop_reason"] == b["drop_reason"]
        if a["clip_scores"] is not None:
            np.testing.assert_allclose(a["clip_scores"], b["clip_scores"], rtol=1e-4, atol=1e-5)
    direct = direct_scores(checkpoint, imgs[3], caps[3])
    np.testing.assert_allclose(micro[3]["clip_scores"], direct, rtol=1e-4, atol=1e-5)


def test_random_weights_are_the_same_in_every_actor():
    a = embedder(None)(batch([jpeg(30)], [["x", "y"]])).column("clip_scores").to_pylist()
    b = embedder(None)(batch([jpeg(30)], [["x", "y"]])).column("clip_scores").to_pylist()
    assert a == b


# --- the threshold's calibration --------------------------------------------------------------
def test_calibration_warning_only_off_the_calibrated_weights(caplog):
    from operators.clip import calibration_warning

    laion2b = ClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", min_score=0.28)
    w = calibration_warning(laion2b)
    assert w is not None and "no published threshold" in w and "ViT-B-32/laion2b_s34b_b79k" in w
    openai = ClipConfig(model="ViT-B-32-quickgelu", pretrained="openai", min_score=0.28)
    assert calibration_warning(openai) is None  # LAION-5B's own filter
    assert calibration_warning(openai.model_copy(update={"min_score": 0.3})) is None  # LAION-400M's
    assert "not a published threshold" in calibration_warning(openai.model_copy(update={"min_score": 0.25}))
    # open_clip's ViT-B-32 with OpenAI's weights runs GELU, not the QuickGELU LAION's scores came from.
    assert "QuickGELU" in calibration_warning(ClipConfig(model="ViT-B-32", pretrained="openai", min_score=0.28))
    l14 = calibration_warning(ClipConfig(model="ViT-L-14-quickgelu", pretrained="openai", min_score=0.28))
    assert "DataComp" in l14 and "fraction" in l14  # DataComp's L/14 filter is a top fraction, not a threshold
    assert calibration_warning(ClipConfig()) is None  # no threshold, nothing to calibrate
    assert "no calibrated min_score" in ClipConfig.model_fields["pretrained"].description
    with caplog.at_level("WARNING", logger="operators.clip"):
        ClipEmbedder(laion2b)
    assert "no published threshold" in caplog.text


def test_the_job_reports_an_uncalibrated_threshold():
    from jobs.config import CONFIG_DIR, load_config
    from jobs.stages import config_warnings, describe

    laion = load_config(CONFIG_DIR / "laion-style.yaml")
    assert config_warnings(laion) == [] and "WARNING" not in describe(laion)
    other = load_config(CONFIG_DIR / "laion-style.yaml", ["clip.model=ViT-B-32", "clip.pretrained=laion2b_s34b_b79k"])
    [(key, msg)] = config_warnings(other)
    assert key == "clip.min_score" and "laion2b_s34b_b79k" in msg
    assert "WARNING: clip.min_score" in describe(other)
    assert config_warnings(load_config(CONFIG_DIR / "laion-style.yaml", ["clip.enabled=false", "safety.enabled=false"])) == []
