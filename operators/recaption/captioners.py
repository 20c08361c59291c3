"""The transformers captioner: loading (hub id, local dir, file://, s3://, or seeded random weights
from a config), batched ``generate`` with overlapped preparation, and the tiny BLIP-shaped
captioner the tests and the dry run build."""

from __future__ import annotations

import copy
import logging
import os
import threading

from operators.models.common import seeded
from operators.recaption.config import RecaptionConfig
from operators.recaption.prompts import chat_messages, clean_caption
from operators.storage import StorageConfig, local_copy

log = logging.getLogger(__name__)


# --- models ------------------------------------------------------------------------------------------
def _dtype(precision: str, device: str):
    import torch

    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def load_pretrained(auto_cls, spec: str | None, config_path: str | None, revision: str | None,
                    storage: StorageConfig | None, cache_dir: str | None, dtype):
    """(model, local path or hub id) for a spec: an HF id (hub cache), a local dir, ``file://``,
    ``s3://`` (copied once into ``cache_dir``), or ``None``: random weights built from the config
    in ``config_path`` (seeded: every actor gets the same model). The captioner, the detector and
    the rewriter all load this way."""
    from transformers import AutoConfig

    if spec is None:
        config = AutoConfig.from_pretrained(config_path, local_files_only=True)
        return seeded(lambda: auto_cls.from_config(config)).to(dtype), config_path
    path = local_copy(spec, storage, cache_dir)
    local = os.path.isdir(path)
    return auto_cls.from_pretrained(path, revision=None if local else revision, dtype=dtype,
                                    local_files_only=local), path


def load_processor(auto_cls, path: str, revision: str | None):
    """The processor (or tokenizer) saved with a model: a local dir, or a hub id at ``revision``."""
    local = os.path.isdir(path)
    return auto_cls.from_pretrained(path, local_files_only=local, revision=None if local else revision)


def load_captioner(cfg: RecaptionConfig, storage: StorageConfig | None = None, device: str = "cpu"):
    """(model, processor) of the captioner (``recaption.model``; see :func:`load_pretrained`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, path = load_pretrained(AutoModelForImageTextToText, cfg.model, cfg.model_config_path, cfg.revision,
                                  storage, cfg.cache_dir, _dtype(cfg.precision, device))
    return model.to(device).eval(), load_processor(AutoProcessor, path, cfg.revision)


def _chat_template_of(processor) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                "chat_template", None)


def _is_tokenizer(obj) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(obj, PreTrainedTokenizerBase)


class TransformersCaptioner:
    """Batched ``generate`` over PIL images and prompts; one caption and its token count per image."""

    def __init__(self, cfg: RecaptionConfig, storage: StorageConfig | None, device: str):
        self.cfg = cfg
        self.device = device
        self.model, self.processor = self._load(storage)
        self.dtype = next(self.model.parameters()).dtype
        style = cfg.prompt_style
        if style == "auto":
            style = "chat" if _chat_template_of(self.processor) else "prefix"
        if style == "chat" and not _chat_template_of(self.processor):
            raise ValueError(f"recaption.prompt_style is 'chat' but {cfg.model or cfg.model_config_path!r} has no "
                             "chat template")
        self.style = style
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        tok = getattr(self.processor, "tokenizer", None)
        if tok is None and _is_tokenizer(self.processor):  # a text-only model (the rewriter): no processor
            tok = self.processor
        self.tokenizer = tok
        if tok is not None and not self.encoder_decoder:
            tok.padding_side = "left"  # decoder-only generation continues from the right end
        # Micro-batches are prepared on another thread: it gets its own processor (a fast
        # tokenizer changes its truncation state per call, which two threads must not share),
        # and a lock for when a retry prepares on this thread.
        self._prep_processor = copy.deepcopy(self.processor)
        self._prep_lock = threading.Lock()

    def _load(self, storage: StorageConfig | None):
        return load_captioner(self.cfg, storage, self.device)

    def text_inputs(self, prompts: list[str]) -> list[str]:
        if self.style != "chat":
            return prompts
        return [self.processor.apply_chat_template(chat_messages(p, self.cfg.system_prompt), tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]

    def prompt_lengths(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t) for t in texts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def generation_kwargs(self) -> dict:
        c = self.cfg
        kw = {"max_new_tokens": c.max_new_tokens, "min_new_tokens": c.min_new_tokens, "num_beams": c.num_beams,
              "do_sample": c.do_sample, "repetition_penalty": c.repetition_penalty}
        if c.do_sample:
            kw.update(temperature=c.temperature, top_p=c.top_p)
        return kw

    def generate(self, images: list, prompts: list[str]) -> list[tuple[str | None, int, str | None]]:
        """``(caption, new tokens, error)`` for equally long lists of images and (rendered) prompts,
        in order. Micro-batches are prepared (image processor, tokenizer, copy to the device) in a
        background thread while the previous one generates. A micro-batch that fails (CUDA out of
        memory, a prompt the model cannot take) is split in halves and retried, so one bad input
        costs only its own caption."""
        from concurrent.futures import ThreadPoolExecutor

        texts = self.text_inputs(prompts)
        if len(set(texts)) > 1:
            lengths = self.prompt_lengths(texts)
            order = sorted(range(len(texts)), key=lambda i: lengths[i])
        else:
            order = list(range(len(texts)))
        mb = self.cfg.micro_batch
        chunks = [order[s:s + mb] for s in range(0, len(order), mb)]
        out: list = [None] * len(texts)

        def prepare(ids):
            try:
                return self._prepare([images[i] for i in ids], [texts[i] for i in ids]), None
            except Exception as exc:  # noqa: BLE001 - retried (and split) on the generating thread
                return None, exc

        with ThreadPoolExecutor(1, thread_name_prefix="recaption-prep") as pool:
            pending = pool.submit(prepare, chunks[0]) if chunks else None
            for k, ids in enumerate(chunks):
                inputs, exc = pending.result()
                pending = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
                sub_images, sub_texts = [images[i] for i in ids], [texts[i] for i in ids]
                res = None
                if inputs is not None:
                    try:
                        res = [(text, n, None) for text, n in self._run(inputs, sub_texts)]
                    except Exception as e:  # noqa: BLE001
                        exc = e
                if res is None:
                    res = self._after_failure(exc, sub_images, sub_texts)
                for i, r in zip(ids, res):
                    out[i] = r
        return out

    def _after_failure(self, exc, images: list, texts: list[str]) -> list[tuple[str | None, int, str | None]]:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        if len(images) == 1:
            log.warning("recaption: generation failed for one image: %s", exc)
            return [(None, 0, f"{type(exc).__name__}: {str(exc)[:300]}")]
        h = len(images) // 2
        return self._generate_split(images[:h], texts[:h]) + self._generate_split(images[h:], texts[h:])

    def _generate_split(self, images: list, texts: list[str]) -> list[tuple[str | None, int, str | None]]:
        try:
            return [(text, n, None) for text, n in self._run(self._prepare(images, texts), texts)]
        except Exception as exc:  # noqa: BLE001 - recorded per row after the split
            return self._after_failure(exc, images, texts)

    def _prepare(self, images: list, texts: list[str]) -> dict:
        """Processor outputs on the device (pinned host memory first on CUDA, copies non-blocking)."""
        kw: dict = {"images": images, "return_tensors": "pt"}
        if any(texts):
            kw.update(text=texts, padding=True, truncation=True, max_length=self.cfg.max_prompt_tokens)
        with self._prep_lock:
            inputs = self._prep_processor(**kw)
        tensors = {k: v for k, v in inputs.items() if hasattr(v, "to")}
        if not self.device.startswith("cuda"):
            return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        import torch

        # Copies on a stream of their own, so they overlap the previous micro-batch's generation;
        # synchronized before the generating thread gets them (it frees them only after its own
        # generate has finished, so the allocator never hands the memory out early).
        if getattr(self, "_copy_stream", None) is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        out = {}
        with torch.cuda.stream(self._copy_stream):
            for k, v in tensors.items():
                v = v.pin_memory()
                out[k] = (v.to(self.device, self.dtype, non_blocking=True) if v.is_floating_point()
                          else v.to(self.device, non_blocking=True))
        self._copy_stream.synchronize()
        return out

    def _run(self, inputs: dict, texts: list[str]) -> list[tuple[str, int]]:
        import torch

        with torch.inference_mode():
            seqs = self.model.generate(**inputs, **self.generation_kwargs())
        seqs = seqs.cpu()
        prompt_ids = inputs.get("input_ids")
        new = seqs
        if prompt_ids is not None and not self.encoder_decoder:
            p = prompt_ids.cpu()
            if seqs.shape[1] >= p.shape[1] and torch.equal(seqs[:, :p.shape[1]], p):
                new = seqs[:, p.shape[1]:]  # decoder-only: the prompt is echoed first
        specials = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        decoded = self.processor.batch_decode(new, skip_special_tokens=True)
        echoed, echoed_len = [""] * len(texts), [0] * len(texts)
        if new is seqs and any(texts) and self.tokenizer is not None:
            # A captioner that echoes its prefix (BLIP) echoes it as its tokenizer sees it
            # (lower-cased, unknown words dropped): strip that round trip.
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            echoed = self.processor.batch_decode(ids, skip_special_tokens=True)
            echoed_len = [sum(1 for t in x if t not in specials) for x in ids]
        res = []
        for k, text in enumerate(decoded):
            if echoed[k]:
                text = _strip_prefix(text, echoed[k])
            n_tok = max(int(sum(1 for t in new[k].tolist() if t not in specials)) - echoed_len[k], 0)
            res.append((clean_caption(text, self.cfg.max_caption_chars), n_tok))
        return res


def _strip_prefix(text: str, prefix: str) -> str:
    """Drop an echoed prompt prefix, compared case- and space-insensitively."""
    norm_t, norm_p = " ".join(text.split()), " ".join(prefix.split())
    if norm_p and norm_t.lower().startswith(norm_p.lower()):
        return norm_t[len(norm_p):].strip()
    return text


# --- tiny model (tests, dry run) -----------------------------------------------------------------------
TINY_WORDS = ("a an the of on in with and at by near under over beside photo picture image view close up "
              "dog cat bird horse person man woman child people car bus bike boat train plane tree flower grass "
              "sky cloud sun water sea river lake beach sand mountain hill road street city building house room "
              "window door table chair bed sofa lamp book cup plate food bread fruit apple banana cake pizza "
              "red blue green yellow white black brown gray orange pink purple small large old new bright dark "
              "sitting standing running walking flying lying looking holding wearing playing eating riding "
              "front back left right top bottom middle two three four many some group field park garden wall "
              "floor snow rain night day light shadow hat shirt dress shoe bag ball toy phone computer sign").split()


def write_tiny_captioner(path: str, weights: bool = False, image_size: int = 64, hidden: int = 32, layers: int = 2,
                         heads: int = 2, vocab_size: int | None = None) -> str:
    """A BLIP-shaped captioner: config + processor files (and seeded random weights when
    ``weights``). The default is tiny, with a small word vocabulary; ``image_size=384,
    hidden=768, layers=12, heads=12, vocab_size=30524`` is BLIP-base's shape (benchmarks).
    Random weights write gibberish captions."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = specials + list(dict.fromkeys(TINY_WORDS))
    if vocab_size:  # filler word pieces up to the size, so every id the model may emit decodes
        words += [f"w{i}" for i in range(max(vocab_size - len(words), 0))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    cfg = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": hidden, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "intermediate_size": 4 * hidden if layers > 2 else 2 * hidden,
                     "max_position_embeddings": 512, "bos_token_id": vocab["[DEC]"], "pad_token_id": vocab["[PAD]"],
                     "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"]},
        vision_config={"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                       "intermediate_size": 4 * hidden if layers > 2 else 2 * hidden, "image_size": image_size,
                       "patch_size": 16},
        projection_dim=min(hidden, 256))
    os.makedirs(path, exist_ok=True)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tok)
    processor.save_pretrained(path)
    return save_tiny(path, cfg, BlipForConditionalGeneration, weights)


def save_tiny(path: str, cfg, model_cls, weights: bool) -> str:
    """A tiny model's config in ``path``, or with ``weights`` the model built from it (seeded)."""
    if weights:
        seeded(lambda: model_cls(cfg)).save_pretrained(path)
    else:
        cfg.save_pretrained(path)
    return path
