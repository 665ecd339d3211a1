"""``rapid-diffusion`` command line: the contract other tools and the tests rely on.

Parsers are built here without importing torch; each command imports what it needs when
it runs, so ``rapid-diffusion domains`` answers at once.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        quiet_libraries()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def quiet_libraries() -> None:
    """Keep library progress bars and advisories off the user's terminal."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapid-diffusion", description="Fast domain-specific Chinese text-to-image.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and download progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("domains", help="list the domains, one per line, id first")
    p.set_defaults(handler=cmd_domains)

    p = sub.add_parser("generate", help="generate images into a folder")
    _add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    _add_sampling_arguments(p)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--super-resolution", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("predict", help="EasyNLP predict mode: TSV of idx<TAB>text -> idx<TAB>text<TAB>imgbase64")
    _add_model_arguments(p)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    _add_sampling_arguments(p)
    p.add_argument("--sampler", default=None)
    p.set_defaults(handler=cmd_predict)

    return parser


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--domain", help="a domain id (see `rapid-diffusion domains`)")
    group.add_argument("--model", help="a diffusers Stable Diffusion folder or hub id (owner/name[@revision])")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the domain's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the domain's)")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed+i (default: random)")
    p.add_argument("--num-images", type=int, default=1)


def cmd_domains(args) -> int:
    from .domains import DomainSpecError, load_domains

    try:
        specs = load_domains()
    except DomainSpecError as exc:
        raise CLIError(str(exc)) from exc
    for spec in specs.values():
        print(f"{spec.id}\t{spec.title_zh} / {spec.title_en}\t{spec.model.describe()}")
    return 0


def resolve_spec(args):
    """The domain spec and loaded model named by ``--domain`` or ``--model``."""
    from dataclasses import replace

    from .domains import DomainSpecError, ModelSource
    from .registry import ModelUnavailableError, adhoc_spec, default_registry, native_size

    registry = default_registry()
    try:
        if args.domain:
            spec = registry.spec(args.domain)
            registry.get(spec)
            return spec, registry
        spec = adhoc_spec(ModelSource.parse(args.model))
        model = registry.get(spec)
        side = native_size(model.pipe)
        return replace(spec, height=side, width=side), registry
    except (KeyError, ValueError, DomainSpecError, ModelUnavailableError) as exc:
        raise CLIError(exc.args[0] if exc.args else str(exc)) from exc


def cmd_generate(args) -> int:
    from .pipeline import GenerationRequest, RequestError, generate

    spec, registry = resolve_spec(args)
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        sampler=args.sampler,
        super_resolution=args.super_resolution,
    )
    try:
        result = generate(request, spec, registry=registry)
    except RequestError as exc:
        raise CLIError(str(exc)) from exc
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for path in result.save(args.out):
        print(path)
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"seeds {result.seeds}; {timings}", file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    """Load the model once, then one output row per image; bad rows are reported and skipped."""
    from .pipeline import GenerationRequest, RequestError, generate

    if not args.input.is_file():
        raise CLIError(f"input file {args.input} does not exist")
    spec, registry = resolve_spec(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    written = bad = 0
    with args.input.open(encoding="utf-8", errors="replace") as rows, args.output.open("w", encoding="utf-8") as out:
        for number, line in enumerate(rows, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0].strip():
                print(f"row {number}: expected 'idx<TAB>text', got {line[:60]!r}; skipped", file=sys.stderr)
                bad += 1
                continue
            idx, text = parts[0].strip(), parts[1].strip()
            request = GenerationRequest(
                prompt=text,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                seed=args.seed,
                num_images=args.num_images,
                sampler=args.sampler,
            )
            try:
                result = generate(request, spec, registry=registry)
            except RequestError as exc:
                print(f"row {number} (idx {idx}): {exc}; skipped", file=sys.stderr)
                bad += 1
                continue
            for i in range(len(result.images)):
                out.write(f"{idx}\t{text}\t{base64.b64encode(result.png_bytes(i)).decode('ascii')}\n")
                written += 1
    print(f"wrote {written} images to {args.output}; {bad} bad rows skipped", file=sys.stderr)
    return 0 if written or not bad else 1
