"""Model code the stages use, apart from the stages themselves (operators/*.py).

``common``: what every model stage shares (seeded random weights, device, decode to RGB).
``clip``: an open_clip model from a spec (``load_clip``) and its public encoders (``ClipModel``),
used by the CLIP stage, RIGID and the reward model's open_clip backbone.
``laion``: LAION's NSFW, aesthetic v2 and watermark models (module names of the released weights).
``reward``: the reward model's backbones (open_clip, BLIP), MLP head, checkpoints and pair scores.
"""
