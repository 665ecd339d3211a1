"""Speed: the optimisation levels and everything they need.

``levels`` applies a level to a loaded pipeline (``apply_optimization``: none, flash, compile,
openvino, auto, each fallback logged), ``attention`` the attention-dispatch processor, ``openvino``
the OpenVINO backend, ``compile_cache`` the caches of compiled artifacts that survive restarts,
``warmup`` the background thread that builds an optimised copy without blocking a user. It may
import ``generation`` (the warm-up decodes latents the way generation does) and the foundation
modules; never ``models``, ``service`` or a face.
"""
