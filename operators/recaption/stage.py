"""The recaption stage's steps: ``Recaptioner`` (transformers backend: cache lookup, decode,
generate, in Image Textualization mode detect and rewrite, cache store) and the vLLM backend's
cache steps around ray.data.llm's processor (``RecaptionCacheLookup`` before it,
``RecaptionCacheStore`` after it).

``Recaptioner`` and ``RecaptionCacheLookup`` are ``KeptRowsStage``s: they compute on the kept
rows only and the base scatters the results back (rows not kept keep the values an earlier step
wrote). Every row leaves with its ``caption_sources`` padded (or cut) to its ``captions`` and its
recaption among them, kept or not.
"""

from __future__ import annotations

import hashlib
import logging
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from operators.base import (DECODE_ERROR, KEPT, Columns, KeptRowsStage, Operator, Resources, Scored,
                            model_stage_resources, set_columns)
from operators.models.common import decode_all, resolve_device
from operators.recaption.cache import RecaptionCache
from operators.recaption.captioners import TransformersCaptioner
from operators.recaption.config import RecaptionConfig
from operators.recaption.captioners import _dtype
from operators.recaption.detectors import OpenVocabularyDetector
from operators.recaption.prompts import (SOURCE_PREFIX, alt_text_of, clean_alt_text, prompt_inputs_digest,
                                        render_prompt, render_rewrite)
from operators.recaption.textualize import queries_for, verify
from operators.storage import StorageConfig

log = logging.getLogger(__name__)


def with_recaption(captions: list | None, sources: list | None, recaption: str | None, source: str) -> dict:
    """``captions`` and ``caption_sources`` with ``recaption`` appended under ``source``. Sources
    are padded with nulls (or cut) to the captions' length, so no alt-text is lost; an earlier
    caption from ``source`` is replaced (a rerun never duplicates). No recaption: only the padding."""
    caps, srcs = list(captions or []), list(sources or [])
    if len(srcs) != len(caps):
        srcs = (srcs + [None] * len(caps))[:len(caps)]
    if recaption:
        keep = [j for j, s in enumerate(srcs) if s != source]
        caps, srcs = [caps[j] for j in keep] + [recaption], [srcs[j] for j in keep] + [source]
    return {"captions": caps, "caption_sources": srcs}



# Image Textualization's facts: one per box the detector kept (``prompts.describe_objects``), and
# whether the reference named the object (else it was an extra query).
FACT_TYPE = pa.struct([("label", pa.string()), ("score", pa.float64()), ("box", pa.list_(pa.float64())),
                       ("area", pa.float64()), ("where", pa.string()), ("mentioned", pa.bool_())])
OUTPUT_TYPES = {"recaption": pa.string(), "recaption_model": pa.string(), "recaption_cached": pa.bool_(),
                "recaption_tokens": pa.int32(), "recaption_reference": pa.string(),
                "recaption_facts": pa.list_(FACT_TYPE), "recaption_removed": pa.list_(pa.string()),
                "recaption_error": pa.string()}
# What a cache entry keeps of a row (column -> entry key).
CACHED = {"recaption": "recaption", "recaption_tokens": "tokens", "recaption_reference": "reference",
          "recaption_facts": "facts", "recaption_removed": "removed"}
CAPTION_TYPES = {"captions": pa.list_(pa.string()), "caption_sources": pa.list_(pa.string())}


def with_recaptions(table: pa.Table, source: str) -> dict[str, pa.Array]:
    """``with_recaption`` over every row of ``table`` with the row's ``recaption`` (if any): its
    ``captions`` (null: empty) and ``caption_sources`` padded (or cut) to them. Idempotent on a
    row it already made."""
    captions = table.column("captions").to_pylist()
    n = len(captions)
    sources = (table.column("caption_sources").to_pylist() if "caption_sources" in table.column_names
               else [None] * n)
    recaptions = table.column("recaption").to_pylist() if "recaption" in table.column_names else [None] * n
    rows = [with_recaption(c, s, r, source) for c, s, r in zip(captions, sources, recaptions)]
    return {name: pa.array([row[name] for row in rows], typ) for name, typ in CAPTION_TYPES.items()}


class _RecaptionStep(Operator):
    """What the recaption steps share: config, the cache, cache keys per row, and the declarations."""

    name: ClassVar[str] = "recaption"
    reads = ("status", "drop_stage", "drop_reason", "error_message", "image", "captions")
    writes = tuple(OUTPUT_TYPES) + tuple(CAPTION_TYPES)
    reasons = (DECODE_ERROR,)

    def __init__(self, config: RecaptionConfig | dict | None = None, storage: StorageConfig | dict | None = None,
                 cache_root: str | None = None):
        self.config = config if isinstance(config, RecaptionConfig) else RecaptionConfig(**(config or {}))
        self.storage = storage if isinstance(storage, StorageConfig) or storage is None else StorageConfig(**storage)
        root = self.config.cache_path or cache_root
        self.cache = (RecaptionCache(root, self.config.settings_key(), self.storage)
                      if self.config.cache and root else None)
        self.model_name = self.config.name()
        self.source = SOURCE_PREFIX + self.model_name

    @classmethod
    def resources(cls, config: RecaptionConfig) -> Resources:
        return model_stage_resources(config)

    @classmethod
    def columns(cls, config: RecaptionConfig | None = None) -> Columns:
        """The same with every config: the eight ``recaption*`` columns (the textualize ones null
        when it is off), and ``captions`` / ``caption_sources`` rewritten with the recaption appended."""
        return Columns(cls.reads, {**OUTPUT_TYPES, **CAPTION_TYPES}, optional=("caption_sources", "sha256"))

    def _rows(self, rows: pa.Table) -> dict:
        """Per table of kept rows: their alt-text and cache key ((sha256, prompt inputs)), and the
        ``recaption*`` values an earlier step (cache lookup, vLLM) already wrote."""
        c = self.config
        n = rows.num_rows
        captions = rows.column("captions").to_pylist()
        sources = (rows.column("caption_sources").to_pylist() if "caption_sources" in rows.column_names
                   else [[None] * len(x or []) for x in captions])
        blobs = rows.column("image").to_pylist()
        shas = rows.column("sha256").to_pylist() if "sha256" in rows.column_names else [None] * n
        for k in range(n):
            if shas[k] is None and blobs[k] is not None:
                shas[k] = hashlib.sha256(blobs[k]).hexdigest()
        # Whether the template quotes the alt-text does not depend on the prompt style (only a set
        # prompt or IT mode do), so keys are known before the model is loaded.
        tmpl = c.template("prefix")
        alts = [clean_alt_text(alt_text_of(captions[k], sources[k]), c.max_alt_text_chars) for k in range(n)]
        keys = {k: (shas[k], prompt_inputs_digest(tmpl, alts[k])) for k in range(n) if shas[k]}
        cols = {name: rows.column(name).to_pylist() if name in rows.column_names else [None] * n
                for name in OUTPUT_TYPES}
        return {"n": n, "blobs": blobs, "alts": alts, "keys": keys, "captions": captions, "sources": sources,
                "cols": cols}

    def _lookup(self, r: dict) -> list[int]:
        """Fill cached recaptions; the rows still to generate."""
        cols, keys = r["cols"], r["keys"]
        hits = self.cache.get_many(list(set(keys.values()))) if self.cache else {}
        todo = []
        for k in range(r["n"]):
            entry = hits.get(keys.get(k))
            if entry is None:
                todo.append(k)
                continue
            for column, key in CACHED.items():
                cols[column][k] = entry.get(key)
            cols["recaption_cached"][k] = True
            cols["recaption_model"][k] = self.model_name
        return todo

    def _store(self, r: dict, rows: list[int]) -> None:
        if not self.cache:
            return
        cols = r["cols"]
        self.cache.put_many({r["keys"][k]: {**{key: cols[column][k] for column, key in CACHED.items()},
                                            "model": self.model_name} for k in rows if k in r["keys"]})

    def _scored(self, r: dict, outcomes: list | None) -> Scored:
        """The columns of the kept rows; each recaption appended to ``captions`` with its source (once)."""
        cols = r["cols"]
        merged = [with_recaption(r["captions"][k], r["sources"][k], cols["recaption"][k], self.source)
                  for k in range(r["n"])]
        return Scored({**cols, **{name: [m[name] for m in merged] for name in CAPTION_TYPES}}, outcomes)


class _KeptRowsRecaption(_RecaptionStep, KeptRowsStage):
    """A recaption step over the kept rows. The rows not kept leave as the kept ones do: sources
    padded to the captions, and a recaption an earlier step wrote in ``captions`` (once)."""

    def process(self, batch: pa.Table) -> pa.Table:
        out = super().process(batch)
        return set_columns(out, with_recaptions(out, self.source))


class Recaptioner(_KeptRowsRecaption):
    """Writes ``recaption``, ``recaption_model``, ``recaption_cached``, ``recaption_tokens``,
    ``recaption_error`` and appends the recaption to ``captions`` / ``caption_sources``. Rows that
    are not kept get nulls and no compute; cached rows get the cached caption and no compute. A
    generation that fails leaves the sample kept with its alt-texts, a null recaption and the error
    in ``recaption_error``.

    Image Textualization mode (``recaption.textualize``; Pi et al., 2024) runs the paper's three
    passes per image: the captioner's reference description (``recaption_reference``), the
    open-vocabulary detector's check of every object it names (``recaption_facts``: the boxes
    found; ``recaption_removed``: the named objects not found, hallucinations), and the text-only
    rewriter's description from those facts (``recaption``; ``recaption_tokens`` counts the tokens of
    whichever pass wrote it). Where the detector or the rewriter
    fails on an image, its recaption is the reference, with the reason in ``recaption_error``
    (not cached: a rerun tries again)."""

    def __init__(self, config: RecaptionConfig | dict | None = None, storage: StorageConfig | dict | None = None,
                 cache_root: str | None = None):
        super().__init__(config, storage, cache_root)
        if self.config.backend != "transformers":
            raise ValueError("Recaptioner runs the transformers backend; the vllm backend is ray.data.llm's processor "
                             "(operators.recaption.vllm.apply_vllm_recaption)")
        self._captioner = None
        self._detector = self._rewriter = None
        self.generated = 0  # captions generated by this instance (tests, benchmarks)
        self.detected = 0  # images the detector checked (those whose reference names an object)
        self.rewritten = 0  # rewrites generated

    def _load_models(self) -> None:
        """The captioner (and in textualize mode the detector and the rewriter), once, when a batch
        first has rows to generate: an actor whose rows all come from the cache loads no model
        (hence not ``setup``)."""
        if self._captioner is not None:
            return
        c = self.config
        self.device = resolve_device(c.device)
        self._captioner = TransformersCaptioner(c, self.storage, self.device)
        self.template = c.template(self._captioner.style)
        if c.textualize.enabled:
            from operators.recaption.rewriters import TextRewriter

            self._detector = OpenVocabularyDetector(c.textualize.detector, self.storage, self.device,
                                                    _dtype(c.precision, self.device), c.cache_dir)
            self._rewriter = TextRewriter(c, self.storage, self.device)

    def score(self, rows: pa.Table) -> Scored:
        r = self._rows(rows)
        cols = r["cols"]
        outcomes: list = [None] * r["n"]
        todo = self._lookup(r)
        decoded, failures = decode_all([r["blobs"][k] for k in todo], self.name)
        images, ok_rows = [], []
        for k, im, failure in zip(todo, decoded, failures):
            if failure is None:
                images.append(im)
                ok_rows.append(k)
            else:
                outcomes[k] = failure
        if ok_rows:
            self._load_models()
            prompts = [render_prompt(self.template, r["alts"][k]) for k in ok_rows]
            results = self._captioner.generate(images, prompts)
            self.generated += len(results)
            for k, (text, n_tok, error) in zip(ok_rows, results):
                cols["recaption"][k] = text or None
                cols["recaption_tokens"][k] = n_tok
                cols["recaption_cached"][k] = False
                cols["recaption_model"][k] = self.model_name
                cols["recaption_error"][k] = error
            if self._detector is not None:
                self._textualize(images, ok_rows, cols)
            # A failed generation (or detection, or rewrite) is not cached: a rerun tries again.
            self._store(r, [k for k in ok_rows if cols["recaption_error"][k] is None])
        return self._scored(r, outcomes)

    def _textualize(self, images: list, ok_rows: list[int], cols: dict) -> None:
        """Passes 2 and 3 over the rows whose reference (pass 1) was written."""
        t = self.config.textualize
        picked = [(im, k) for im, k in zip(images, ok_rows) if cols["recaption"][k]]
        if not picked:
            return
        named, queries = zip(*(queries_for(cols["recaption"][k], t) for _, k in picked))
        found, errors = self._detect([im for im, _ in picked], list(queries))
        rewrite = []  # (row, prompt)
        for (im, k), names, dets, error in zip(picked, named, found, errors):
            reference = cols["recaption_reference"][k] = cols["recaption"][k]
            if error:
                cols["recaption_error"][k] = f"textualize: detector failed ({error}); the reference is kept"
                continue
            v = verify(list(names), dets, im.width, im.height, t)
            cols["recaption_facts"][k], cols["recaption_removed"][k] = v.facts, v.removed
            if v.changes_anything():
                rewrite.append((k, render_rewrite(t.rewriter.template(), reference, v.facts_text, v.removed)))
        if not rewrite:
            return
        results = self._rewriter.generate([p for _, p in rewrite])
        self.rewritten += len(results)
        for (k, _), (text, n_tok, error) in zip(rewrite, results):
            if text:
                cols["recaption"][k], cols["recaption_tokens"][k] = text, n_tok
            else:
                why = error or "it wrote nothing"
                cols["recaption_error"][k] = f"textualize: rewrite failed ({why}); the reference is kept"

    def _detect(self, images: list, queries: list[list[str]]) -> tuple[list[list], list[str | None]]:
        """Detections and an error (or None) per image, in micro-batches; a micro-batch that
        fails is retried image by image, so one bad image costs only its own check."""
        mb = self.config.textualize.detector.micro_batch
        found: list[list] = [[] for _ in images]
        errors: list[str | None] = [None] * len(images)
        for s in range(0, len(images), mb):
            span = list(range(s, min(s + mb, len(images))))
            try:
                out = self._detector.detect([images[i] for i in span], [queries[i] for i in span])
            except Exception:  # noqa: BLE001 - retried one by one below
                out = None
            for n, i in enumerate(span):
                if out is not None:
                    found[i] = out[n]
                    continue
                try:
                    found[i] = self._detector.detect([images[i]], [queries[i]])[0]
                except Exception as exc:  # noqa: BLE001 - recorded on the row, its reference is kept
                    log.warning("recaption: the detector failed on one image: %s", exc)
                    errors[i] = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.detected += sum(1 for i in span if queries[i])
        return found, errors


class RecaptionCacheLookup(_KeptRowsRecaption):
    """vLLM backend, before the processor: cached recaptions filled in (those rows skip the engine)."""

    def score(self, rows: pa.Table) -> Scored:
        r = self._rows(rows)
        self._lookup(r)
        return self._scored(r, None)


class RecaptionCacheStore(_RecaptionStep):
    """vLLM backend, after the processor: newly generated recaptions written to the cache; the
    batch passes through unchanged."""

    @classmethod
    def columns(cls, config: RecaptionConfig | None = None) -> Columns:
        return Columns(cls.reads, {}, optional=("caption_sources", "sha256", *OUTPUT_TYPES))

    def process(self, batch: pa.Table) -> pa.Table:
        if not self.cache:
            return batch
        rows = batch.filter(pc.fill_null(pc.equal(batch.column("status"), KEPT), False))
        r = self._rows(rows)
        cols = r["cols"]
        self._store(r, [k for k in range(r["n"]) if cols["recaption_cached"][k] is False
                        and not cols["recaption_error"][k]])
        return batch


def model_report(cfg: RecaptionConfig) -> dict:
    t = cfg.textualize
    out = {"model": cfg.name(), "pretrained": cfg.model, "revision": cfg.revision, "backend": cfg.backend,
           "random_weights": cfg.random_weights(), "textualize": t.enabled, "settings_key": cfg.settings_key()}
    if t.enabled:
        out["detector"] = t.detector.model or f"random weights from {t.detector.model_config_path}"
        out["rewriter"] = t.rewriter.model or f"random weights from {t.rewriter.model_config_path}"
    return out
