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

from .demo import world
from .train_options import add_arguments as add_train_arguments


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


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


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

    p = sub.add_parser("upscale", help="x4 ESRGAN super-resolution of one image")
    p.add_argument("--weights", type=Path, required=True, help="ESRGAN / Real-ESRGAN checkpoint (.pth or .safetensors)")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tile", type=int, default=256, help="tile side in input pixels (0: no tiling)")
    p.add_argument("--tile-pad", type=int, default=16, help="overlap around each tile, input pixels")
    p.set_defaults(handler=cmd_upscale)

    p = sub.add_parser("train-sr", help="train the demo domain's compact SR model on its world (64->256)")
    p.add_argument("--out", type=Path, default=Path("assets/demo-sr.safetensors"), help="safetensors file to write")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps, batch 16 of 32x32 LR crops")
    p.add_argument("--seed", type=int, default=0, help="seeds the world scenes, crops and initialisation")
    p.add_argument("--features", type=int, default=32, help="SRVGGNetCompact channels")
    p.add_argument("--convs", type=int, default=8, help="SRVGGNetCompact hidden convs")
    p.set_defaults(handler=cmd_train_sr)

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
    p = kg.add_parser("demo-eval", help="colour/shape accuracy on the demo graph's entities, with and without knowledge")
    _add_model_arguments(p)
    p.add_argument("--graph", type=Path, default=None, help="default: assets/demo-kg")
    p.add_argument("--split", choices=("graph_only", "train"), default="graph_only")
    p.add_argument("--seeds", type=int, default=4, help="images per entity (seeds 0..N-1)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    p.set_defaults(handler=cmd_kg_demo_eval)
    p = kg.add_parser("demo-finetune", help="fine-tune the demo model on entity captions with knowledge injection")
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned pipeline")
    p.add_argument("--base", type=Path, default=None, help="default: assets/demo-model")
    p.add_argument("--domain-id", default="demo-kg")
    p.add_argument("--no-knowledge", action="store_true", help="the control run: same captions, no injection")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(handler=cmd_kg_demo_finetune)

    p = sub.add_parser("serve", help="web UI + JSON API (/api/predict/{domain}, /healthz) on one server")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (0.0.0.0 on Hugging Face Spaces)")
    p.add_argument("--port", type=int, default=None, help="default $PORT, $GRADIO_SERVER_PORT or 7860")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("check-data", help="check image-text pairs (folder, zip, TSV) and name each rejected item")
    p.add_argument("path", type=Path, help="a folder or zip (metadata.jsonl or .txt captions), or an EasyNLP TSV")
    p.set_defaults(handler=cmd_check_data, light=True)

    p = sub.add_parser("import", help="turn an EasyNLP fine-tune folder or a single-file SD checkpoint into a registered domain")
    p.add_argument("path", type=Path, help="an EasyNLP/CompVis folder (config.json + pytorch_model.bin ...) or a .safetensors/.ckpt file")
    p.add_argument("--name", required=True, help="id of the new domain (lowercase letters, digits, - and _)")
    p.add_argument("--config", default=None,
                   help="for a single file: a diffusers model folder of the same architecture, or a domain id, giving configs and vocabulary")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("train", help="full fine-tune (UNet + text encoder) on image-text pairs; --output is the new model's folder")
    add_train_arguments(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("train-demo", help="train the embedded demo model from scratch on the procedural world (CPU)")
    p.add_argument("--out", type=Path, default=None, help="pipeline folder (default: assets/demo-model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--vae-edge-weight", type=float, default=None, help="extra VAE loss weight on outline pixels (0: recipe v3)")
    p.add_argument("--object-weight", type=float, default=None, help="diffusion loss weight on and around objects (1: recipe v4)")
    p.add_argument("--steps", type=int, default=None, help="diffusion (UNet + text encoder) steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="diffusion learning rate (peak of the cosine schedule)")
    p.add_argument("--schedule-steps", type=int, default=None, help="length of the cosine schedule; --steps may stop before its end (0: same as --steps)")
    p.add_argument("--num-scenes", type=int, default=None, help="pre-rendered training scenes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the machine's cores, at most 2; 1 can be faster where other jobs load the cores)")
    p.add_argument("--init-from", type=Path, default=None, help="continue training this pipeline folder (keeps its VAE)")
    p.add_argument("--vae-from", type=Path, default=None, help="keep this pipeline folder's VAE; train the UNet and text encoder from scratch")
    p.set_defaults(handler=cmd_train_demo)

    p = sub.add_parser("eval", help="prompt adherence on the demo world's test split (or another set): JSON report + contact sheet")
    _add_model_arguments(p)
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="folder for report.json and contact_sheet.png")
    p.add_argument("--set", dest="eval_set", choices=world.EVAL_SETS, default="test",
                   help="test: the held-out test combinations; validation: for choosing steps and guidance; unseen: phrasings training never used")
    p.add_argument("--num-prompts", type=int, default=None, help="default: every prompt of the set")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the domain's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the domain's)")
    p.add_argument("--images-per-prompt", type=int, default=3, help="images drawn (and judged) per prompt, each with its own seed")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("bench", help="plain diffusers vs the optimisation levels: per-stage timings, memory, speedup")
    p.add_argument("--model", default="demo", help="demo | sd15-random | tiny-random | a pipeline folder")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--runs", type=int, default=3, help="timed runs per level (after one untimed run)")
    p.add_argument("--levels", default=None, help="comma-separated among none, flash, compile, openvino, auto, openvino-bf16; "
                   "'none' (plain diffusers) always runs (default: none,flash,compile, plus openvino and auto when installed; "
                   "--shapes: none,auto; --restart: auto)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--sr", default=None, help="add x4 super-resolution to every run: rrdb23 (the paper's 23-block ESRGAN, random weights) or a checkpoint path")
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shapes", action="store_true", help="first-call vs steady latency for 1..4 images at 64x64 and 128x128")
    mode.add_argument("--restart", action="store_true", help="setup time in fresh processes: empty cache vs the cache left by the first")
    mode.add_argument("--concurrency", type=int, default=None, metavar="N",
                      help="N clients through the service layer on --domain, batching off and on: images/s, p50/p95")
    mode.add_argument("--api", action="store_true", help="steady latency through a running server's JSON API: --domain vs a plain copy")
    p.add_argument("--domain", default="demo", help="--concurrency / --api: the domain served")
    p.set_defaults(handler=cmd_bench)

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
    """Valid domains to stdout; each skipped file is logged to stderr. Fails only when none is valid."""
    from .domains import load_domains

    specs = load_domains()
    for spec in specs.values():
        print(f"{spec.id}\t{spec.title_zh} / {spec.title_en}\t{spec.model.describe()}")
    if not specs:
        raise CLIError("没有可用的域 / no valid domain")
    return 0


def open_service(args):
    """The service and the domain spec named by ``--domain`` or ``--model`` (its model loaded)."""
    from .registry import ModelRegistry
    from .service import AppService, UserFacingError

    registry = ModelRegistry(progress=lambda message: print(message, file=sys.stderr), background_warmup=False)
    service = AppService(registry)
    try:
        if args.domain:
            spec = service.spec(args.domain)
            service.load(args.domain)
        else:
            spec = service.model_spec(args.model)
    except UserFacingError as exc:
        raise CLIError(exc.message) from exc
    return service, spec


def cmd_generate(args) -> int:
    from .pipeline import GenerationRequest
    from .service import UserFacingError

    service, spec = open_service(args)
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
        result = service.generate(request, spec)
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
    from .pipeline import GenerationRequest
    from .service import UserFacingError

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
            request = GenerationRequest(
                prompt=text,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                seed=args.seed,
                num_images=args.num_images,
                sampler=args.sampler,
            )
            try:
                result = service.generate(request, spec)
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

    from .registry import pick_device
    from .upscale import SRWeightsUnavailable, UnknownCheckpointError, Upscaler, load_sr_model, open_image

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


def cmd_train_sr(args) -> int:
    from .demo.train_sr import SRTrainConfig, train_sr

    train_sr(SRTrainConfig(out=args.out, steps=args.steps, seed=args.seed, num_feat=args.features, num_conv=args.convs))
    return 0


def cmd_kg_train(args) -> int:
    import time

    from .knowledge import EntityEmbeddings, GraphError, KnowledgeGraph, TransEConfig, evaluate_link_prediction, train_transe

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

    from .knowledge import KNOWLEDGE_DIR, EntityEmbeddings, GraphError, Knowledge, KnowledgeGraph

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


def cmd_kg_demo_eval(args) -> int:
    import json
    from dataclasses import asdict

    from .knowledge import KnowledgeGraph
    from .knowledge.demo import DEMO_GRAPH, load_split, measure_entity_attributes
    from .pipeline import GenerationRequest, run_pipeline

    service, spec = open_service(args)
    model = service.registry.get(spec)
    graph_dir = args.graph or DEMO_GRAPH
    graph, entities = KnowledgeGraph.load(graph_dir), load_split(graph_dir)[args.split]

    def image_for(encoder):
        def image(prompt: str, seed: int):
            with model.lock:
                return run_pipeline(model.pipe, GenerationRequest(prompt=prompt, seed=seed), spec=spec, encode_prompt=encoder).images[0]

        return image

    seeds = list(range(args.seeds))
    report = {}
    encoders = [("without_knowledge", None)]
    if model.encode_prompt is not None:
        encoders.insert(0, ("with_knowledge", model.encode_prompt))
    for name, encoder in encoders:
        result = measure_entity_attributes(image_for(encoder), graph, entities, seeds)
        report[name] = asdict(result)
        print(f"{name}: colour {result.colour:.0%}, shape {result.shape:.0%}, both {result.both:.0%} "
              f"({len(entities)} {args.split} entities x {len(seeds)} seeds; chance 12% / 17% / 2%)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


def cmd_kg_demo_finetune(args) -> int:
    from .knowledge.finetune_demo import DemoFinetuneConfig, finetune_demo

    config = DemoFinetuneConfig(
        out=args.out, domain_id=args.domain_id, with_knowledge=not args.no_knowledge,
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
    )
    if args.base is not None:
        config.base = args.base
    if not (config.base / "model_index.json").is_file():
        raise CLIError(f"{config.base} is not a pipeline folder; train the demo model first (rapid-diffusion train-demo)")
    print(finetune_demo(config, log=lambda message: print(message, file=sys.stderr)))
    print(f"domain: {config.domain_id}")
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    serve(host=args.host, port=args.port)
    return 0


def cmd_check_data(args) -> int:
    from .data import check_path

    report = check_path(args.path)
    for line in report.lines():
        print(line)
    return 0 if report.usable else 1


def cmd_import(args) -> int:
    """Progress on stderr; the new model's folder and domain on stdout, like ``train``."""
    from .models.importing import ImportFailed, import_checkpoint

    try:
        result = import_checkpoint(args.path, args.name, config=args.config, log=lambda line: print(line, file=sys.stderr))
    except ImportFailed as exc:
        raise CLIError(str(exc)) from exc
    print(f"model: {result.model_dir}")
    print(f"domain: {result.domain_id}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_train(args) -> int:
    """``train``'s flags are generated from TrainConfig (train_options); the trainer's own ``run`` does the rest."""
    from .registry import ModelUnavailableError
    from .train import run
    from .train_options import TrainingError, config_from_args

    try:
        return run(config_from_args(args))
    except (TrainingError, ModelUnavailableError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def cmd_train_demo(args) -> int:
    from dataclasses import replace

    from .demo.train_demo import TrainConfig, train_demo

    overrides = {
        "out": args.out,
        "vae_steps": args.vae_steps,
        "vae_edge_weight": args.vae_edge_weight,
        "object_weight": args.object_weight,
        "unet_steps": args.steps,
        "schedule_steps": args.schedule_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "num_scenes": args.num_scenes,
        "threads": args.threads,
        "init_from": args.init_from,
        "vae_from": args.vae_from,
    }
    config = replace(TrainConfig(seed=args.seed), **{k: v for k, v in overrides.items() if v is not None})
    print(f"model: {train_demo(config, log=lambda line: print(line, flush=True))}")
    return 0


def cmd_eval(args) -> int:
    from .demo.evaluate import evaluate

    service, spec = open_service(args)
    report = evaluate(spec, service.registry, out=args.out, num_prompts=args.num_prompts, steps=args.steps, guidance=args.guidance,
                      seed=args.seed, images_per_prompt=args.images_per_prompt, eval_set=args.eval_set)
    print(f"{report['num_images']} images ({report['num_prompts']} {args.eval_set} prompts x {report['images_per_prompt']})")
    print(", ".join(f"{k} {v:.1%}" for k, v in report["accuracy"].items()))
    print(f"VAE round trip on off-palette colours: mean error {report['vae_colour_error']:.1f} / 255 (median over objects)")
    print(f"report: {args.out / 'report.json'}")
    print(f"contact sheet: {args.out / 'contact_sheet.png'}")
    return 0


def cmd_bench(args) -> int:
    import json

    from . import bench

    levels = bench_levels(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = bench.BenchConfig(
        model=args.model, device=args.device, steps=args.steps, height=args.height, width=args.width,
        runs=args.runs, levels=levels, guidance_scale=args.guidance, sr=args.sr,
    )
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        if args.shapes:
            result = bench.run_shapes(config, log=log)
            print(bench.shapes_table(result))
        elif args.restart:
            result = bench.run_restart(config, log=log, threads=args.threads)
            print(bench.restart_table(result))
        elif args.concurrency:
            from .bench_serving import concurrency_table, run_concurrency

            result = run_concurrency(args.domain, levels[-1], args.concurrency, args.runs, log=log)
            print(concurrency_table(result))
        elif args.api:
            from .bench_serving import run_api_latency

            result = run_api_latency(args.domain, args.runs, log=log)
            print(json.dumps(result["latency_s"], indent=1), f"\nplain / accelerated {result['plain_over_accelerated']:.2f}x")
        else:
            result = bench.run_bench(config, log=log)
            print_bench_tables(result)
    except (RuntimeError, ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def bench_levels(args) -> tuple[str, ...]:
    """``--levels``, or the mode's default (the OpenVINO column only where OpenVINO is installed)."""
    from .bench import BENCH_LEVELS
    from .openvino_backend import openvino_missing

    if args.levels is None:
        if args.shapes:
            return ("none", "auto")
        if args.restart or args.concurrency or args.api:
            return ("auto",)
        with_openvino = openvino_missing(args.device) is None
        return ("none", "flash", "compile", *(("openvino", "auto") if with_openvino else ("auto",)))
    levels = tuple(level.strip() for level in args.levels.split(",") if level.strip())
    unknown = [level for level in levels if level not in BENCH_LEVELS]
    if unknown:
        raise CLIError(f"--levels: unknown {', '.join(unknown)}; known: {', '.join(BENCH_LEVELS)}")
    return levels


def print_bench_tables(result: dict) -> None:
    from .bench import markdown_table, padding_table, profile_table

    print(markdown_table(result))
    print()
    print(profile_table(result))
    print()
    print(padding_table(result))
    print(f"\nspeedup {result['speedup']:.2f}x ({result['best_level']} vs plain diffusers), model {result['model']}")
