"""``rapid-diffusion train`` and ``python -m rapid_diffusion.training.train``: flags (or a job's ``run.json``) -> a fine-tune.

Full fine-tuning (no LoRA) of a PAI-Diffusion pipeline on image-text pairs, with accelerate: the
UNet, the text encoder too by default (as in the PAI-Diffusion paper), the VAE frozen; prior
preservation on by default (``--prior-preservation``). ``--output DIR`` becomes the new model's
diffusers pipeline folder, with the run files and ``checkpoints/`` beside it
(:mod:`rapid_diffusion.training.run_files`), registered as a domain. The options are
:class:`rapid_diffusion.training.options.TrainConfig` (one schema: flags, job JSON and UI defaults);
the loop is :mod:`rapid_diffusion.training.trainer`. Runs under ``accelerate launch`` with any number
of processes. A ``STOP`` file in the run folder, or SIGTERM, saves a checkpoint and the model so far,
then ends. A full disk ends the run ``failed`` with partial files removed; ``--resume`` continues later.
"""

from __future__ import annotations

import argparse
import sys

from ..messages import say
from ..settings import settings
from .options import TrainConfig, TrainingError, add_arguments, config_from_args
from .publish import load_fp32_pipeline
from .run_files import comparison_lines, read_comparison
from .slot import training_slot
from .trainer import TrainResult, make_optimizer, train

__all__ = ["TrainConfig", "TrainingError", "TrainResult", "train", "main", "parse_args", "run", "make_optimizer", "load_fp32_pipeline"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="rapid-diffusion train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and ``--config run.json``) -> TrainConfig, like diffusers' training scripts."""
    return config_from_args(build_parser().parse_args(argv))


def run(config: TrainConfig) -> int:
    """Train, print the before/after figures and where the model went; exit status 0 done, 3 stopped, 1 failed.

    Every face trains through here (a web UI job's process, ``rapid-diffusion train``): one training per
    device (:mod:`.slot`), and the host's step limit (``RAPID_DIFFUSION_FINETUNE_MAX_STEPS``) applies.
    """
    config = within_step_limit(config)
    with training_slot():
        result = train(config)
    for line in comparison_lines(read_comparison(config.output)):
        print(line)
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
        print(f"domain: {result.domain_id}")
    return {"done": 0, "stopped": 3}.get(result.state, 1)


def within_step_limit(config: TrainConfig) -> TrainConfig:
    limit = settings().finetune_max_steps
    if not limit or config.max_steps <= limit:
        return config
    print(say("steps_capped", asked=config.max_steps, limit=limit))
    return config.model_copy(update={"max_steps": limit})


def main(argv: list[str] | None = None) -> int:
    from ..models.registry import ModelUnavailableError

    try:
        return run(parse_args(argv))
    except (TrainingError, ModelUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
