"""``python -m operators.recaption DIR``: (re)write the dry run's tiny captioner."""

import sys

from operators.recaption.captioners import write_tiny_captioner

print(write_tiny_captioner(sys.argv[1] if len(sys.argv) > 1 else "configs/models/imgcurate-tiny-captioner"))
