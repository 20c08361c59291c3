"""Image Textualization's pass 3 (Pi et al., 2024): a text-only language model rewrites the
reference description from the verified facts. Any transformers ``AutoModelForCausalLM`` (with its
tokenizer's chat template, or a plain prompt), batched and split on failure as the captioner is;
and the tiny Llama-shaped rewriter the tests and the dry run build."""

from __future__ import annotations

import os

from operators.recaption.captioners import (TINY_WORDS, TransformersCaptioner, _dtype, load_pretrained, load_processor,
                                            save_tiny)
from operators.recaption.config import RecaptionConfig
from operators.storage import StorageConfig


def rewriter_view(cfg: RecaptionConfig) -> RecaptionConfig:
    """The recaption settings as the rewriter generates: its model, prompt style, limits and
    micro-batch; greedy decoding (the captioner's other settings stay: precision, caption length)."""
    r = cfg.textualize.rewriter
    return cfg.model_copy(update={
        "model": r.model, "revision": r.revision, "model_config_path": r.model_config_path,
        "prompt_style": r.prompt_style, "system_prompt": r.system_prompt, "max_prompt_tokens": r.max_prompt_tokens,
        "max_new_tokens": r.max_new_tokens, "min_new_tokens": r.min_new_tokens, "num_beams": 1, "do_sample": False,
        "repetition_penalty": r.repetition_penalty, "micro_batch": r.micro_batch})


class TextRewriter(TransformersCaptioner):
    """``generate(prompts)``: one rewritten description and its token count per prompt, no image."""

    def __init__(self, cfg: RecaptionConfig, storage: StorageConfig | None, device: str):
        super().__init__(rewriter_view(cfg), storage, device)
        tok = self.tokenizer
        if tok.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
            tok.pad_token = tok.eos_token
            self._prep_processor.pad_token = tok.eos_token

    def _load(self, storage: StorageConfig | None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        c = self.cfg
        model, path = load_pretrained(AutoModelForCausalLM, c.model, c.model_config_path, c.revision, storage,
                                      c.cache_dir, _dtype(c.precision, self.device))
        return model.to(self.device).eval(), load_processor(AutoTokenizer, path, c.revision)

    def text_inputs(self, prompts: list[str]) -> list[str]:
        if self.style != "chat":
            return prompts
        msgs = [([{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else [])
                + [{"role": "user", "content": p}] for p in prompts]
        return [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]

    def generate(self, prompts: list[str]) -> list[tuple[str | None, int, str | None]]:  # type: ignore[override]
        """``(text, new tokens, error)`` per prompt, in order (see ``TransformersCaptioner.generate``)."""
        return super().generate([None] * len(prompts), prompts)

    def _prepare(self, images: list, texts: list[str]) -> dict:
        with self._prep_lock:
            inputs = self._prep_processor(texts, return_tensors="pt", padding=True, truncation=True,
                                          max_length=self.cfg.max_prompt_tokens,
                                          add_special_tokens=self.style != "chat")  # a chat template has its own
        return {k: v.to(self.device) for k, v in inputs.items() if hasattr(v, "to")}


# --- tiny model (tests, dry run) -----------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def write_tiny_rewriter(path: str, weights: bool = False, hidden: int = 32, layers: int = 2) -> str:
    """A Llama-shaped causal LM with a word-level tokenizer (the tiny captioner's words and the
    rewrite prompt's) and a chat template: config + tokenizer files (and seeded random weights when
    ``weights``). Random weights write gibberish."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from operators.recaption.prompts import DEFAULT_REWRITE_PROMPT, HALLUCINATION_HEADER, VERIFIED_HEADER

    prompt_words = [t for t, _ in pre_tokenizers.Whitespace().pre_tokenize_str(
        (DEFAULT_REWRITE_PROMPT + " " + VERIFIED_HEADER + " " + HALLUCINATION_HEADER).lower())]
    words = ["<pad>", "<unk>", "<s>", "</s>", "user", "assistant", "system", ":"] + list(TINY_WORDS) + prompt_words
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", model_max_length=2048)
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=2048,
                      pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    return save_tiny(path, cfg, LlamaForCausalLM, weights)

