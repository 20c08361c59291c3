"""What goes into a recaption prompt and what comes out of it: alt-text cleaning, templates and
their rendering, the per-image part of the cache key, Image Textualization's object facts,
chat messages, and the caption as written."""

from __future__ import annotations

import hashlib
import re
import unicodedata

SOURCE_PREFIX = "recaption:"
DEFAULT_CHAT_PROMPT = "Describe this image in one detailed paragraph. Mention only what is visible."
DEFAULT_TEXTUALIZE_PROMPT = (
    "Write one detailed caption for this image.\n"
    "The web page's alt-text for it was: \"{alt_text}\".\n"
    "An object detector found:\n{facts}\n"
    "Use the alt-text and the detections only where the image agrees with them; name only what is "
    "actually there. Reply with the caption only."
)


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


_FIELD = re.compile(r"\{(alt_text|facts)\}")


def render_prompt(template: str, alt_text: str, facts: str) -> str:
    """Fill ``{alt_text}`` and ``{facts}`` in one pass over the template: braces (or a
    ``{facts}``) inside the alt-text are just text."""
    values = {"alt_text": alt_text or "(none)", "facts": facts or "(nothing detected)"}
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def prompt_inputs_digest(template: str, alt_text: str) -> str:
    """The per-image part of the cache key: what of the row goes into the prompt (the facts are a
    function of the image and the detector settings, already in the key)."""
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
