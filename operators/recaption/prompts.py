"""What goes into a recaption prompt and what comes out of it: alt-text cleaning, templates and
their rendering, the per-image part of the cache key, Image Textualization's object facts and
rewrite prompt (Pi et al., 2024), chat messages, and the caption as written."""

from __future__ import annotations

import hashlib
import re
import unicodedata

SOURCE_PREFIX = "recaption:"
DEFAULT_CHAT_PROMPT = "Describe this image in one detailed paragraph. Mention only what is visible."
# Image Textualization's pass 3 (the rewrite), after the paper's recaptioning prompt: keep the
# reference's wording, place the verified objects, delete the hallucinations, add nothing else.
DEFAULT_REWRITE_PROMPT = (
    "Make this image description accurate and detailed.\n"
    "Description: {reference}\n"
    "{evidence}\n"
    "Keep what the description says about objects that are there, say where they are and how large they "
    "look in words (no numbers), delete every hallucination and whatever is said only about it, and add "
    "nothing else. Reply with the new description only."
)
VERIFIED_HEADER = ("Objects a detector verified in the image (confidence, position, share of the image, box "
                   "[x0, y0, x1, y1] with 0-1 coordinates from the top left):")
HALLUCINATION_HEADER = "Hallucinations (named in the description, not found in the image): "


# --- prompts ------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]")


def clean_alt_text(text: str | None, max_chars: int) -> str:
    """Alt-text as it goes into a prompt: NFC, no control or bidi characters, one line, cut at
    ``max_chars`` (on a word boundary when there is one) with an ellipsis."""
    if not text:
        return ""
    t = unicodedata.normalize("NFC", str(text))
    t = _CONTROL.sub(" ", t)
    t = " ".join(t.split())
    if len(t) > max_chars:
        t = _cut_at_word(t, max_chars) + "…"
    return t


def _cut_at_word(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars``, at the last space when that keeps more than half."""
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def alt_text_of(captions: list | None, sources: list | None) -> str:
    """The first non-blank caption that is not a recaption: the alt-text the prompt quotes."""
    caps = captions or []
    srcs = sources if sources is not None and len(sources) == len(caps) else [None] * len(caps)
    for c, s in zip(caps, srcs):
        if c is not None and c.strip() and not (s or "").startswith(SOURCE_PREFIX):
            return c
    return ""


_FIELD = re.compile(r"\{(alt_text)\}")
_REWRITE_FIELD = re.compile(r"\{(reference|evidence)\}")


def render_prompt(template: str, alt_text: str) -> str:
    """Fill ``{alt_text}`` in one pass over the template: braces inside the alt-text are just text."""
    return _FIELD.sub(lambda m: alt_text or "(none)", template)


def evidence_text(facts_text: str, removed: list[str]) -> str:
    """Pass 2's findings for the rewrite prompt: the verified objects' fact lines, then the
    hallucinations. A part with nothing in it is left out (the model is never told that nothing
    was found: an empty list is no evidence of an empty image)."""
    parts = []
    if facts_text:
        parts.append(f"{VERIFIED_HEADER}\n{facts_text}")
    if removed:
        parts.append(HALLUCINATION_HEADER + "; ".join(removed))
    return "\n".join(parts)


def render_rewrite(template: str, reference: str, facts_text: str, removed: list[str]) -> str:
    """The rewrite prompt: ``{reference}`` and ``{evidence}`` filled in one pass (braces in the
    reference are text)."""
    values = {"reference": reference, "evidence": evidence_text(facts_text, removed)}
    return _REWRITE_FIELD.sub(lambda m: values[m.group(1)], template)


def prompt_inputs_digest(template: str, alt_text: str) -> str:
    """The per-image part of the cache key: what of the row goes into the prompt (Image
    Textualization's facts are a function of the image and of settings already in the key)."""
    if "{alt_text}" not in template:
        return "-"
    return hashlib.sha256(alt_text.encode()).hexdigest()[:12]


def clean_caption(text: str, max_chars: int) -> str:
    t = " ".join((text or "").split())
    return _cut_at_word(t, max_chars) if len(t) > max_chars else t


def chat_messages(prompt: str, system_prompt: str | None = None, image_url: str | None = None) -> list[dict]:
    """OpenAI-style chat messages: one user turn with the image first, then the prompt."""
    image_part = {"type": "image"} if image_url is None else {"type": "image_url", "image_url": {"url": image_url}}
    msgs = []
    if system_prompt:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    msgs.append({"role": "user", "content": [image_part, {"type": "text", "text": prompt}]})
    return msgs


# --- Image Textualization facts --------------------------------------------------------------------
def _where(cx: float, cy: float) -> str:
    v = "top" if cy < 1 / 3 else ("bottom" if cy > 2 / 3 else "middle")
    h = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "center")
    return "center" if (v, h) == ("middle", "center") else f"{v} {h}"


def describe_objects(detections: list[tuple[str, float, tuple[float, float, float, float]]], width: int, height: int,
                     max_objects: int = 12) -> tuple[str, list[dict]]:
    """Facts from detections ``(label, score, (x0, y0, x1, y1) in pixels)``: one line per object
    with its box in relative coordinates, the share of the image it covers and where it is."""
    w, h = max(int(width), 1), max(int(height), 1)
    objs = []
    for label, score, (x0, y0, x1, y1) in sorted(detections, key=lambda d: -d[1])[:max_objects]:
        bx = [min(max(x0 / w, 0.0), 1.0), min(max(y0 / h, 0.0), 1.0), min(max(x1 / w, 0.0), 1.0),
              min(max(y1 / h, 0.0), 1.0)]
        area = max(bx[2] - bx[0], 0.0) * max(bx[3] - bx[1], 0.0)
        objs.append({"label": str(label), "score": round(float(score), 3), "box": [round(v, 3) for v in bx],
                     "area": round(area, 4), "where": _where((bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2)})
    lines = [f"- {o['label']} (confidence {o['score']:.2f}) at the {o['where']}, covering {o['area']:.0%} of the "
             f"image, box [{', '.join(f'{v:.2f}' for v in o['box'])}]" for o in objs]
    return "\n".join(lines), objs
