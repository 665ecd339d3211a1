"""``rapid-diffusion eval``: demo prompt adherence, or with ``--data`` FID, CLIP score and R@K against a test set.

One command of the one parser (``cli.build_parser`` calls :func:`add_eval_command`); it generates
through the service as the app does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..demo import world
from .cli_common import CLIError, FLAG_NAMES, add_model_arguments, open_service


def add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval", help="demo prompt adherence, or with --data: FID and Chinese CLIP score against a test set",
        description="Two modes. Without --data: prompt adherence on the demo world's test split (or another set), "
        "judged by the demo judge: report.json + contact_sheet.png. With --data: one image per caption of a test set "
        "(or --images-per-caption), generated as the app generates them with fixed seeds (image j of caption i: "
        "seed + i * images-per-caption + j), then FID against the real pictures (pytorch-fid's Inception features), "
        "the Chinese CLIP score of the images against their captions and, with --clip-model, text-to-image "
        "R@1/5/10 over the real pairs: report.json + images/.",
    )
    add_model_arguments(p)
    p.add_argument("--data", type=Path, default=None,
                   help="test pairs: an EasyNLP TSV (idx<TAB>text<TAB>imgbase64) or a folder / zip of images with captions "
                   "(metadata.jsonl or .txt beside each image); switches to FID / CLIP-score mode")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="folder for report.json (and the images)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the domain's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the domain's)")
    p.add_argument("--seed", type=int, default=0, help="the first image's seed; each further image takes the next")
    p.add_argument("--images-per-prompt", "--images-per-caption", dest="images_per_prompt", type=int, default=None,
                   help="images drawn per prompt or caption, each with its own seed (default: 3 for the demo eval, 1 with --data)")
    demo_mode = p.add_argument_group("demo adherence (without --data)")
    demo_mode.add_argument("--set", dest="eval_set", choices=world.EVAL_SETS, default=None,
                           help="test (default): the held-out test combinations; validation: for choosing steps and guidance; unseen: phrasings training never used")
    demo_mode.add_argument("--num-prompts", type=int, default=None, help="default: every prompt of the set")
    data_mode = p.add_argument_group("FID and CLIP score (with --data)")
    data_mode.add_argument("--sampler", default=None, help="default: the domain's")
    data_mode.add_argument("--super-resolution", action=argparse.BooleanOptionalAction, default=None,
                           help="x4 super-resolution of the generated images (default: the domain's); compare at the test pictures' size")
    data_mode.add_argument("--fid-weights", type=Path, default=None,
                           help="a local copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache, downloaded once)")
    data_mode.add_argument("--stand-in-features", action="store_true", default=None,
                           help="where the standard weights cannot be had: the same network with seeded random weights; "
                           "reported as fid_stand_in, never as FID, and not comparable with published figures")
    data_mode.add_argument("--clip-model", default=None,
                           help="Chinese CLIP model (hub id or local folder) for the CLIP score, and adds R@1/5/10 over the real pairs "
                           "(default for the score alone: OFA-Sys/chinese-clip-vit-base-patch16, downloaded once)")
    p.set_defaults(handler=cmd_eval)



EVAL_DATA_OPTIONS = {"sampler": "--sampler", "super_resolution": "--super-resolution", "fid_weights": "--fid-weights", "stand_in_features": "--stand-in-features", "clip_model": "--clip-model"}
EVAL_DEMO_OPTIONS = {"eval_set": "--set", "num_prompts": "--num-prompts"}


def cmd_eval(args) -> int:
    check_eval_mode(args)
    if args.data is not None:
        return cmd_eval_data(args)
    from ..demo.evaluate import evaluate

    eval_set = args.eval_set or "test"
    images_per_prompt = 3 if args.images_per_prompt is None else args.images_per_prompt
    service, spec = open_service(args)
    report = evaluate(spec, service.registry, out=args.out, num_prompts=args.num_prompts, steps=args.steps, guidance=args.guidance,
                      seed=args.seed, images_per_prompt=images_per_prompt, eval_set=eval_set)
    print(f"{report['num_images']} images ({report['num_prompts']} {eval_set} prompts x {report['images_per_prompt']})")
    print(", ".join(f"{k} {v:.1%}" for k, v in report["accuracy"].items()))
    print(f"VAE round trip on off-palette colours: mean error {report['vae_colour_error']:.1f} / 255 (median over objects)")
    print(f"report: {args.out / 'report.json'}")
    print(f"contact sheet: {args.out / 'contact_sheet.png'}")
    return 0


def check_eval_mode(args) -> None:
    """Refuse an option of the other mode rather than ignore it."""
    from ..messages import say

    if args.data is None:
        given = [flag for dest, flag in EVAL_DATA_OPTIONS.items() if getattr(args, dest) is not None]
        if given:
            raise CLIError(say("eval_needs_data", flags=", ".join(given)))
    else:
        given = [flag for dest, flag in EVAL_DEMO_OPTIONS.items() if getattr(args, dest) is not None]
        if given:
            raise CLIError(say("eval_demo_only", flags=", ".join(given)))


def cmd_eval_data(args) -> int:
    """FID / CLIP score / R@K of the model's images for a test set's captions (rapid_diffusion.evaluation).

    The metrics' weights are loaded first, so a missing one is reported before any image is generated.
    """
    from ..evaluation.run import evaluate_generation, load_metrics
    from ..messages import say

    pairs = read_eval_pairs(args.data)
    metrics = load_metrics(args.fid_weights, bool(args.stand_in_features), args.clip_model)
    for name, message in metrics.unavailable.items():
        print(f"{name}: {message}", file=sys.stderr)
    if not metrics.anything:
        raise CLIError(say("nothing_to_measure"))
    service, spec = open_service(args)
    sampling, generate = eval_generator(service, spec, args, len(pairs))
    report = evaluate_generation(pairs, generate, sampling, metrics, data=str(args.data), out=args.out)
    for line in report.summary_lines():
        print(line)
    print(f"report: {args.out / 'report.json'}")
    return 0


def read_eval_pairs(path: Path) -> list:
    """The usable pairs of a test set, read and checked by the fine-tuning data reader; skipped items on stderr."""
    from ..training.data import check_path
    from ..messages import say

    report = check_path(path)
    if report.issues or report.notes:
        print("\n".join(report.lines()), file=sys.stderr)
    if not report.pairs:
        raise CLIError(say("no_eval_pairs", path=path))
    return report.pairs


# eval --data's flags, and the test set's captions, as a refusal names them.
EVAL_FLAG_NAMES = {**FLAG_NAMES, "num_images": ("--images-per-caption",) * 2, "prompt": ("描述", "caption")}


def eval_generator(service, spec, args, captions: int):
    """The run's sampling settings (the domain's defaults filled in; validated up to the last caption's seeds,
    before anything is generated) and ``generate(caption, first_seed, count)`` through the service, as the app
    generates."""
    from dataclasses import replace

    from ..evaluation.report import Sampling
    from ..service.inputs import request_from_inputs
    from ..messages import say
    from ..generation.request import Limits, RequestError
    from ..service.app import UserFacingError

    per_caption = 1 if args.images_per_prompt is None else args.images_per_prompt
    request = request_from_inputs("-", num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                  num_images=per_caption, sampler=args.sampler, super_resolution=args.super_resolution)
    try:
        request = request.resolve(spec)
        replace(request, seed=request.seed + (captions - 1) * per_caption).validate(Limits.from_env())
    except RequestError as exc:
        name_zh, name_en = EVAL_FLAG_NAMES.get(exc.field, (exc.field, exc.field))
        raise CLIError(say("invalid_field", field_zh=name_zh, field_en=name_en, reason_zh=exc.reason_zh, reason_en=exc.reason)) from exc
    sampling = Sampling(
        model=f"{spec.id} ({spec.model.describe()})", seed=request.seed, steps=request.num_inference_steps,
        sampler=request.sampler, guidance=request.guidance_scale, width=request.width, height=request.height,
        negative_prompt=request.negative_prompt, super_resolution=request.super_resolution, images_per_caption=request.num_images,
    )

    def generate(caption: str, first_seed: int, count: int):
        request_i = replace(request, prompt=caption, seed=first_seed, num_images=count)
        try:
            return service.generate(request_i, spec, field_names=EVAL_FLAG_NAMES).images
        except UserFacingError as exc:
            raise CLIError(exc.message) from exc

    return sampling, generate
