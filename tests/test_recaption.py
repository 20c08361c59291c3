"""Recaptioner with tiny random transformers captioners the tests build from configs and save."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from operators.recaption import (  # noqa: E402
    SOURCE_PREFIX, Detection, RecaptionCacheLookup, RecaptionCacheStore, RecaptionConfig, Recaptioner, alt_text_of,
    clean_alt_text, describe_objects, extract_objects, render_prompt, vllm_postprocess, vllm_preprocess,
    vllm_processor_config, write_tiny_captioner, write_tiny_detector, write_tiny_rewriter,
)
from operators.recaption.prompts import HALLUCINATION_HEADER, VERIFIED_HEADER  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.helpers import image_batch, jpeg  # noqa: E402

TINY_DIR = str(ROOT / "configs" / "models" / "imgcurate-tiny-captioner")
TINY_OWL_DIR = str(ROOT / "configs" / "models" / "imgcurate-tiny-owlvit")
TINY_REWRITER_DIR = str(ROOT / "configs" / "models" / "imgcurate-tiny-rewriter")


def batch(images, captions, status=None, sources=None) -> pa.Table:
    return image_batch(images, captions, status, sources or [["caption"] * len(c) for c in captions],
                       dropped_by=("clip", "clip_below_0.28"))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    """A tiny BLIP captioner with seeded random weights, saved by the test like a real checkpoint."""
    return write_tiny_captioner(str(tmp_path_factory.mktemp("tinyblip")), weights=True)


def cfg(model: str | None, **kw) -> RecaptionConfig:
    base = {"enabled": True, "model": model, "model_config_path": None if model else TINY_DIR, "device": "cpu",
            "max_new_tokens": 8, "cache": False}
    base.update(kw)
    return RecaptionConfig(**base)


# --- generation ---------------------------------------------------------------------------------
def test_one_caption_per_kept_sample_none_for_dropped(saved_model):
    t = batch([jpeg(1), jpeg(2), jpeg(3), b"not an image"], [["a dog"], ["a cat"], ["x"], ["y"]],
              status=["kept", "dropped", "kept", "kept"])
    op = Recaptioner(cfg(saved_model))
    out = op(t)
    rows = out.to_pylist()
    assert op.generated == 2  # the dropped row and the undecodable one cost no generation
    for i in (0, 2):
        r = rows[i]
        assert isinstance(r["recaption"], str) and r["recaption"]
        assert r["recaption_model"] == op.model_name and r["recaption_cached"] is False
        assert r["recaption_tokens"] > 0
        assert r["captions"][-1] == r["recaption"] and r["caption_sources"][-1] == SOURCE_PREFIX + op.model_name
        assert r["captions"][0] == t.column("captions")[i].as_py()[0]
    dropped = rows[1]
    assert dropped["recaption"] is None and dropped["recaption_model"] is None
    assert dropped["captions"] == ["a cat"] and dropped["caption_sources"] == ["caption"]
    assert (dropped["status"], dropped["drop_reason"]) == ("dropped", "clip_below_0.28")
    bad = rows[3]
    assert (bad["status"], bad["drop_stage"], bad["drop_reason"]) == ("failed", "recaption", "decode_error")
    assert bad["recaption"] is None and bad["captions"] == ["y"]
    assert out.column("image").equals(t.column("image"))


def test_declares_its_columns_and_drop_reasons():
    from operators.base import DECODE_ERROR

    cols = Recaptioner.columns(cfg(None))
    assert {"recaption", "recaption_model", "recaption_cached", "recaption_tokens", "recaption_reference",
            "recaption_facts", "recaption_removed", "recaption_error", "captions",
            "caption_sources"} == set(cols.writes)
    assert cols.writes["recaption_removed"] == pa.list_(pa.string())
    assert pa.types.is_struct(cols.writes["recaption_facts"].value_type)
    assert all(t is not None for t in cols.writes.values())
    assert {"status", "image", "captions"} <= set(cols.reads) and set(cols.optional) == {"caption_sources", "sha256"}
    assert Recaptioner.drop_reasons(cfg(None)) == (DECODE_ERROR,)
    assert RecaptionCacheStore.columns(cfg(None)).writes == {}  # the store step passes the batch through


def test_loaded_by_path_and_file_url_agree(saved_model):
    t = batch([jpeg(4), jpeg(5)], [["a"], ["b"]])
    a = Recaptioner(cfg(saved_model))(t).column("recaption").to_pylist()
    b = Recaptioner(cfg(f"file://{saved_model}"))(t).column("recaption").to_pylist()
    assert a == b and all(a)


def test_batched_generation_equals_one_at_a_time(saved_model):
    """Micro-batches (padding, sorting by prompt length) must not change greedy captions."""
    imgs = [jpeg(10 + i) for i in range(6)]
    caps = [["short"], ["a much longer alt text about a red bus on a street"], [""], ["日本語の説明"], ["b"],
            ["two three four"]]
    t = batch(imgs, caps)
    for prompt in ("a picture of", "{alt_text}"):
        batched = Recaptioner(cfg(saved_model, prompt=prompt, micro_batch=6))(t).column("recaption").to_pylist()
        single = Recaptioner(cfg(saved_model, prompt=prompt, micro_batch=1))(t).column("recaption").to_pylist()
        assert batched == single


def test_random_weights_from_config_are_seeded():
    t = batch([jpeg(6), jpeg(7)], [["a"], ["b"]])
    a = Recaptioner(cfg(None))(t).column("recaption").to_pylist()
    b = Recaptioner(cfg(None))(t).column("recaption").to_pylist()
    assert a == b and all(isinstance(x, str) for x in a)


# --- prompts --------------------------------------------------------------------------------------
def test_alt_text_cleaning_empty_long_and_non_latin():
    assert clean_alt_text(None, 50) == "" and clean_alt_text("   \n\t ", 50) == ""
    assert clean_alt_text("a\u202edog\x00 on\n\nthe  mat\u200b", 100) == "a dog on the mat"
    long = " ".join(["word"] * 500)
    cut = clean_alt_text(long, 100)
    assert len(cut) <= 101 and cut.endswith("…") and not cut[:-1].endswith(" ")
    assert clean_alt_text("x" * 300, 100) == "x" * 100 + "…"  # no space: a hard cut
    assert clean_alt_text("東京の夜景 🌃 Ελληνικά", 100) == "東京の夜景 🌃 Ελληνικά"
    # Braces in alt-text are text, not a format field.
    p = render_prompt("alt: {alt_text} / {reference}", "{reference} {0} }{")
    assert p == "alt: {reference} {0} }{ / {reference}"
    assert render_prompt("alt: {alt_text}", "") == "alt: (none)"
    # The alt-text quoted is the first real caption, never an earlier recaption.
    assert alt_text_of(["", "old recap", "the alt"], ["caption", SOURCE_PREFIX + "m", "title"]) == "the alt"
    assert alt_text_of(None, None) == ""


def test_prompts_with_odd_alt_texts_generate_and_respect_token_limit(saved_model):
    caps = [[], [""], ["x " * 4000], ["中文标题：一只猫在沙发上"], ["emoji 🐶🐱 and <b>html</b> {alt_text}"]]
    t = batch([jpeg(20 + i) for i in range(len(caps))], caps, sources=[["caption"] * len(c) for c in caps])
    c = cfg(saved_model, prompt="The alt-text was: \"{alt_text}\". Describe the image.", max_alt_text_chars=5000,
            max_prompt_tokens=48)
    op = Recaptioner(c)
    rows = op(t).to_pylist()
    assert op.generated == len(caps)
    assert all(isinstance(r["recaption"], str) and r["status"] == "kept" for r in rows)
    assert rows[0]["captions"] == [rows[0]["recaption"]]  # no alt-text: the recaption is the only caption
    assert rows[1]["captions"][0] == ""
    # The processor truncates the prompt to max_prompt_tokens.
    enc = op._captioner.processor(images=[np.zeros((8, 8, 3), np.uint8)], text=["x " * 4000], truncation=True,
                                  max_length=c.max_prompt_tokens, return_tensors="pt")
    assert enc["input_ids"].shape[1] <= c.max_prompt_tokens


def test_a_prompt_the_model_cannot_take_fails_only_its_own_caption(saved_model, tmp_path):
    """The tiny captioner has 512 positions: a prompt allowed 2,000 tokens breaks generation for
    its micro-batch, which is split until only that sample is left without a caption."""
    words = "a dog on the grass near a red car " * 150
    caps = [["a cat"], [words], ["a bus"], ["two dogs"]]
    t = batch([jpeg(25 + i) for i in range(4)], caps)
    c = cfg(saved_model, prompt="{alt_text}", max_alt_text_chars=10_000, max_prompt_tokens=2000, micro_batch=4,
            cache=True, cache_path=str(tmp_path / "cache"))
    op = Recaptioner(c)
    rows = op(t).to_pylist()
    assert [r["status"] for r in rows] == ["kept"] * 4  # a failed caption drops nothing
    bad = rows[1]
    assert bad["recaption"] is None and bad["recaption_error"] and bad["captions"] == [words]
    for r in (rows[0], rows[2], rows[3]):
        assert r["recaption"] and r["recaption_error"] is None
    assert single_captions(saved_model, t, c) == [r["recaption"] for r in rows]
    # Failures are not cached: a rerun tries the failed one again and only that one.
    again = Recaptioner(c)
    again(t)
    assert again.generated == 1


def single_captions(model, t, c):
    return Recaptioner(c.model_copy(update={"micro_batch": 1, "cache": False}))(t).column("recaption").to_pylist()


# --- Image Textualization ------------------------------------------------------------------------
def test_describe_objects_relative_boxes_sizes_and_order():
    dets = [("cat", 0.6, (0, 0, 50, 50)), ("dog", 0.9, (50, 50, 100, 100)), ("cup", 0.3, (40, 40, 60, 60)),
            ("sky", 0.95, (-10, -10, 500, 30))]
    text, objs = describe_objects(dets, 100, 100, max_objects=3)
    assert [o["label"] for o in objs] == ["sky", "dog", "cat"]  # by score, cut at max_objects
    sky, dog, cat = objs
    assert sky["box"] == [0.0, 0.0, 1.0, 0.3] and sky["area"] == pytest.approx(0.3) and sky["where"] == "top center"
    assert dog["box"] == [0.5, 0.5, 1.0, 1.0] and dog["area"] == pytest.approx(0.25) and dog["where"] == "bottom right"
    assert cat["where"] == "top left"
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].startswith("- dog (confidence 0.90)") and "25% of the image" in lines[1]
    assert describe_objects([], 10, 10) == ("", [])


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory) -> str:
    """An OWL-ViT-shaped open-vocabulary detector with seeded random weights, saved like a checkpoint."""
    return write_tiny_detector(str(tmp_path_factory.mktemp("tinyowl")), weights=True)


@pytest.fixture(scope="module")
def tiny_rewriter(tmp_path_factory) -> str:
    """A Llama-shaped causal LM with seeded random weights and a chat template, saved like a checkpoint."""
    return write_tiny_rewriter(str(tmp_path_factory.mktemp("tinyrewriter")), weights=True)


def it_cfg(model, detector, rewriter, **textualize) -> RecaptionConfig:
    """Image Textualization mode with the given captioner, detector and rewriter (saved dirs)."""
    t = {"enabled": True, "detector": {"model": detector, "score_threshold": 0.5},
         "rewriter": {"model": rewriter, "max_new_tokens": 8, "min_new_tokens": 4}}
    t.update(textualize)
    return cfg(model, textualize=t)


class FakeDetector:
    """A detector that boxes exactly the objects in ``present`` (label -> box in pixels) and raises
    on an image whose queries contain ``fail_on``: the verification logic without a trained model."""

    def __init__(self, present: dict, fail_on: str | None = None):
        self.present, self.fail_on, self.calls = present, fail_on, []

    def detect(self, images, queries):
        self.calls.append([list(q) for q in queries])
        if self.fail_on and any(self.fail_on in q for q in queries):
            raise RuntimeError("detector exploded")
        return [[Detection(q, 0.9, self.present[q]) for q in qs if q in self.present] for qs in queries]


def rigged(op: Recaptioner, references: list[str], detector: FakeDetector) -> list[str]:
    """Load the models, make pass 1 answer ``references`` in order and pass 2 ``detector``; return
    the list that records every text that reaches the rewriter's tokenizer (pass 3's real input)."""
    op._load_models()
    op._captioner.generate = lambda images, prompts: [(references[i], 5, None) for i in range(len(images))]
    op._detector = detector
    seen: list[str] = []
    prepare = op._rewriter._prepare

    def recording(images, texts):
        seen.extend(texts)
        return prepare(images, texts)

    op._rewriter._prepare = recording
    return seen


def test_extract_objects_is_a_documented_vocabulary_heuristic():
    text = "Two dogs chase a cat past a traffic light; people on benches. The dog naps. A red bus."
    assert extract_objects(text) == ["dog", "cat", "traffic light", "person", "bench", "bus"]
    assert extract_objects("the sky over the grass", ["sky", "grass"]) == ["sky", "grass"]
    assert extract_objects("A Hot Dog stand", ["hot dog", "dog"]) == ["hot dog"]  # the phrase wins over its word
    assert extract_objects("", ["dog"]) == [] and extract_objects(None, ["dog"]) == []


def test_textualize_checks_named_objects_and_rewrites_from_verified_facts(saved_model, tiny_detector, tiny_rewriter):
    """Pass 2 finds the dog and the bed but not the cat: the cat is removed, the dog and the bed
    are facts, and the prompt that reaches the rewriter's tokenizer carries those facts."""
    references = ["a dog and a cat on a bed", "a dog on a bed", "a view at night"]
    op = Recaptioner(it_cfg(saved_model, tiny_detector, tiny_rewriter))
    det = FakeDetector({"dog": (0, 50, 50, 100), "bed": (0, 0, 100, 100)})
    seen = rigged(op, references, det)
    rows = op(batch([jpeg(30 + i, (100, 100)) for i in range(3)], [["a"], ["b"], ["c"]])).to_pylist()
    assert det.calls == [[["dog", "cat", "bed"], ["dog", "bed"], []]]  # the objects each reference names
    one, two, none = rows
    assert [r["recaption_reference"] for r in rows] == references  # pass 1 is kept
    assert one["recaption_removed"] == ["cat"] and two["recaption_removed"] == [] and none["recaption_removed"] == []
    for r in (one, two):
        facts = r["recaption_facts"]
        assert [f["label"] for f in facts] == ["dog", "bed"] and all(f["mentioned"] for f in facts)
        dog = facts[0]
        assert dog["box"] == [0.0, 0.5, 0.5, 1.0] and dog["area"] == pytest.approx(0.25)
        assert dog["where"] == "bottom left" and dog["score"] == pytest.approx(0.9)
        assert r["recaption"] and r["recaption"] != r["recaption_reference"] and r["recaption_error"] is None
        assert r["captions"][-1] == r["recaption"]
    # Nothing named, nothing found: nothing to rewrite, the reference is the recaption.
    assert none["recaption_facts"] == [] and none["recaption"] == "a view at night" and none["recaption_error"] is None
    assert op.rewritten == 2 and len(seen) == 2
    fact_lines, _ = describe_objects([("dog", 0.9, (0, 50, 50, 100)), ("bed", 0.9, (0, 0, 100, 100))], 100, 100)
    by_ref = {r: p for r in references[:2] for p in seen if f"Description: {r}\n" in p}
    for ref, prompt in by_ref.items():
        assert prompt.startswith("user: ") and prompt.endswith("assistant: ")  # the chat template was applied
        assert f"{VERIFIED_HEADER}\n{fact_lines}" in prompt  # the verified facts, as the rows record them
        facts_block = prompt.split(VERIFIED_HEADER, 1)[1].split(HALLUCINATION_HEADER, 1)[0]
        assert "cat" not in facts_block and "- dog" in facts_block and "- bed" in facts_block
    # The removed object is named only as a hallucination to delete, as in the paper's prompt.
    assert f"{HALLUCINATION_HEADER}cat" in by_ref[references[0]]
    assert HALLUCINATION_HEADER not in by_ref[references[1]]
    assert not any("nothing detected" in p.lower() for p in seen)


def test_extra_queries_add_found_objects_and_say_nothing_of_missing_ones(saved_model, tiny_detector, tiny_rewriter):
    """``extra_queries`` are looked for in every image: a found one joins the facts (not named by
    the reference: ``mentioned`` false), a missing one is not a hallucination (nobody claimed it)."""
    op = Recaptioner(it_cfg(saved_model, tiny_detector, tiny_rewriter, extra_queries=["Lamp", "cup"]))
    det = FakeDetector({"dog": (0, 0, 10, 10), "lamp": (50, 50, 60, 60)})
    seen = rigged(op, ["a dog"], det)
    r = op(batch([jpeg(37, (100, 100))], [["a"]])).to_pylist()[0]
    assert det.calls == [[["dog", "lamp", "cup"]]]
    assert [(f["label"], f["mentioned"]) for f in r["recaption_facts"]] == [("dog", True), ("lamp", False)]
    assert r["recaption_removed"] == [] and "cup" not in seen[0] and "- lamp" in seen[0]


def test_a_detector_failure_keeps_the_reference_with_a_note(saved_model, tiny_detector, tiny_rewriter, tmp_path):
    """The detector raises on one image (its queries name a bus): its batch is retried image by
    image, that one keeps its pass-1 description with the reason, the others are textualized.
    The fallback is not cached; nothing anywhere says that nothing was detected."""
    references = ["a dog on a bed", "a bus near a tree", "a cat"]
    c = it_cfg(saved_model, tiny_detector, tiny_rewriter).model_copy(
        update={"cache": True, "cache_path": str(tmp_path / "cache")})
    t = batch([jpeg(33), jpeg(34), jpeg(35)], [["a"], ["b"], ["c"]])
    op = Recaptioner(c)
    det = FakeDetector({"dog": (0, 0, 20, 20), "tree": (5, 5, 30, 30)}, fail_on="bus")
    seen = rigged(op, references, det)
    rows = op(t).to_pylist()
    assert len(det.calls) == 1 + 3  # the batch, then each image alone
    ok, bad, gone = rows
    assert bad["recaption"] == references[1] == bad["recaption_reference"]
    assert bad["recaption_error"].startswith("textualize: detector failed (RuntimeError: detector exploded)")
    assert bad["recaption_facts"] is None and bad["recaption_removed"] is None and bad["status"] == "kept"
    assert ok["recaption_error"] is None and [f["label"] for f in ok["recaption_facts"]] == ["dog"]
    assert gone["recaption_removed"] == ["cat"] and gone["recaption_facts"] == [] and gone["recaption_error"] is None
    assert op.rewritten == 2  # the failed row is not rewritten
    every_text = " ".join(seen + [json.dumps(r, default=str) for r in rows])
    assert "nothing detected" not in every_text.lower()
    # A rerun recomputes only the row that fell back.
    again = Recaptioner(c)
    rigged(again, [references[1]], FakeDetector({"bus": (0, 0, 9, 9)}))
    rows2 = again(t).to_pylist()
    assert again.generated == 1 and rows2[1]["recaption_removed"] == ["tree"] and rows2[1]["recaption_error"] is None
    assert rows2[0]["recaption_cached"] and rows2[0]["recaption_facts"] == ok["recaption_facts"]
    assert rows2[0]["recaption_reference"] == references[0]


def test_textualize_end_to_end_with_tiny_random_owlvit_and_causal_lm(saved_model, tiny_detector, tiny_rewriter):
    """The real passes: the tiny BLIP writes references, the tiny OWL-ViT checks the objects they
    name (any of the tiny captioner's nouns), the tiny Llama rewrites. Random weights decide what is
    found; the bookkeeping must hold whatever they decide."""
    from operators.recaption import TINY_WORDS

    nouns = [w for w in TINY_WORDS if w in {"dog", "cat", "bird", "horse", "person", "man", "woman", "car", "bus",
                                            "bike", "boat", "train", "plane", "tree", "flower", "house", "table",
                                            "chair", "bed", "lamp", "book", "cup", "apple", "cake", "hat", "ball"}]
    c = it_cfg(saved_model, tiny_detector, tiny_rewriter, object_words=nouns).model_copy(
        update={"max_new_tokens": 16, "min_new_tokens": 16})
    op = Recaptioner(c)
    op._load_models()
    seen: list[str] = []
    prepare = op._rewriter._prepare
    op._rewriter._prepare = lambda images, texts: (seen.extend(texts), prepare(images, texts))[1]
    rows = op(batch([jpeg(40 + i, (64 + 8 * i, 80)) for i in range(6)], [["x"]] * 6)).to_pylist()
    assert op.detected == 6 and op.rewritten == len(seen) > 0
    some_removed = some_found = False
    for r in rows:
        named = extract_objects(r["recaption_reference"], nouns)
        found = {f["label"] for f in r["recaption_facts"]}
        assert found <= set(named) and all(f["mentioned"] for f in r["recaption_facts"])
        assert set(r["recaption_removed"]) == set(named) - found  # every named object: verified or removed
        assert all(0 <= v <= 1 for f in r["recaption_facts"] for v in f["box"]) and r["recaption"]
        some_removed |= bool(r["recaption_removed"])
        some_found |= bool(found)
        if r["recaption_facts"] or r["recaption_removed"]:
            assert any(f"Description: {r['recaption_reference']}\n" in p for p in seen)
            assert r["recaption"] != r["recaption_reference"] or r["recaption_error"]
    assert some_removed and some_found  # at this threshold the random detector finds some objects, not all
    assert not any("nothing detected" in p for p in seen)


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory) -> str:
    """A Grounding DINO (the paper's detector) with a tiny Swin backbone, a 1-layer BERT text encoder
    over the tiny captioner's words, seeded random weights, saved like a hub checkpoint."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    from operators.recaption import TINY_WORDS

    words = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + list(TINY_WORDS)))
    vocab = {w: i for i, w in enumerate(words)}
    gcfg = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=2, out_features=["stage2", "stage3", "stage4"]),
        use_timm_backbone=False, use_pretrained_backbone=False,
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, max_text_len=64)
    path = str(tmp_path_factory.mktemp("tinygdino"))
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(gcfg).eval().save_pretrained(path)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                           tokenizer=BertTokenizer(vocab=vocab)).save_pretrained(path)
    return path


def test_textualize_with_a_tiny_grounding_dino(saved_model, tiny_grounding_dino, tiny_rewriter):
    """Grounding DINO (the paper's detector) through the same passes: its boxes are labeled with the
    query phrase their tokens matched, so every fact is a named object and the rest are removed."""
    nouns = ["dog", "cat", "bird", "car", "bus", "tree", "flower", "house", "table", "chair", "cup", "hat", "ball"]
    c = it_cfg(saved_model, tiny_grounding_dino, tiny_rewriter, object_words=nouns).model_copy(
        update={"max_new_tokens": 16, "min_new_tokens": 16})
    op = Recaptioner(c)
    rows = op(batch([jpeg(60 + i) for i in range(4)], [["x"]] * 4)).to_pylist()
    assert op._detector.grounding and op.detected == 4
    assert any(r["recaption_facts"] for r in rows) and any(r["recaption_removed"] for r in rows)
    for r in rows:
        named = extract_objects(r["recaption_reference"], nouns)
        found = {f["label"] for f in r["recaption_facts"]}
        assert found <= set(named) and set(r["recaption_removed"]) == set(named) - found
        assert all(0 <= v <= 1 for f in r["recaption_facts"] for v in f["box"]) and r["recaption"]


def test_dry_run_models_build_from_config_dirs_seeded():
    """The dry run's textualize section: all three models built from configs/models/ with seeded
    random weights; two instances agree row for row."""
    import yaml

    section = yaml.safe_load((ROOT / "configs" / "dryrun.yaml").read_text())["recaption"]
    section["textualize"]["detector"]["model_config_path"] = TINY_OWL_DIR
    section["textualize"]["rewriter"]["model_config_path"] = TINY_REWRITER_DIR
    c = RecaptionConfig(**{**section, "model_config_path": TINY_DIR, "cache": False})
    assert c.random_weights() and c.textualize.detector.model is None and c.textualize.rewriter.model is None
    t = batch([jpeg(50), jpeg(51), jpeg(52)], [["a"], ["b"], ["c"]])
    cols = ["recaption", "recaption_reference", "recaption_facts", "recaption_removed"]
    a = Recaptioner(c)(t).select(cols).to_pylist()
    b = Recaptioner(c)(t).select(cols).to_pylist()
    assert a == b and all(r["recaption_reference"] for r in a)


def test_cache_key_covers_every_pass(saved_model, tiny_detector, tiny_rewriter, tmp_path):
    base = it_cfg(saved_model, tiny_detector, tiny_rewriter)
    key = base.settings_key()
    t = base.textualize
    changed = [
        {"detector": t.detector.model_copy(update={"score_threshold": 0.3})},
        {"detector": t.detector.model_copy(update={"model": "google/owlv2-base-patch16-ensemble"})},
        {"rewriter": t.rewriter.model_copy(update={"model": "Qwen/Qwen2.5-0.5B-Instruct"})},
        {"rewriter": t.rewriter.model_copy(update={"prompt": "Fix: {reference} {evidence}"})},
        {"object_words": ["dog"]}, {"extra_queries": ["cat"]}, {"max_objects": 3},
    ]
    for update in changed:
        other = base.model_copy(update={"textualize": t.model_copy(update=update)})
        assert other.settings_key() != key, update
    # Random detector weights: the config dir's content is part of the key.
    rnd = cfg(saved_model, textualize={"enabled": True, "detector": {"model": None, "model_config_path": TINY_OWL_DIR},
                                       "rewriter": {"model": tiny_rewriter}})
    assert rnd.settings_key() != key
    # Textualize off: its settings change no caption.
    off = cfg(saved_model)
    assert off.settings_key() == cfg(saved_model, textualize={"detector": {"score_threshold": 0.9}}).settings_key()
    # In a run: another detector setting regenerates, the same settings do not.
    batch_ = batch([jpeg(55), jpeg(56)], [["a"], ["b"]])
    cached = base.model_copy(update={"cache": True, "cache_path": str(tmp_path / "c")})
    Recaptioner(cached)(batch_)
    same = Recaptioner(cached)
    same(batch_)
    assert same.generated == 0
    stricter = cached.model_copy(update={"textualize": t.model_copy(
        update={"detector": t.detector.model_copy(update={"score_threshold": 0.9})})})
    redo = Recaptioner(stricter)
    redo(batch_)
    assert redo.generated == 2


def test_textualize_config_errors():
    with pytest.raises(ValueError, match="transformers"):
        RecaptionConfig(enabled=True, backend="vllm", model="some/vlm", textualize={"enabled": True})
    with pytest.raises(ValueError, match="textualize.detector.model_config_path"):
        cfg(None, textualize={"enabled": True, "detector": {"model": None}})
    with pytest.raises(ValueError, match="textualize.rewriter.model_config_path"):
        cfg(None, textualize={"enabled": True, "detector": {"model": None, "model_config_path": TINY_OWL_DIR},
                              "rewriter": {"model": None}})
    with pytest.raises(ValueError, match="reference"):
        cfg(None, textualize={"enabled": True, "rewriter": {"prompt": "no field here"}})
    from operators.recaption import model_report

    rep = model_report(cfg(None, textualize={"enabled": True, "detector": {"model": None,
                                                                          "model_config_path": TINY_OWL_DIR}}))
    assert rep["random_weights"] and rep["detector"].startswith("random weights") and rep["rewriter"]

# --- cache ----------------------------------------------------------------------------------------
def test_cache_prevents_regeneration_and_keys_on_prompt(saved_model, tmp_path):
    t = batch([jpeg(40), jpeg(41), jpeg(42)], [["a"], ["b"], ["c"]], status=["kept", "kept", "dropped"])
    c = cfg(saved_model, cache=True, cache_path=str(tmp_path / "cache"))
    first = Recaptioner(c)
    a = first(t)
    assert first.generated == 2
    again = Recaptioner(c)  # a new actor (a resume, a refresh): nothing regenerated
    b = again(t)
    assert again.generated == 0
    assert b.column("recaption").to_pylist() == a.column("recaption").to_pylist()
    assert b.column("recaption_cached").to_pylist() == [True, True, None]
    assert b.column("captions").to_pylist() == a.column("captions").to_pylist()
    # The same image under another sample id (another URL) hits too: the key is the image's sha256.
    moved = t.set_column(0, "sample_id", pa.array(["z0", "z1", "z2"]))
    third = Recaptioner(c)
    third(moved)
    assert third.generated == 0
    # Another prompt is another cache namespace.
    other = Recaptioner(cfg(saved_model, cache=True, cache_path=str(tmp_path / "cache"), prompt="a photo of"))
    other(t)
    assert other.generated == 2
    # A template quoting the alt-text keys on the alt-text too.
    quoting = cfg(saved_model, cache=True, cache_path=str(tmp_path / "cache"), prompt="{alt_text}")
    Recaptioner(quoting)(t)
    changed = batch([jpeg(40), jpeg(41), jpeg(42)], [["a"], ["new alt"], ["c"]], status=["kept", "kept", "dropped"])
    op = Recaptioner(quoting)
    op(changed)
    assert op.generated == 1


def test_cache_and_model_on_loopback_s3(saved_model, s3_server, s3fs_client):
    from operators.storage import StorageConfig

    s3fs_client.mkdir("imgcurate-recap")
    s3fs_client.put(saved_model.rstrip("/") + "/", "imgcurate-recap/models/tinyblip/", recursive=True)
    storage = StorageConfig(endpoint_url=s3_server)
    t = batch([jpeg(50), jpeg(51)], [["a"], ["b"]])
    c = cfg("s3://imgcurate-recap/models/tinyblip", cache=True, cache_path="s3://imgcurate-recap/cache",
            cache_dir=str(saved_model) + "-s3copy")
    op = Recaptioner(c, storage)
    out = op(t)
    assert op.generated == 2
    assert out.column("recaption").to_pylist() == Recaptioner(cfg(saved_model))(t).column("recaption").to_pylist()
    assert len(s3fs_client.find("imgcurate-recap/cache")) == 2
    again = Recaptioner(c, storage)
    again(t)
    assert again.generated == 0


# --- vLLM backend: config and messages (vLLM itself needs a GPU) ------------------------------------
def test_vllm_processor_config_has_multimodal_stage():
    c = RecaptionConfig(enabled=True, backend="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct",
                        vllm={"engine_kwargs": {"max_model_len": 16384, "tensor_parallel_size": 2},
                              "concurrency": 3, "batch_size": 16, "accelerator_type": "H100"})
    p = vllm_processor_config(c)
    assert type(p).__name__ == "vLLMEngineProcessorConfig"
    assert p.model_source == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert p.prepare_multimodal_stage == {"enabled": True}
    assert p.engine_kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert p.engine_kwargs["max_model_len"] == 16384 and p.engine_kwargs["tensor_parallel_size"] == 2
    assert (p.batch_size, p.concurrency, p.accelerator_type) == (16, 3, "H100")
    assert p.should_continue_on_error is True
    with pytest.raises(ValueError, match="vllm"):
        RecaptionConfig(enabled=True, backend="vllm", model=None, model_config_path=TINY_DIR)
    with pytest.raises(ValueError, match="transformers backend"):
        Recaptioner(c)


def test_vllm_messages_carry_image_and_prompt_and_skip_rows_without_work():
    c = RecaptionConfig(enabled=True, backend="vllm", model="some/vlm", system_prompt="You caption images.",
                        prompt="Alt-text: {alt_text}. Describe the image.", max_new_tokens=77)
    img = jpeg(60)
    row = {"sample_id": "s", "status": "kept", "image": img, "captions": ["  a  red\nbus "],
           "caption_sources": ["caption"], "recaption_cached": None}
    req = vllm_preprocess(row, c)
    sys_msg, user = req["messages"]
    assert sys_msg == {"role": "system", "content": [{"type": "text", "text": "You caption images."}]}
    assert user["role"] == "user"
    image_part, text_part = user["content"]
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == img
    assert text_part == {"type": "text", "text": "Alt-text: a red bus. Describe the image."}
    assert req["sampling_params"]["max_tokens"] == 77 and req["sampling_params"]["temperature"] == 0.0
    # Dropped and cached rows send a one-token text-only request and keep their columns.
    for other in ({**row, "status": "dropped"}, {**row, "recaption_cached": True, "recaption": "cached one"}):
        skip = vllm_preprocess(other, c)
        assert skip["recaption_skip"] is True and skip["sampling_params"]["max_tokens"] == 1
        assert all(p["type"] == "text" for m in skip["messages"] for p in m["content"])
        back = vllm_postprocess({**skip, "generated_text": "x"}, c)
        assert "messages" not in back and back.get("recaption") == other.get("recaption")
        assert back["captions"] == row["captions"]
    done = vllm_postprocess({**req, "generated_text": "  A red bus\n on a street. ", "num_generated_tokens": 7}, c)
    assert done["recaption"] == "A red bus on a street." and done["recaption_tokens"] == 7
    assert done["captions"] == ["  a  red\nbus ", "A red bus on a street."]
    assert done["caption_sources"] == ["caption", "recaption:vlm"]
    assert not {"messages", "sampling_params", "generated_text"} & set(done) and done["recaption_error"] is None
    failed = vllm_postprocess({**req, "generated_text": "", "__inference_error__": "ValueError: bad image"}, c)
    assert failed["recaption"] is None and failed["recaption_error"] == "ValueError: bad image"
    assert failed["captions"] == row["captions"] and "__inference_error__" not in failed


@pytest.mark.parametrize("sources, want_captions, want_sources", [
    (None, ["a", "b", "new"], [None, None, "recaption:vlm"]),
    (["caption"], ["a", "b", "new"], ["caption", None, "recaption:vlm"]),
    (["caption", "caption"], ["a", "b", "new"], ["caption", "caption", "recaption:vlm"]),
    (["caption", "recaption:vlm"], ["a", "new"], ["caption", "recaption:vlm"]),
], ids=["sources_null", "sources_shorter", "normal", "earlier_recaption_replaced"])
def test_vllm_recaption_keeps_alt_texts_and_pads_sources(sources, want_captions, want_sources):
    """Null or short ``caption_sources`` keep every alt-text, padded with null sources as the
    transformers path pads them; an earlier recaption of the same model is replaced."""
    c = RecaptionConfig(enabled=True, backend="vllm", model="some/vlm")
    row = {"sample_id": "s", "status": "kept", "image": jpeg(61), "captions": ["a", "b"], "caption_sources": sources,
           "recaption_cached": None}
    done = vllm_postprocess({**vllm_preprocess(row, c), "generated_text": "new", "num_generated_tokens": 1}, c)
    assert (done["captions"], done["caption_sources"]) == (want_captions, want_sources)


def test_vllm_cache_steps_around_the_processor(tmp_path):
    """Lookup fills cached rows (the processor then skips them); store writes what it generated."""
    c = RecaptionConfig(enabled=True, backend="vllm", model="some/vlm", cache_path=str(tmp_path / "c"))
    t = batch([jpeg(70), jpeg(71)], [["a"], ["b"]])
    looked = RecaptionCacheLookup(c)(t)
    assert looked.column("recaption_cached").to_pylist() == [None, None]
    rows = [vllm_postprocess({**vllm_preprocess(r, c), "generated_text": f"caption {i}", "num_generated_tokens": 2}, c)
            for i, r in enumerate(looked.to_pylist())]
    generated = pa.Table.from_pylist(rows, schema=looked.schema)
    RecaptionCacheStore(c)(generated)
    again = RecaptionCacheLookup(c)(t)
    assert again.column("recaption").to_pylist() == ["caption 0", "caption 1"]
    assert again.column("recaption_cached").to_pylist() == [True, True]
    assert again.column("captions").to_pylist() == [["a", "caption 0"], ["b", "caption 1"]]
    assert all(vllm_preprocess(r, c)["recaption_skip"] for r in again.to_pylist())


# --- config ---------------------------------------------------------------------------------------
def test_config_errors_name_the_key(tmp_path):
    from jobs.config import ConfigError, load_config

    base = {"input": {"paths": ["x.csv"]}, "output": {"path": str(tmp_path)}}
    with pytest.raises(ConfigError, match="recaption"):
        load_config(data={**base, "recaption": {"enabled": True, "model": None}})
    with pytest.raises(ConfigError, match="recaption.prompt_stile"):
        load_config(data={**base, "recaption": {"prompt_stile": "chat"}})
    with pytest.raises(ConfigError, match="recaption.model_config_path"):
        load_config(data={**base, "recaption": {"enabled": True, "model": None, "model_config_path": "nope/dir"}})
    ok = load_config(data={**base, "recaption": {"enabled": True, "model": None,
                                                 "model_config_path": "configs/models/imgcurate-tiny-captioner"}})
    assert ok.recaption.model_config_path == TINY_DIR


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
                 "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def chat_vlm(tmp_path_factory) -> str:
    """A tiny LLaVA (CLIP vision tower + Llama decoder) with a word-level tokenizer and a chat
    template, random weights, saved like a hub checkpoint: the chat path of instruction VLMs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    from operators.recaption import TINY_WORDS

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "user:", "assistant:", "system:"] + list(dict.fromkeys(TINY_WORDS))
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<image>"])
    tok.chat_template = CHAT_TEMPLATE
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       image_size=32, patch_size=16, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default")
    path = str(tmp_path_factory.mktemp("tinyllava"))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_chat_vlm_uses_its_template_and_batches_left_padded(chat_vlm):
    caps = [["a dog"], ["a red bus on the street near a tree and a man"], [""], ["东京"]]
    t = batch([jpeg(90 + i) for i in range(len(caps))], caps)
    c = cfg(chat_vlm, prompt="alt text: {alt_text} . describe the image", system_prompt="you caption images")
    op = Recaptioner(c.model_copy(update={"micro_batch": 4}))
    out = op(t).column("recaption").to_pylist()
    assert op._captioner.style == "chat" and op._captioner.tokenizer.padding_side == "left"
    assert op._captioner.text_inputs(["hello"]) == ["system: you caption images user: <image> hello assistant: "]
    single = Recaptioner(c.model_copy(update={"micro_batch": 1}))(t).column("recaption").to_pylist()
    assert out == single and all(isinstance(x, str) for x in out)
    # The echoed prompt is cut off: only new tokens come back.
    assert not any("assistant" in x or "alt text" in x for x in out if x)


def test_chat_style_needs_a_chat_template(saved_model):
    with pytest.raises(ValueError, match="chat template"):
        Recaptioner(cfg(saved_model, prompt_style="chat"))(batch([jpeg(80)], [["a"]]))


# --- in the job ---------------------------------------------------------------------------------------
def test_job_recaptions_kept_samples_and_a_refresh_reuses_the_cache(ray_session, image_server, tmp_path):
    import pyarrow.parquet as pq

    from jobs import curate
    from jobs.samples.data import sample_cases, write_url_list
    from tests.pipeline_helpers import job_config

    cases = sample_cases(12)
    urls = write_url_list(cases, image_server.base_url, str(tmp_path / "urls.csv"))
    cache = str(tmp_path / "shared-cache")
    sections = {"recaption": {"cache_path": cache}, "plan": {"num_buckets": 2, "shard_rows": 16},
                "safety": {"enabled": False}}
    m1 = curate.run(job_config(urls, str(tmp_path / "run1"), **sections))
    data = pq.read_table(str(tmp_path / "run1" / "data")).to_pylist()
    kept = [r for r in data if r["status"] == "kept"]
    # The first run generates every image once: only a repeat of an image (same bytes under
    # another URL) met in a later batch comes from the cache.
    repeats = len(kept) - len({r["sha256"] for r in kept})
    assert kept and m1["recaption"]["recaptioned"] == len(kept) and m1["recaption"]["cached"] <= repeats
    seen_once = [r for r in kept if sum(x["sha256"] == r["sha256"] for x in kept) == 1]
    assert not any(r["recaption_cached"] for r in seen_once)
    for r in data:
        if r["status"] == "kept":
            assert r["recaption"] and r["caption_sources"][-1] == "recaption:imgcurate-tiny-captioner"
            assert r["captions"][-1] == r["recaption"] and r["recaption_reference"]
            if r["recaption_error"] is None:  # Image Textualization ran all three passes
                assert isinstance(r["recaption_facts"], list) and isinstance(r["recaption_removed"], list)
        else:
            assert r["recaption"] is None and not any((s or "").startswith("recaption:") for s in r["caption_sources"])
    won = sum(1 for r in kept if (r["best_caption_source"] or "").startswith("recaption:"))
    assert m1["recaption"]["won"] == won and m1["recaption"]["ranked"] == len(kept)
    assert m1["models"]["recaption"]["random_weights"] is True
    assert "captions are gibberish" in curate.summary_table(m1)
    # A refresh into a new output with the same cache: every recaption comes from the cache.
    m2 = curate.run(job_config(urls, str(tmp_path / "run2"), **sections))
    assert m2["recaption"]["recaptioned"] == len(kept) and m2["recaption"]["cached"] == len(kept)
    data2 = {r["sample_id"]: r["recaption"] for r in pq.read_table(str(tmp_path / "run2" / "data")).to_pylist()}
    assert all(data2[r["sample_id"]] == r["recaption"] for r in kept)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp32_matches_cpu_and_fp16_runs(saved_model):
    """On CUDA: overlapped preparation (pinned copies on their own stream) gives the CPU's greedy
    captions in fp32; fp16 generates one caption per kept sample."""
    t = batch([jpeg(100 + i) for i in range(6)], [["a"], ["b c"], ["d"], [""], ["e f g"], ["h"]],
              status=["kept", "kept", "dropped", "kept", "kept", "kept"])
    cpu = Recaptioner(cfg(saved_model, prompt="{alt_text}", micro_batch=2))(t).column("recaption").to_pylist()
    gpu32 = Recaptioner(cfg(saved_model, prompt="{alt_text}", micro_batch=2, device="cuda", precision="fp32"))(t)
    assert gpu32.column("recaption").to_pylist() == cpu
    gpu16 = Recaptioner(cfg(saved_model, prompt="{alt_text}", micro_batch=2, device="cuda"))(t)
    got = gpu16.column("recaption").to_pylist()
    assert [x is not None for x in got] == [True, True, False, True, True, True]
