"""Training: fine-tuning on a user's image-text pairs, and the jobs that run it.

``options`` is the one ``TrainConfig`` schema and its presets (no torch: the CLI and the web UI
read it cheaply), ``data`` the pair checker (folders, zips, TSV), ``train`` the accelerate
trainer (``python -m rapid_diffusion.training.train``), ``core`` the pieces every training loop
shares (tokenisation, the denoising loss, EMA, the domain-YAML writer), ``jobs`` the background
training processes, ``run_files`` the run-folder protocol (no torch). It may import ``models``
(to resolve a base model) and everything below it; never ``service`` or a face.
"""
