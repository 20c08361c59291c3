"""``python -m operators.recaption [DIR]``: (re)write the dry run's tiny models (config and processor
files, no weights): the captioner, and Image Textualization's detector and rewriter next to it."""

import os
import sys

from operators.recaption.captioners import write_tiny_captioner
from operators.recaption.detectors import write_tiny_detector
from operators.recaption.rewriters import write_tiny_rewriter

root = sys.argv[1] if len(sys.argv) > 1 else "configs/models"
for name, write in (("imgcurate-tiny-captioner", write_tiny_captioner), ("imgcurate-tiny-owlvit", write_tiny_detector),
                    ("imgcurate-tiny-rewriter", write_tiny_rewriter)):
    print(write(os.path.join(root, name)))
