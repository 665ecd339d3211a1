"""Recipes of the shipped demo weights: ``train_demo`` (``assets/demo-model``, ``dev train-demo``)
and ``train_sr`` (``assets/demo-sr.safetensors``, ``dev train-sr``), both trained on the demo world.
"""
