"""Models: where pipelines come from and where loaded ones live.

``registry`` is the lazy, bounded cache of loaded pipelines (the only global state) and puts a
domain's pieces together: the diffusers pipeline, its speed level (``speed``), its knowledge
(``knowledge``) and its super-resolution (``upscaling``); ``hub`` finds and downloads hub
snapshots; ``factory`` builds PAI-class pipelines in code (tests, benchmarks, the demo recipe).
It may import ``speed``, ``knowledge``, ``upscaling``, ``generation`` and the foundation modules;
never ``training``, ``service`` or a face.
"""
