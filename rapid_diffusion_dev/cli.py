"""``rapid-diffusion dev ...``: the commands of the development tools, added to the product's CLI.

:func:`register` is called by :func:`rapid_diffusion.serving.cli.add_dev_commands` when this package
is importable (a source checkout); nothing in ``rapid_diffusion`` names this module in an import
statement. Commands: ``dev bench`` (speed: plain diffusers vs the optimisation levels, the ZeroGPU
ahead-of-time path, and the serving benchmarks), ``dev train-demo`` and ``dev train-sr`` (the recipes of the shipped demo
weights), ``dev kg demo-eval | demo-finetune`` (the knowledge-graph demo). The product's
``kg train | attach`` stay in the product: they work on any user's graph and model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rapid_diffusion.serving.cli_common import CLIError, add_model_arguments, open_service


def register(sub) -> None:
    """Add the ``dev`` command group to the product's subcommands ``sub``."""
    p = sub.add_parser("dev", help="development tools (source checkout only): benchmarks, the demo weights' recipes, the knowledge-graph demo")
    dev = p.add_subparsers(dest="dev_command", required=True)

    p = dev.add_parser("bench", help="plain diffusers vs the optimisation levels: per-stage timings, memory, speedup")
    p.add_argument("--model", default="demo", help="demo | sd15-random | tiny-random | a pipeline folder")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--runs", type=int, default=3, help="timed runs per level (after one untimed run)")
    p.add_argument("--levels", default=None, help="comma-separated among none, flash, compile, openvino, openvino-int8, auto, openvino-bf16; "
                   "'none' (plain diffusers) always runs (default: none,flash,compile, plus openvino and auto when installed; "
                   "--shapes: none,auto; --restart: auto)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--sr", default=None, help="add x4 super-resolution to every run: rrdb23 (the paper's 23-block ESRGAN, random weights) or a checkpoint path")
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    p.add_argument("--max-images", type=int, default=1, help="images per request the warm-up covers (the server's default: 8)")
    p.add_argument("--one-at-a-time", action="store_true", help="each level in its own process: a server's peak memory "
                   "(load, conversion, warm-up, runs) per level, and SD1.5-size models that do not fit twice in memory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shapes", action="store_true", help="first-call vs steady latency for 1..4 images at 64x64 and 128x128")
    mode.add_argument("--restart", action="store_true", help="setup time in fresh processes: empty cache vs the cache left by the first")
    mode.add_argument("--aot", action="store_true", help="the ZeroGPU ahead-of-time path vs plain on a GPU (--device cuda; "
                      "--model sd15-random): compile time, first vs steady latency at every UI size, speed-up at 512x512, warnings")
    mode.add_argument("--concurrency", type=int, default=None, metavar="N",
                      help="N clients through the service layer on --domain, batching off and on: images/s, p50/p95")
    mode.add_argument("--api", action="store_true", help="steady latency through a running server's JSON API: --domain vs a plain copy")
    mode.add_argument("--load", type=lambda text: tuple(int(n) for n in text.split(",")), nargs="?", const=(1, 8, 16, 24, 64),
                      default=None, metavar="N,N,...", help="bursts of N simultaneous JSON requests against a server on its "
                      "default settings: served / refused (503) / latency p50, p95 (default 1,8,16,24,64)")
    p.add_argument("--domain", default="demo", help="--concurrency / --api / --load: the domain served")
    p.set_defaults(handler=cmd_bench)

    p = dev.add_parser("train-demo", help="train the embedded demo model from scratch on the procedural world (CPU)")
    p.add_argument("--out", type=Path, default=None, help="pipeline folder (default: the shipped rapid_diffusion/data/assets/demo-model)")
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
    p.add_argument("--vae-eval-scenes", type=int, default=None, help="VAE round trips judged after the VAE stage")
    p.add_argument("--validation-steps", type=int, default=None, help="sampler steps of the validation images")
    p.set_defaults(handler=cmd_train_demo)

    p = dev.add_parser("train-sr", help="train the demo domain's compact SR model on its world (64->256)")
    p.add_argument("--out", type=Path, default=Path("rapid_diffusion/data/assets/demo-sr.safetensors"), help="safetensors file to write")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps, batch 16 of 32x32 LR crops")
    p.add_argument("--seed", type=int, default=0, help="seeds the world scenes, crops and initialisation")
    p.add_argument("--features", type=int, default=32, help="SRVGGNetCompact channels")
    p.add_argument("--convs", type=int, default=8, help="SRVGGNetCompact hidden convs")
    p.set_defaults(handler=cmd_train_sr)

    p = dev.add_parser("kg", help="the knowledge-graph demo: fine-tune the demo model with injection, judge its entities")
    kg = p.add_subparsers(dest="kg_command", required=True)
    p = kg.add_parser("demo-eval", help="colour/shape accuracy on the demo graph's entities, with and without knowledge")
    add_model_arguments(p)
    p.add_argument("--graph", type=Path, default=None, help="default: rapid_diffusion/data/assets/demo-kg")
    p.add_argument("--split", choices=("graph_only", "train"), default="graph_only")
    p.add_argument("--seeds", type=int, default=4, help="images per entity (seeds 0..N-1)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    p.set_defaults(handler=cmd_kg_demo_eval)
    p = kg.add_parser("demo-finetune", help="fine-tune the demo model on entity captions with knowledge injection")
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned pipeline")
    p.add_argument("--base", type=Path, default=None, help="default: rapid_diffusion/data/assets/demo-model")
    p.add_argument("--domain-id", default="demo-kg")
    p.add_argument("--no-knowledge", action="store_true", help="the control run: same captions, no injection")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(handler=cmd_kg_demo_finetune)


def cmd_bench(args) -> int:
    import json

    from .bench import speed as bench

    levels = bench_levels(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = bench.BenchConfig(
        model=args.model, device=args.device, steps=args.steps, height=args.height, width=args.width,
        runs=args.runs, levels=levels, guidance_scale=args.guidance, sr=args.sr,
        max_images=args.max_images, one_at_a_time=args.one_at_a_time, padding_bench=not args.one_at_a_time,
    )
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        if args.shapes:
            result = bench.run_shapes(config, log=log)
            print(bench.shapes_table(result))
        elif args.aot:
            from .bench.aot import aot_table, run_aot

            result = run_aot(config, log=log)
            print(aot_table(result))
        elif args.restart:
            result = bench.run_restart(config, log=log, threads=args.threads)
            print(bench.restart_table(result))
        elif args.concurrency:
            from .bench.serving import concurrency_table, run_concurrency

            result = run_concurrency(args.domain, levels[-1], args.concurrency, args.runs, log=log)
            print(concurrency_table(result))
        elif args.load:
            from .bench.serving import load_table, run_load

            result = run_load(args.domain, args.load, log=log)
            print(load_table(result))
        elif args.api:
            from .bench.serving import run_api_latency

            result = run_api_latency(args.domain, args.runs, log=log)
            print(json.dumps(result["latency_s"], indent=1), f"\nplain / accelerated {result['plain_over_accelerated']:.2f}x")
            for row in result["image_counts"]:
                print(f"{row['images']} image(s): first {row['first_s']:.3f}s, steady {row['steady_s']:.3f}s, "
                      f"first / steady {row['first_over_steady']:.2f}")
        elif args.one_at_a_time:
            from .bench.one_at_a_time import run_one_at_a_time

            result = run_one_at_a_time(config, log=log, threads=args.threads)
            print_bench_tables(result)
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
    from rapid_diffusion.speed.openvino import openvino_missing

    from .bench.speed import BENCH_LEVELS

    if args.levels is None:
        if args.shapes:
            return ("none", "auto")
        if args.restart or args.concurrency or args.api or args.load:
            return ("auto",)
        with_openvino = openvino_missing(args.device) is None
        return ("none", "flash", "compile", *(("openvino", "auto") if with_openvino else ("auto",)))
    levels = tuple(level.strip() for level in args.levels.split(",") if level.strip())
    unknown = [level for level in levels if level not in BENCH_LEVELS]
    if unknown:
        raise CLIError(f"--levels: unknown {', '.join(unknown)}; known: {', '.join(BENCH_LEVELS)}")
    return levels


def print_bench_tables(result: dict) -> None:
    from .bench.speed import markdown_table, padding_table, profile_table

    print(markdown_table(result))
    print()
    print(profile_table(result))
    print()
    print(padding_table(result))
    print(f"\nspeedup {result['speedup']:.2f}x ({result['best_level']} vs plain diffusers), model {result['model']}")


def cmd_train_demo(args) -> int:
    from dataclasses import replace

    from .recipes.train_demo import DemoRecipeConfig, train_demo

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
        "vae_eval_scenes": args.vae_eval_scenes,
        "validation_steps": args.validation_steps,
    }
    config = replace(DemoRecipeConfig(seed=args.seed), **{k: v for k, v in overrides.items() if v is not None})
    print(f"model: {train_demo(config, log=lambda line: print(line, flush=True))}")
    return 0


def cmd_train_sr(args) -> int:
    from .recipes.train_sr import SRTrainConfig, train_sr

    train_sr(SRTrainConfig(out=args.out, steps=args.steps, seed=args.seed, num_feat=args.features, num_conv=args.convs))
    return 0


def cmd_kg_demo_eval(args) -> int:
    import json
    from dataclasses import asdict

    from rapid_diffusion.generation.pipeline import generate
    from rapid_diffusion.generation.request import GenerationRequest
    from rapid_diffusion.knowledge import KnowledgeGraph

    from .knowledge_demo.demo import DEMO_GRAPH, load_split, measure_entity_attributes

    service, spec = open_service(args)
    model = service.registry.get(spec)
    graph_dir = args.graph or DEMO_GRAPH
    graph, entities = KnowledgeGraph.load(graph_dir), load_split(graph_dir)[args.split]

    def image_for(encoder):
        def image(prompt: str, seed: int):
            with model.lock:
                return generate(model.pipe, [GenerationRequest(prompt=prompt, seed=seed)], spec=spec, encode_prompt=encoder)[0].images[0]

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
    from .knowledge_demo.finetune_demo import DemoFinetuneConfig, finetune_demo

    config = DemoFinetuneConfig(
        out=args.out, domain_id=args.domain_id, with_knowledge=not args.no_knowledge,
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
    )
    if args.base is not None:
        config.base = args.base
    if not (config.base / "model_index.json").is_file():
        raise CLIError(f"{config.base} is not a pipeline folder; train the demo model first (rapid-diffusion dev train-demo)")
    print(finetune_demo(config, log=lambda message: print(message, file=sys.stderr)))
    print(f"domain: {config.domain_id}")
    return 0
