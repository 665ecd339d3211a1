"""Benchmarks: ``speed`` (plain diffusers vs the optimisation levels, ``dev bench``), ``serving``
(the service layer and a running server's JSON API), ``sr`` (x4 super-resolution timing), and
``finetune_concept`` (teaching the demo model a new colour or shape), ``aot`` (the ZeroGPU
ahead-of-time path on a GPU, ``dev bench --aot``) and ``paper_table1`` (the paper's
Table 1 layout: FID per domain through ``eval --data``). Figures go to ``benchmarks/README.md``.
"""
