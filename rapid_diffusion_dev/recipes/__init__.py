"""Recipes of the shipped demo weights: ``train_demo`` (``rapid_diffusion/data/assets/demo-model``, ``dev train-demo``)
and ``train_sr`` (``rapid_diffusion/data/assets/demo-sr.safetensors``, ``dev train-sr``), both trained on the demo world.
"""
