"""Models: where pipelines come from and where loaded ones live.

``registry`` is the lazy, bounded cache of loaded pipelines (the only global state) and puts a
domain's pieces together: the diffusers pipeline, its speed level (``speed``), its knowledge
(``knowledge``) and its super-resolution (``upscaling``); ``hub`` finds and downloads hub
snapshots; ``factory`` builds PAI-class pipelines in code (tests, benchmarks, the demo recipe);
``importing`` turns checkpoints people already have (EasyNLP folders, single-file SD
checkpoints) into diffusers folders registered as domains (``checkpoints``, ``ldm``, ``wukong``,
``easynlp``, ``single_file``, ``sr_weights`` hold its pieces; ``conditioning`` the prompt encoding an
imported model asks for).
It may import ``speed``, ``knowledge``, ``upscaling``, ``generation`` and the foundation modules;
never ``training``, ``service`` or a face.
"""
