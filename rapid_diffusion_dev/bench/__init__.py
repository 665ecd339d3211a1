"""Benchmarks: ``speed`` (plain diffusers vs the optimisation levels, ``dev bench``), ``serving``
(the service layer and a running server's JSON API), ``sr`` (x4 super-resolution timing), and
``finetune_concept`` (teaching the demo model a new colour or shape). Figures go to
``benchmarks/README.md``.
"""
