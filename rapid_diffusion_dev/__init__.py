"""Rapid Diffusion's development and research tools: benchmarks, the demo weights' recipes, the
knowledge-graph demo. Not part of the runtime package or the wheel: it lives only in a source
checkout, imports ``rapid_diffusion`` freely, and is never imported by it (``.importlinter``).
``rapid-diffusion dev ...`` reaches it through one plugin boundary: ``rapid_diffusion.serving.cli``
adds the ``dev`` command group (``cli.register``) only when this package is importable.
"""
