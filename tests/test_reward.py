"""RewardScorer on a tiny open_clip backbone (trained by the test a few steps, so its CLIP score has
signal) and on a tiny random BLIP, with heads built or trained by the test; scores are checked
against open_clip and transformers called directly."""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from operators.reward_training import (  # noqa: E402
    COLOURS, OBJECTS, TEMPLATES, TrainReport, TrainRewardConfig, fit, is_val, prefs_from_table, split_key,
    synthetic_preferences,
)
from operators.clip import ClipConfig  # noqa: E402
from operators.models.reward import (  # noqa: E402
    BASELINES, build_head, load_reward_checkpoint, save_reward_checkpoint,
)
from operators.reward import RewardConfig, RewardScorer, model_report, threshold_reason  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.helpers import image_batch, jpeg  # noqa: E402
from tests.test_train_reward import clip_with_signal  # noqa: E402

TINY = "imgcurate-tiny-clip"
TINY_CONFIG = str(ROOT / "configs" / "models" / f"{TINY}.json")
FEATURE_DIM = 3 * 32


def batch(images, captions, sources=None, status=None) -> pa.Table:
    return image_batch(images, captions, status, sources)


@pytest.fixture(scope="module")
def backbone_ckpt(tmp_path_factory) -> str:
    """The tiny CLIP trained a few steps contrastively by the test (its CLIP score prefers the right
    caption well above chance) and saved: every load below gets these weights."""
    return clip_with_signal(tmp_path_factory.mktemp("clip") / "tiny.pt")


def backbone(ckpt: str | None) -> ClipConfig:
    return ClipConfig(model=TINY, pretrained=ckpt, model_config_path=TINY_CONFIG, device="cpu")


def scorer(ckpt, **kw) -> RewardScorer:
    return RewardScorer(RewardConfig(enabled=True, backbone=backbone(ckpt), device="cpu", **kw))


@functools.lru_cache(maxsize=2)
def direct_model(ckpt: str):
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=ckpt)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY)


def direct_embeddings(ckpt: str, image: bytes, captions: list[str]):
    """open_clip called directly: the L2-normalized image embedding (per caption) and caption embeddings."""
    from PIL import Image

    model, preprocess, tok = direct_model(ckpt)
    with torch.no_grad():
        im = model.encode_image(preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None])
        tx = model.encode_text(tok(captions))
    im = torch.nn.functional.normalize(im, dim=-1).expand(len(captions), -1)
    return im, torch.nn.functional.normalize(tx, dim=-1)


def direct_rewards(ckpt: str, image: bytes, captions: list[str], head) -> np.ndarray:
    """open_clip and the head called directly: the reference for the operator."""
    im, tx = direct_embeddings(ckpt, image, captions)
    with torch.no_grad():
        return head(torch.cat([im, tx, im * tx], -1)).squeeze(-1).numpy()


def direct_clip_scores(ckpt: str, image: bytes, captions: list[str]) -> np.ndarray:
    im, tx = direct_embeddings(ckpt, image, captions)
    return (im * tx).sum(-1).numpy()


@pytest.fixture(scope="module")
def trained(backbone_ckpt, tmp_path_factory):
    """A head trained (in-process, no Ray) on the synthetic colour-preference set; saved locally."""
    table = synthetic_preferences(128, seed=0)
    val = [is_val(split_key(r), 0.25, 0) for r in table.select(["id", "image"]).to_pylist()]
    train, held_out = table.filter(pa.array([not v for v in val])), table.filter(pa.array(val))
    cfg = TrainRewardConfig(data="-", out="-", backbone=backbone(backbone_ckpt), epochs=60, lr=3e-3, batch_rows=16)
    res = fit(cfg, prefs_from_table(train), prefs_from_table(held_out))
    path = str(tmp_path_factory.mktemp("reward") / "reward_head.pt")
    save_reward_checkpoint(path, res.head, res.meta)
    return path, res, held_out


# --- scoring --------------------------------------------------------------------------------------
def test_scores_equal_direct_computation_and_best_is_the_max(backbone_ckpt):
    caps = [["a photo of a dog", "a red square", "tree"], ["only one"]]
    srcs = [["caption", "title", "recaption"], ["caption"]]
    imgs = [jpeg(1), jpeg(2)]
    out = scorer(backbone_ckpt)(batch(imgs, caps, srcs)).to_pylist()
    head = build_head(FEATURE_DIM, [512, 64]).eval()
    for row, img, cap, src in zip(out, imgs, caps, srcs):
        want = direct_rewards(backbone_ckpt, img, cap, head)
        np.testing.assert_allclose(row["reward_scores"], want, rtol=1e-4, atol=1e-5)
        best = int(np.argmax(want))
        assert row["reward"] == pytest.approx(float(want[best]), abs=1e-5)
        assert row["best_caption"] == cap[best] and row["best_caption_source"] == src[best]
        assert row["status"] == "kept"


def test_one_many_empty_and_blank_captions(backbone_ckpt):
    many = [f"caption number {k} of a thing" for k in range(40)]
    t = batch([jpeg(3), jpeg(4), jpeg(5), jpeg(6), jpeg(7)],
              [["just one"], many, [], None, ["", "  ", "real one", None]])
    out = scorer(backbone_ckpt)(t).to_pylist()
    one, lots, empty, null, blanks = out
    assert len(one["reward_scores"]) == 1 and one["best_caption"] == "just one"
    assert one["reward"] == pytest.approx(one["reward_scores"][0])
    assert len(lots["reward_scores"]) == 40
    assert lots["best_caption"] == many[int(np.argmax(lots["reward_scores"]))]
    for row in (empty, null):
        assert row["status"] == "kept" and row["reward"] is None and row["best_caption"] is None
        assert row["reward_scores"] == []
    assert blanks["reward_scores"][:2] == [None, None] and blanks["reward_scores"][3] is None
    assert blanks["best_caption"] == "real one" and blanks["best_caption_source"] is None  # no sources column
    # Many captions are scored like one: the same caption gets the same score in either batch.
    solo = scorer(backbone_ckpt)(batch([jpeg(4)], [[many[7]]])).to_pylist()[0]
    assert solo["reward_scores"][0] == pytest.approx(lots["reward_scores"][7], abs=1e-5)


def test_threshold_and_no_caption(backbone_ckpt):
    img, caps = jpeg(8), ["a caption", "another one"]
    base = scorer(backbone_ckpt)(batch([img], [caps])).to_pylist()[0]["reward"]
    kept = scorer(backbone_ckpt, min_reward=base - 1e-3)(batch([img], [caps])).to_pylist()[0]
    assert kept["status"] == "kept"
    t = base + 1e-3
    dropped = scorer(backbone_ckpt, min_reward=t)(batch([img], [caps])).to_pylist()[0]
    assert (dropped["status"], dropped["drop_stage"], dropped["drop_reason"]) == ("dropped", "reward",
                                                                                  threshold_reason(t))
    assert dropped["reward"] == pytest.approx(base)  # the score is written with the drop
    assert threshold_reason(0.5) == "reward_below_0.5"
    none = scorer(backbone_ckpt, min_reward=0.0)(batch([img], [[]])).to_pylist()[0]
    assert (none["status"], none["drop_reason"]) == ("dropped", "no_caption")


def test_dropped_rows_pass_through_without_compute(backbone_ckpt):
    t = batch([b"not an image", jpeg(9)], [["a"], ["b"]], status=["dropped", "kept"])
    out = scorer(backbone_ckpt)(t).to_pylist()
    assert (out[0]["status"], out[0]["drop_stage"], out[0]["drop_reason"]) == ("dropped", "download", "http_404")
    assert out[0]["reward_scores"] is None and out[0]["reward"] is None
    assert out[1]["reward"] is not None
    s = scorer(backbone_ckpt)
    only_dropped = s(batch([None], [["a"]], status=["failed"]))
    assert s._head is None, "a batch of dropped rows must not even load the model"
    assert only_dropped.schema.field("reward_scores").type == pa.list_(pa.float32())


def test_corrupt_image_is_a_recorded_failure(backbone_ckpt):
    out = scorer(backbone_ckpt)(batch([b"\xff\xd8\xffgarbage", jpeg(10)], [["a"], ["b"]])).to_pylist()
    assert (out[0]["status"], out[0]["drop_stage"], out[0]["drop_reason"]) == ("failed", "reward", "decode_error")
    assert out[1]["status"] == "kept" and out[1]["reward"] is not None


def test_random_backbone_is_seeded_so_every_actor_agrees():
    t = batch([jpeg(11)], [["x", "y"]])
    a = scorer(None)(t).column("reward_scores").to_pylist()
    b = scorer(None)(t).column("reward_scores").to_pylist()
    assert a == b


# --- trained checkpoints ------------------------------------------------------------------------------
def pairwise_accuracy(rows: list[dict], scores: list) -> float:
    """Share of the strict pairs (rank a < rank b) of ``rows`` that ``scores`` order right; a tie counts half."""
    right = []
    for r, s in zip(rows, scores):
        for a, ra in enumerate(r["ranks"]):
            for b, rb in enumerate(r["ranks"]):
                if ra < rb:
                    right.append(1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0)
    return float(np.mean(right))


def test_trained_head_ranks_held_out_captions_better_than_the_clip_score(trained, backbone_ckpt):
    """Compress & Align ranks an image's captions by reward. Through the scorer and its checkpoint, the
    trained head must order the held-out pairs with at most half the errors of the CLIP score, which is
    computed here with open_clip from the same CLIP and is well above chance. That CLIP was trained on
    exactly the top-1 choice (image vs its preferred caption), so at picking the best caption the head
    need only keep up with it; both must beat the untrained head."""
    path, res, held_out = trained
    rows = held_out.to_pylist()
    t = batch([r["image"] for r in rows], [r["captions"] for r in rows])
    head = [o["reward_scores"] for o in scorer(backbone_ckpt, head_checkpoint=path)(t).to_pylist()]
    untrained = [o["reward_scores"] for o in scorer(backbone_ckpt)(t).to_pylist()]
    clip = [direct_clip_scores(backbone_ckpt, r["image"], r["captions"]) for r in rows]
    acc = {k: pairwise_accuracy(rows, v) for k, v in (("head", head), ("clip", clip), ("untrained", untrained))}
    picks = {k: sum(int(np.argmax(s)) == r["ranks"].index(0) for r, s in zip(rows, v))
             for k, v in (("head", head), ("clip", clip), ("untrained", untrained))}
    n = len(rows)
    print(f"held-out ({n} images): pairwise accuracy {acc}; preferred caption picked {picks} (chance {n / 4:.0f})")
    # fit's metrics are these numbers: val_accuracy_backbone is the CLIP score.
    assert acc["clip"] == pytest.approx(res.metrics["val_accuracy_backbone"], abs=1e-9)
    assert acc["head"] == pytest.approx(res.metrics["val_accuracy"], abs=1e-9)
    assert acc["clip"] >= 0.75, f"the CLIP score has too little signal to test against: {acc}"
    assert 1 - acc["head"] <= 0.5 * (1 - acc["clip"]), acc
    assert acc["head"] >= acc["untrained"] + 0.15, acc
    assert picks["head"] >= 0.75 * n and picks["head"] >= picks["clip"] - 1, picks
    assert picks["head"] >= picks["untrained"] + 0.25 * n, picks


def test_checkpoint_round_trips_local_file_url_and_s3(trained, backbone_ckpt, s3_server, s3fs_client):
    from operators.storage import StorageConfig

    path, res, _ = trained
    t = batch([jpeg(12), jpeg(13)], [["a red cup", "a blue cup"], ["a green boat"]])
    local = scorer(backbone_ckpt, head_checkpoint=path)(t).column("reward_scores").to_pylist()
    via_url = scorer(backbone_ckpt, head_checkpoint=f"file://{path}")(t).column("reward_scores").to_pylist()
    assert local == via_url
    # Standardized by the training rewards' mean and std stored in the checkpoint.
    ckpt = load_reward_checkpoint(path)
    head = build_head(FEATURE_DIM, [512, 64])
    head.load_state_dict(ckpt["head"])
    raw = direct_rewards(backbone_ckpt, jpeg(12), ["a red cup", "a blue cup"], head.eval())
    m, s = ckpt["meta"]["reward_mean"], ckpt["meta"]["reward_std"]
    np.testing.assert_allclose(local[0], (raw - m) / s, rtol=1e-4, atol=1e-4)
    # Through the loopback S3 server: saved there by the same writer, loaded by spec.
    storage = StorageConfig(endpoint_url=s3_server)
    s3fs_client.mkdir("imgcurate-reward")
    save_reward_checkpoint("s3://imgcurate-reward/heads/reward_head.pt", res.head, res.meta, storage=storage)
    assert s3fs_client.exists("imgcurate-reward/heads/reward_head.pt")
    s3 = RewardScorer(RewardConfig(enabled=True, backbone=backbone(backbone_ckpt), device="cpu",
                                   head_checkpoint="s3://imgcurate-reward/heads/reward_head.pt"), storage=storage)
    assert s3(t).column("reward_scores").to_pylist() == local


def test_checkpoint_must_fit_the_backbone(trained, backbone_ckpt, tmp_path):
    path, res, _ = trained
    meta = dict(res.meta, feature_dim=999)
    bad = str(tmp_path / "wide.pt")
    save_reward_checkpoint(bad, res.head, meta)
    with pytest.raises(ValueError, match="999"):
        scorer(backbone_ckpt, head_checkpoint=bad)(batch([jpeg(14)], [["a"]]))
    other = str(tmp_path / "other.pt")
    save_reward_checkpoint(other, res.head, dict(res.meta, backbone=dict(res.meta["backbone"], model="ViT-B-32")))
    with pytest.raises(ValueError, match="ViT-B-32"):
        scorer(backbone_ckpt, head_checkpoint=other)(batch([jpeg(14)], [["a"]]))
    plain = tmp_path / "plain.pt"
    torch.save(res.head.state_dict(), plain)
    with pytest.raises(ValueError, match="not an imgcurate reward checkpoint"):
        scorer(backbone_ckpt, head_checkpoint=str(plain))(batch([jpeg(14)], [["a"]]))
    with pytest.raises(ValueError, match="does not exist"):
        scorer(backbone_ckpt, head_checkpoint=str(tmp_path / "missing.pt"))(batch([jpeg(14)], [["a"]]))


def test_tuned_backbone_blocks_travel_with_the_checkpoint(backbone_ckpt, tmp_path):
    table = synthetic_preferences(16, seed=1)
    cfg = TrainRewardConfig(data="-", out="-", backbone=backbone(backbone_ckpt), epochs=2, batch_rows=8,
                            head_hidden=[16], unfreeze_last_blocks=1, backbone_lr=1e-2)
    res = fit(cfg, prefs_from_table(table))
    assert res.backbone_state and any(k.startswith("visual.transformer.resblocks.0") for k in res.backbone_state)
    path = str(tmp_path / "tuned.pt")
    save_reward_checkpoint(path, res.head, res.meta, res.backbone_state)
    s = scorer(backbone_ckpt, head_checkpoint=path)
    s(batch([jpeg(15)], [["a"]]))
    loaded = dict(s._backbone.model.named_parameters())
    for k, v in res.backbone_state.items():
        torch.testing.assert_close(loaded[k].detach(), v.float())
    original = torch.load(backbone_ckpt, weights_only=True)
    changed = [k for k, v in res.backbone_state.items() if not torch.equal(original[k], v)]
    assert changed, "backbone_lr > 0 but no backbone weight moved"


# --- config and reports ---------------------------------------------------------------------------------
def test_config_errors_are_clear():
    with pytest.raises(ValidationError, match="blip_path"):
        RewardConfig(enabled=True, backbone_type="blip")
    with pytest.raises(ValidationError, match="local directory"):
        RewardConfig(backbone_type="blip", blip_path="s3://bucket/blip")
    with pytest.raises(ValidationError):
        RewardConfig(min_rewrd=0.3)
    with pytest.raises(ValueError, match="no clip config"):
        RewardScorer(RewardConfig(enabled=True))


def test_backbone_defaults_to_the_clip_stage_and_reports_random():
    clip = backbone(None)
    s = RewardScorer(RewardConfig(enabled=True, device="cpu"), clip=clip)
    assert s.backbone_config() == clip
    rep = model_report(RewardConfig(enabled=True), clip)
    assert rep["random_weights"] and rep["head_random_weights"] and rep["backbone"] == TINY
    rep = model_report(RewardConfig(enabled=True, head_checkpoint="s3://b/h.pt",
                                    backbone=ClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k")))
    assert not rep["random_weights"] and rep["pretrained"] == "s3://b/h.pt"


def test_resources_declared_by_config_not_probed():
    r = RewardScorer.resources(RewardConfig(num_gpus=1, batch_size=512, pool_max=4))
    assert (r.num_gpus, r.batch_size, r.pool) == (1, 512, (1, 4))
    assert RewardScorer.resources(RewardConfig(device="cpu")).num_gpus == 0


# --- BLIP (only where transformers is installed) ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    """A tiny random BlipForImageTextRetrieval and its processor saved by the test; the vocabulary
    holds every word of the synthetic captions. BlipVisionConfig's default initializer_range is
    1e-10, which leaves a random vision tower blind (every image gives the same states): 0.02 here."""
    pytest.importorskip("transformers")
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    d = tmp_path_factory.mktemp("blip")
    words = sorted({w for t in TEMPLATES for w in t.replace("{}", "").split()} | set(COLOURS) | set(OBJECTS)
                   | {"a", "cup", "photo", "of"})
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                         tokenizer=BertTokenizer(str(vocab)))
    cfg = BlipConfig(
        text_config={"vocab_size": len(words) + 5, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 40, "encoder_hidden_size": 32},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 16, "initializer_range": 0.02},
        projection_dim=16, image_text_hidden_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BlipForImageTextRetrieval(cfg).save_pretrained(d / "model")
    proc.save_pretrained(d / "model")
    return str(d / "model")


@functools.lru_cache(maxsize=1)
def blip_loaded(path: str):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    return BlipForImageTextRetrieval.from_pretrained(path).eval(), BlipProcessor.from_pretrained(path)


def blip_direct(path: str, image: bytes, captions: list[str]):
    """transformers' own BlipForImageTextRetrieval forward for one image and its captions: the ITM
    path's [CLS] text state (ImageReward's feature) and the ITC cosine (``use_itm_head=False``)."""
    from PIL import Image

    model, proc = blip_loaded(path)
    im = Image.open(io.BytesIO(image)).convert("RGB")
    inp = proc(images=[im] * len(captions), text=captions, padding=True, return_tensors="pt")
    args = dict(input_ids=inp.input_ids, attention_mask=inp.attention_mask, pixel_values=inp.pixel_values)
    with torch.no_grad():
        cls = model(**args, use_itm_head=True).question_embeds[:, 0, :]
        itc = model(**args, use_itm_head=False).itm_score.diagonal()  # (images, texts): image k with caption k
    return cls, itc.numpy()


def test_blip_rewards_are_the_head_on_blips_own_itm_features(tiny_blip):
    caps = [["a red cup", "a blue cup", "a photo of a cup"], ["a photo of a cup"]]
    imgs = [jpeg(16), jpeg(17)]
    s = RewardScorer(RewardConfig(enabled=True, backbone_type="blip", blip_path=tiny_blip, device="cpu",
                                  head_hidden=[8]))
    out = s(batch(imgs, caps)).to_pylist()
    head = build_head(32, [8]).eval()  # the random head's seeded weights, rebuilt here
    for row, img, cap in zip(out, imgs, caps):
        cls, _ = blip_direct(tiny_blip, img, cap)
        with torch.no_grad():
            want = head(cls).squeeze(-1).numpy()
        np.testing.assert_allclose(row["reward_scores"], want, rtol=1e-4, atol=1e-5)
        assert row["best_caption"] == cap[int(np.argmax(want))]
        assert row["reward"] == pytest.approx(float(want.max()), abs=1e-5)
    first = out[0]["reward_scores"]
    assert max(first) - min(first) > 1e-4, f"the reward does not depend on the caption: {first}"
    assert abs(first[2] - out[1]["reward_scores"][0]) > 1e-5, "the same caption scores the same on two images"


def test_blip_baseline_is_its_itc_score_and_is_labelled_so(tiny_blip):
    table = synthetic_preferences(24, seed=3)
    prefs = prefs_from_table(table)
    cfg = TrainRewardConfig(data="-", out="-", backbone_type="blip", blip_path=tiny_blip, head_hidden=[8], epochs=2,
                            batch_rows=8)
    res = fit(cfg, prefs, prefs)  # train and evaluate on one set: only the baseline's number matters here
    rows = table.to_pylist()
    itc = [blip_direct(tiny_blip, r["image"], r["captions"])[1] for r in rows]
    assert res.metrics["val_accuracy_backbone"] == pytest.approx(pairwise_accuracy(rows, itc), abs=1e-9)
    assert res.meta["baseline"] == BASELINES["blip"] and "ITC" in BASELINES["blip"]
    report = TrainReport(checkpoint="c", ray_checkpoint="r", backbone={"model": "blip-itm"}, head_hidden=[8],
                         unfreeze_last_blocks=0, num_workers=1, use_gpu=False, metrics=res.metrics, seconds=0.0,
                         baseline=res.meta["baseline"])
    line = next(ln for ln in report.text().splitlines() if "the backbone alone" in ln)
    assert "BLIP ITC" in line and "CLIP" not in line.replace("BLIP", ""), line
