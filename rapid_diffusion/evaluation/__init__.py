"""Evaluation as the paper reports it: FID (pytorch-fid's Inception features) and Chinese CLIP score.

Depends on torch, numpy, Pillow, transformers, huggingface_hub and tqdm, and inside the package only on
``settings``, ``messages`` and ``paths``; generation comes in as a callable (see :mod:`.run`). Import the
submodules: :mod:`.inception` (the network), :mod:`.fid`, :mod:`.clip_score`, :mod:`.report`, :mod:`.run`.
"""
