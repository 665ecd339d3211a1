"""What the ``rapid-diffusion`` commands share: the one-line error, the model and sampling flags, the service.

``cli`` builds the one parser; ``cli_eval`` adds the ``eval`` command; both take these from here.
"""

from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--domain", help="a domain id (see `rapid-diffusion domains`)")
    group.add_argument("--model", help="a diffusers Stable Diffusion folder or hub id (owner/name[@revision])")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the domain's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the domain's)")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed+i (default: random)")
    p.add_argument("--num-images", type=int, default=1)


def open_service(args):
    """The service and the domain spec named by ``--domain`` or ``--model`` (its model loaded)."""
    from ..models.registry import ModelRegistry
    from ..service.app import AppService, UserFacingError

    registry = ModelRegistry(progress=lambda message: print(message, file=sys.stderr), background_warmup=False)
    service = AppService(registry)
    try:
        if args.domain:
            spec = service.spec(args.domain)
            service.models.load(args.domain)
        else:
            spec = service.model_spec(args.model)
    except UserFacingError as exc:
        raise CLIError(exc.message) from exc
    return service, spec


# A refusal names the flag the user typed.
FLAG_NAMES = {
    field: (flag, flag) for field, flag in {
        "prompt": "--prompt", "negative_prompt": "--negative-prompt", "num_inference_steps": "--steps",
        "guidance_scale": "--guidance", "seed": "--seed", "num_images": "--num-images", "height": "--height",
        "width": "--width", "sampler": "--sampler", "super_resolution": "--super-resolution",
    }.items()
}
