"""Training: fine-tuning on a user's image-text pairs, and the jobs that run it.

``options`` is the one ``TrainConfig`` schema and its presets (no torch: the CLI and the web UI
read it cheaply), ``data`` the pair checker (folders, zips, TSV; its report and limits in ``pairs``, caption decoding in ``text``), ``train`` the entry point
(``python -m rapid_diffusion.training.train``: flags or a job's ``run.json``), ``trainer`` the one
diffusion training loop (accelerate), over its pieces: ``dataset`` (pairs as batches, the held-out
split), ``preflight`` (memory), ``checkpoints`` (checkpoints, stop requests, resume, failure),
``validation`` (rendering, the fixed-noise loss), ``prior`` (prior preservation's pairs),
``comparison`` (the before/after figures), ``publish`` (the base resolved, the result saved and
registered); ``core`` the pieces every training loop shares (the denoising loss, EMA, schedules),
``jobs`` the background training processes, ``run_files`` the run-folder protocol (no torch). It may
import ``evaluation`` (the CLIP score of the before/after figures), ``models`` (to resolve a base
model) and everything below; never ``service`` or a face.
"""
