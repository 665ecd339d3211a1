"""``rapid-diffusion`` command line: the contract other tools and the tests rely on.

Parsers are built here without importing torch; each command imports what it needs when
it runs, so ``rapid-diffusion domains`` answers at once. The ``dev`` group (benchmarks, the demo
weights' recipes, the knowledge-graph demo) is the one plugin boundary: see :func:`add_dev_commands`.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from ..training.options import add_arguments as add_train_arguments
from .cli_common import CLIError, FLAG_NAMES, add_model_arguments, add_sampling_arguments, open_service
from .cli_eval import add_eval_command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose and not getattr(args, "light", False):
        quiet_libraries()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Keep library progress bars and advisories off the user's terminal."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapid-diffusion", description="Fast domain-specific Chinese text-to-image.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and download progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("domains", help="list the domains, one per line, id first")
    p.set_defaults(handler=cmd_domains, light=True)

    p = sub.add_parser("generate", help="generate images into a folder")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    add_sampling_arguments(p)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--super-resolution", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("predict", help="EasyNLP predict mode: TSV of idx<TAB>text -> idx<TAB>text<TAB>imgbase64")
    add_model_arguments(p)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    add_sampling_arguments(p)
    p.add_argument("--sampler", default=None)
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("upscale", help="x4 ESRGAN super-resolution of one image")
    p.add_argument("--weights", type=Path, required=True, help="ESRGAN / Real-ESRGAN checkpoint (.pth or .safetensors)")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tile", type=int, default=256, help="tile side in input pixels (0: no tiling)")
    p.add_argument("--tile-pad", type=int, default=16, help="overlap around each tile, input pixels")
    p.set_defaults(handler=cmd_upscale)

    p = sub.add_parser("kg", help="knowledge graph: train TransE embeddings, attach knowledge to a model")
    kg = p.add_subparsers(dest="kg_command", required=True)
    p = kg.add_parser("train", help="train TransE on a graph (triples.tsv + entities.tsv) -> safetensors")
    p.add_argument("--graph", type=Path, required=True, help="graph folder or triples file")
    p.add_argument("--out", type=Path, required=True, help="embeddings file (.safetensors)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin", type=float, default=1.0)
    p.add_argument("--norm", type=int, choices=(1, 2), default=1, help="L1 or L2 distance")
    p.set_defaults(handler=cmd_kg_train)
    p = kg.add_parser("attach", help="write <model>/knowledge/ (graph, embeddings, zero projection)")
    p.add_argument("--model", type=Path, required=True, help="a diffusers pipeline folder")
    p.add_argument("--graph", type=Path, required=True)
    p.add_argument("--embeddings", type=Path, required=True, help="file written by `kg train`")
    p.set_defaults(handler=cmd_kg_attach)
    p = sub.add_parser("serve", help="web UI + JSON API (/api/predict/{domain}, /healthz) on one server")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (0.0.0.0 on Hugging Face Spaces)")
    p.add_argument("--port", type=int, default=None, help="default $GRADIO_SERVER_PORT, else $PORT, else 7860")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("hash-password", help="print the hash of the owner's password for RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH "
                       "(asked twice on a terminal; else read from stdin's first line)")
    p.set_defaults(handler=cmd_hash_password, light=True)

    p = sub.add_parser("check-data", help="check image-text pairs (folder, zip, TSV) and name each rejected item")
    p.add_argument("path", type=Path, help="a folder or zip (metadata.jsonl or .txt captions), or an EasyNLP TSV")
    p.set_defaults(handler=cmd_check_data, light=True)

    p = sub.add_parser("import", help="turn a model (a diffusers folder or a zip the Models tab exported, an EasyNLP fine-tune folder, "
                       "a single-file SD checkpoint) into a registered domain")
    p.add_argument("path", type=Path, help="a diffusers folder or a zip of one, an EasyNLP/CompVis folder (config.json + pytorch_model.bin ...) "
                   "or a .safetensors/.ckpt file")
    p.add_argument("--name", required=True, help="id of the new domain (lowercase letters, digits, - and _)")
    p.add_argument("--config", default=None,
                   help="for a single file: a diffusers model folder of the same architecture, or a domain id, giving configs and vocabulary")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("train", help="full fine-tune (UNet + text encoder) on image-text pairs; --output is the new model's folder")
    add_train_arguments(p)
    p.set_defaults(handler=cmd_train)

    add_eval_command(sub)
    add_dev_commands(sub)
    return parser


def add_dev_commands(sub) -> None:
    """The ``dev`` command group, from ``rapid_diffusion_dev``, when that package is importable.

    The one plugin boundary between the product and its development tools: ``rapid_diffusion``
    never imports ``rapid_diffusion_dev`` statically (``.importlinter``), and the wheel does not
    contain it, so an installed product lists only its own commands; a source checkout (the
    checkout's root on the import path) adds ``dev``.
    """
    if importlib.util.find_spec("rapid_diffusion_dev") is None:
        return
    importlib.import_module("rapid_diffusion_dev.cli").register(sub)


def cmd_domains(args) -> int:
    """Valid domains to stdout; each skipped file is logged to stderr. Fails only when none is valid."""
    from ..domains import load_domains

    specs = load_domains()
    for spec in specs.values():
        print(f"{spec.id}\t{spec.title_zh} / {spec.title_en}\t{spec.model.describe()}")
    if not specs:
        raise CLIError("没有可用的域 / no valid domain")
    return 0


def cmd_generate(args) -> int:
    from ..service.app import UserFacingError
    from ..service.inputs import request_from_inputs

    service, spec = open_service(args)
    request = request_from_inputs(
        args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        seed=args.seed, num_images=args.num_images, size=None if args.width is None and args.height is None else (
            args.width or spec.width, args.height or spec.height),
        sampler=args.sampler, super_resolution=args.super_resolution,
    )
    try:
        result = service.generate(request, spec, field_names=FLAG_NAMES)
    except UserFacingError as exc:
        raise CLIError(exc.message) from exc
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for path in result.save(args.out):
        print(path)
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"seeds {result.seeds}; {timings}", file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    """Load the model once, then one output row per image; bad rows are reported and skipped."""
    from ..service.app import UserFacingError
    from ..service.inputs import request_from_inputs

    if not args.input.is_file():
        raise CLIError(f"input file {args.input} does not exist")
    service, spec = open_service(args)
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
            request = request_from_inputs(
                text, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                num_images=args.num_images, sampler=args.sampler,
            )
            try:
                result = service.generate(request, spec, field_names=FLAG_NAMES)
            except UserFacingError as exc:
                print(f"row {number} (idx {idx}): {exc.message}; skipped", file=sys.stderr)
                bad += 1
                continue
            for i in range(len(result.images)):
                out.write(f"{idx}\t{text}\t{base64.b64encode(result.png_bytes(i)).decode('ascii')}\n")
                written += 1
    print(f"wrote {written} images to {args.output}; {bad} bad rows skipped", file=sys.stderr)
    return 0 if written or not bad else 1


def cmd_upscale(args) -> int:
    import time

    from ..models.registry import pick_device
    from ..upscaling.esrgan import SRWeightsUnavailable, UnknownCheckpointError, Upscaler, load_sr_model, open_image

    if not args.weights.is_file():
        raise CLIError(f"weights file {args.weights} does not exist")
    try:
        image = open_image(args.input)
        model = load_sr_model(args.weights)
    except (OSError, ValueError, SRWeightsUnavailable, UnknownCheckpointError) as exc:
        raise CLIError(str(exc)) from exc
    device, dtype = pick_device()
    upscaler = Upscaler(model, device, dtype, tile=args.tile or None, tile_pad=args.tile_pad)
    start = time.perf_counter()
    (result,), _ = upscaler([image])
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.save(args.out)
    print(args.out)
    print(f"{upscaler.description} on {device}: {image.width}x{image.height} -> {result.width}x{result.height} in {seconds:.2f}s", file=sys.stderr)
    return 0


def cmd_kg_train(args) -> int:
    import time

    from ..knowledge import EntityEmbeddings, GraphError, KnowledgeGraph, TransEConfig, evaluate_link_prediction, train_transe

    try:
        graph = KnowledgeGraph.load(args.graph)
    except GraphError as exc:
        raise CLIError(str(exc)) from exc
    config = TransEConfig(dim=args.dim, epochs=args.epochs, seed=args.seed, margin=args.margin, p_norm=args.norm)
    start = time.perf_counter()
    model, loss = train_transe(graph, config, log=(lambda m: print(m, file=sys.stderr)) if args.verbose else None)
    seconds = time.perf_counter() - start
    triples = graph.index_triples()
    quality = evaluate_link_prediction(model, triples, set(triples))
    EntityEmbeddings.from_model(model, graph).save(args.out)
    print(args.out)
    print(
        f"{len(graph.entities)} entities, {len(graph.relations)} relations, {len(triples)} triples; "
        f"{config.epochs} epochs in {seconds:.1f}s, loss {loss:.4f}; link prediction on the graph: "
        f"mean rank {quality.mean_rank:.2f} (chance {quality.chance_mean_rank:.1f}), "
        f"hits@1 {quality.hits_at_1:.2f}, hits@10 {quality.hits_at_10:.2f}",
        file=sys.stderr,
    )
    return 0


def cmd_kg_attach(args) -> int:
    import json

    from ..knowledge import KNOWLEDGE_DIR, EntityEmbeddings, GraphError, Knowledge, KnowledgeGraph

    config_file = args.model / "text_encoder" / "config.json"
    if not config_file.is_file():
        raise CLIError(f"{args.model} is not a diffusers pipeline folder (no text_encoder/config.json)")
    try:
        graph = KnowledgeGraph.load(args.graph)
        embeddings = EntityEmbeddings.load(args.embeddings)
    except (GraphError, OSError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    hidden_size = json.loads(config_file.read_text(encoding="utf-8"))["hidden_size"]
    folder = Knowledge.create(graph, embeddings, hidden_size).save(args.model / KNOWLEDGE_DIR)
    print(folder)
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    serve(host=args.host, port=args.port)
    return 0


def cmd_hash_password(args) -> int:
    """The owner's password as a salted hash: the server then never holds the password itself."""
    import getpass

    from ..access import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("密码 / password: ")
        if getpass.getpass("再输入一次 / again: ") != password:
            raise CLIError("两次输入不一致 / the two entries differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise CLIError("密码至少 8 个字符 / the password needs at least 8 characters")
    print(f"RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH={hash_password(password)}")
    return 0


def cmd_check_data(args) -> int:
    from ..training.data import check_path

    report = check_path(args.path)
    for line in report.lines():
        print(line)
    return 0 if report.usable else 1


def cmd_import(args) -> int:
    """Progress on stderr; the new model's folder and domain on stdout, like ``train``. The Models tab's import path."""
    from ..models.checkpoints import ImportFailed
    from ..service.models import import_any

    try:
        result = import_any(args.path, args.name, config=args.config, log=lambda line: print(line, file=sys.stderr))
    except ImportFailed as exc:
        raise CLIError(str(exc)) from exc
    print(f"model: {result.model_dir}")
    print(f"domain: {result.domain_id}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_train(args) -> int:
    """``train``'s flags are generated from TrainConfig (training.options); the trainer's own ``run`` does the rest."""
    from ..models.registry import ModelUnavailableError
    from ..training.train import run
    from ..training.options import TrainingError, config_from_args

    try:
        return run(config_from_args(args))
    except (TrainingError, ModelUnavailableError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
