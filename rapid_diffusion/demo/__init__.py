"""The embedded demo domain: a procedural captioned world, its adherence judge, and a small
PAI-class model trained on it (``assets/demo-model``, domain ``demo``).

``world`` and ``judge`` need only numpy and Pillow; ``train_demo`` and ``evaluate`` import torch.
"""
