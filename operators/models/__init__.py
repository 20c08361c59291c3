"""Model code the stages use, apart from the stages themselves (operators/*.py).

``common``: what every model stage shares (seeded random weights, device, decode to RGB).
"""
