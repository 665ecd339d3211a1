"""Upscaling: x4 super-resolution after generation, as in the paper.

``esrgan`` holds the RRDBNet (ESRGAN / Real-ESRGAN) and SRVGGNetCompact networks without basicsr,
the loading of their checkpoint layouts (safetensors or ``weights_only``), downloads checked by
sha256, and tiled inference. It imports only the foundation modules (``domains``, ``paths``,
``settings``).
"""
