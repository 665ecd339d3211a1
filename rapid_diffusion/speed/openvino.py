"""The ``openvino`` level: the pipeline's UNet, VAE decoder and text encoder run by OpenVINO on CPU.

Each module is converted with ``openvino.convert_model`` (no optimum-intel: it needs
torchvision) into an IR with dynamic dimensions, saved under ``HOME/cache/openvino/<key>`` and
compiled for CPU with the f32 precision hint (``RAPID_DIFFUSION_OPENVINO_PRECISION=bf16`` runs
the UNet in bf16: faster on CPUs with bf16 units, but it moves pixels, see benchmarks/README.md).
The torch modules stay in the pipeline, their ``forward`` replaced, so diffusers' own scheduler
loop, CFG and callbacks run unchanged.

``int8=True`` (the ``openvino-int8`` level) compresses the converted weights to int8 with NNCF
(``nncf.compress_weights``: weight-only, per-channel asymmetric, activations stay f32) before the
IR is cached, under its own cache key.

Shape policy (:func:`keeps_static_copies`): on a small model (UNet weights up to 1 GiB, the demo)
the UNet and the VAE decoder run at a static batch bucket (1, 2, 4, 8; padded by repeating the
last row, larger batches in chunks of 8), each (bucket, size) compiled once and kept;
:func:`warm_up_shapes` compiles the buckets of the sizes a domain serves, and any other size runs
on the dynamic-shape compilation made at load, so no request waits for a compilation. Compiled
blobs go to OpenVINO's own cache (``CACHE_DIR``), so a restart reads them back instead of
compiling. A large model (SD1.5: 3.4 GB of UNet weights) keeps only the dynamic-shape compilation,
run once at every shape of the policy to warm it, runs at most 2 rows at a time (one image with
CFG: batches of 4 and 8 rows made OpenVINO keep gigabytes of attention buffers for no gain on a
CPU, which is compute-bound at batch 1) and has no compiled-blob cache (a blob is a further copy of
the weights). benchmarks/README.md, "Real size on a CPU host", has the figures.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import shutil
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..settings import settings
from .compile_cache import cache_key, cache_root, module_fingerprint, write_atomically

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8)
LARGE_MODEL_BUCKETS = (1, 2)  # a large model's batches: one image with CFG at a time, larger ones in chunks
CONVERTER_VERSION = 1
STATIC_COPIES_MAX_BYTES = 1 << 30  # UNet weights up to this size get one static compilation per shape
PRECISION_HINTS = {"f32": "f32", "bf16": "bf16"}


def openvino_missing(device: torch.device) -> str | None:
    """Why the ``openvino`` level cannot run here; None when it can."""
    if torch.device(device).type != "cpu":
        return f"OpenVINO runs on the CPU, the pipeline is on {torch.device(device).type}"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install rapid-diffusion[openvino])"
    return None


def nncf_missing() -> str | None:
    """Why int8 weight compression cannot run here; None when it can."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "nncf is not installed (pip install rapid-diffusion[int8])"
    return None


def keeps_static_copies(pipe) -> bool:
    """Whether the shape policy compiles one static copy per (bucket, size): small models only."""
    weight_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    return weight_bytes <= STATIC_COPIES_MAX_BYTES


def batch_buckets(pipe) -> tuple[int, ...]:
    """The batch sizes the policy runs ``pipe``'s converted modules at."""
    return BATCH_BUCKETS if keeps_static_copies(pipe) else LARGE_MODEL_BUCKETS


def bucket_for(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds ``batch``; the largest bucket for bigger (chunked) batches."""
    return next((b for b in buckets if b >= batch), buckets[-1])


def release_freed_memory() -> None:
    """Hand the memory Python and OpenVINO freed back to the system (glibc keeps freed blocks for
    reuse: after converting an SD1.5 UNet the process held gigabytes it no longer used)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class OpenVinoModule:
    """One converted module: compiled once with dynamic shapes, and (``static``) once per static
    input shape asked for.

    Inputs and the output are batch-first tensors; a batch is padded to its bucket or cut into
    chunks of the largest bucket, so only ``len(buckets)`` batch sizes ever run. Without ``static``
    the converted model is not kept after compiling (on SD1.5 it is a copy of the weights).
    """

    def __init__(self, model, name: str, precision: str, cache_dir: Path | None, static: bool = True,
                 buckets: Sequence[int] = BATCH_BUCKETS):
        import openvino as ov

        self.name = name
        self.buckets = tuple(buckets)
        self._core = ov.Core()
        self._model = model if static else None
        self._config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        if cache_dir is not None:
            self._config["CACHE_DIR"] = str(cache_dir)
        self._compiled: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self.dynamic = self._core.compile_model(model, "CPU", self._config)
        self.static_shapes: set[tuple] = set()

    def compile_static(self, shapes: Sequence[Sequence[int]]):
        """The compilation for these exact input shapes (compiled on first ask, then kept)."""
        import openvino as ov

        if self._model is None:
            return self.dynamic
        key = tuple(tuple(int(d) for d in s) for s in shapes)
        with self._lock:
            if key not in self._compiled:
                model = self._model.clone()
                model.reshape({model.input(i): ov.PartialShape(list(s)) for i, s in enumerate(key)})
                self._compiled[key] = self._core.compile_model(model, "CPU", self._config)
                self.static_shapes.add(key)
            return self._compiled[key]

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = tensors[0].shape[0]
        largest = self.buckets[-1]
        if batch > largest:
            chunks = [self(*(t[i:i + largest] for t in tensors)) for i in range(0, batch, largest)]
            return torch.cat(chunks)
        bucket = bucket_for(batch, self.buckets)
        arrays = [pad_batch(t, bucket).detach().cpu().numpy() for t in tensors]
        key = tuple(a.shape for a in arrays)
        compiled = self._compiled.get(key, self.dynamic)
        output = compiled(arrays)[0]
        return torch.from_numpy(np.array(output[:batch], copy=True))


def pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last row up to ``size`` rows: rows never mix in these models, so padding is exact."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class UNetGraph(torch.nn.Module):
    """What is converted: the UNet with only the inputs Stable Diffusion's loop passes."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


class DecoderGraph(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, sample):
        return self.decoder(sample)


def example_inputs(pipe, height: int, width: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """One example input per converted module (batch 2: its dimension stays dynamic in the IR)."""
    scale = pipe.vae_scale_factor
    latents = torch.zeros(2, pipe.unet.config.in_channels, height // scale, width // scale)
    tokens = int(pipe.tokenizer.model_max_length)
    hidden = torch.zeros(2, tokens, pipe.unet.config.cross_attention_dim)
    return {
        "unet": (latents, torch.full((2,), 999.0), hidden),
        "text_encoder": (torch.zeros(2, tokens, dtype=torch.long),),
        "vae_decoder": (torch.zeros(2, pipe.vae.config.latent_channels, height // scale, width // scale),),
    }


def graph_modules(pipe) -> dict[str, torch.nn.Module]:
    return {
        "unet": UNetGraph(pipe.unet),
        "text_encoder": TextEncoderGraph(pipe.text_encoder),
        "vae_decoder": DecoderGraph(pipe.vae.decoder),
    }


def converted_model(name: str, graph: torch.nn.Module, example: tuple, log_line: Callable[[str], None], int8: bool = False):
    """The OpenVINO IR of ``graph`` (int8 weights when asked): read from the disk cache, or
    converted (and then cached)."""
    import openvino as ov

    folder = ir_folder(name, graph, int8)
    if folder is not None:
        cached = read_cached_ir(folder, log_line)
        if cached is not None:
            return cached, True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: shapes are static per bucket
        model = ov.convert_model(graph.eval(), example_input=example)
    if int8:
        model = compressed_to_int8(model)
    if folder is not None:
        save_ir(model, folder)
        # Compile what a restart will read: OpenVINO keys its compiled blobs (CACHE_DIR) by the model,
        # and the converted model differs from the IR read back, so a restart would compile again.
        model = read_cached_ir(folder, log_line) or model
    return model, False


def compressed_to_int8(model):
    """NNCF's int8 weight-only compression (its default mode, INT8_ASYM) of a converted model."""
    import nncf

    return nncf.compress_weights(model)


def ir_folder(name: str, graph: torch.nn.Module, int8: bool = False) -> Path | None:
    import openvino as ov

    root = cache_root()
    if root is None:
        return None
    key = cache_key(
        component=name,
        weights=module_fingerprint(graph),
        openvino=ov.__version__,
        torch=torch.__version__,
        device="CPU",
        converter=CONVERTER_VERSION,
        **({"compression": "int8"} if int8 else {}),
    )
    return root / "openvino" / f"{name}{'-int8' if int8 else ''}-{key}"


def save_ir(model, folder: Path) -> None:
    """IR files plus a manifest of their hashes, written last: an entry without one is incomplete."""
    import openvino as ov

    staging = folder.with_name(folder.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
    manifest = {name: file_hash(staging / name) for name in ("model.xml", "model.bin")}
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    write_atomically(folder / "manifest.json", json.dumps(manifest).encode())


def read_cached_ir(folder: Path, log_line: Callable[[str], None]):
    """The cached IR if its files match their manifest; None (with a log line) if stale or corrupt."""
    import openvino as ov

    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
        if any(file_hash(folder / name) != digest for name, digest in manifest.items()):
            raise ValueError("file hashes do not match the manifest")
        return ov.Core().read_model(folder / "model.xml")
    except (OSError, ValueError, RuntimeError) as exc:
        log_line(f"ignoring the corrupt OpenVINO cache entry {folder.name} ({type(exc).__name__}: {exc}); converting again")
        return None


def file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# torch.jit.trace (under ov.convert_model) is not safe to run twice at once in one process: a
# background warm-up and a foreground conversion traced together failed its sanity check.
CONVERTING = threading.Lock()


def convert_pipeline(pipe, height: int, width: int, log_line: Callable[[str], None], precision: str | None = None,
                     int8: bool = False) -> dict:
    """Convert (or read from the cache) and compile the three modules; returns them by name.

    ``precision`` applies to the UNet, where the time goes; the VAE decoder and the text encoder
    stay f32 (with OpenVINO 2026.4 the static-shape bf16 VAE decoder of the demo model gave NaN).
    """
    with CONVERTING:
        return convert_modules(pipe, height, width, log_line, precision or settings().openvino_precision, int8)


def convert_modules(pipe, height: int, width: int, log_line: Callable[[str], None], precision: str, int8: bool = False) -> dict:
    root = cache_root()
    static = keeps_static_copies(pipe)
    blob_dir = root / "openvino" / "compiled" if root is not None and static else None
    modules, from_cache = {}, []
    examples = example_inputs(pipe, height, width)
    for name, graph in graph_modules(pipe).items():
        model, cached = converted_model(name, graph, examples[name], log_line, int8)
        if cached:
            from_cache.append(name)
        modules[name] = OpenVinoModule(model, name, precision if name == "unet" else "f32", blob_dir, static, batch_buckets(pipe))
        del model
        release_freed_memory()  # the traced graph and the converted model are garbage once compiled
    source = f"read from the cache ({', '.join(from_cache)})" if from_cache else "converted"
    weights = "int8 weights" if int8 else "f32 weights"
    log_line(f"OpenVINO (UNet {precision}, VAE decoder and text encoder f32; {weights}): {source}")
    return modules


def install(pipe, modules: dict) -> None:
    """Route the torch modules' ``forward`` to OpenVINO (uses it only for inputs it was built for)."""
    pipe.unet.forward = unet_forward(modules["unet"], pipe.unet)
    pipe.text_encoder.forward = text_encoder_forward(modules["text_encoder"], pipe.text_encoder)
    pipe.vae.decoder.forward = decoder_forward(modules["vae_decoder"], pipe.vae.decoder)
    pipe.openvino_modules = modules


def unet_forward(compiled: OpenVinoModule, unet):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    torch_forward = type(unet).forward.__get__(unet)

    def forward(sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        if args or any(value is not None for value in kwargs.values()):
            return torch_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        timesteps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        output = compiled(sample.float(), timesteps, encoder_hidden_states.float()).to(sample.dtype)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    return forward


def text_encoder_forward(compiled: OpenVinoModule, text_encoder):
    """OpenVINO for plain encoding; torch when a caller hooks the embeddings (the knowledge injection
    sets ``needs_torch_forward`` on the encoder while its hook is held), passes a mask or asks for
    hidden states, which the converted graph does not provide."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    torch_forward = type(text_encoder).forward.__get__(text_encoder)
    def forward(input_ids=None, attention_mask=None, *args, **kwargs):
        extra = args or any(value not in (None, False) for key, value in kwargs.items() if key != "return_dict")
        if extra or attention_mask is not None or getattr(text_encoder, "needs_torch_forward", False):
            return torch_forward(input_ids, attention_mask, *args, **kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=compiled(input_ids.long()))

    return forward


def decoder_forward(compiled: OpenVinoModule, decoder):
    torch_forward = type(decoder).forward.__get__(decoder)

    def forward(sample, latent_embeds=None):
        if latent_embeds is not None:
            return torch_forward(sample, latent_embeds)
        return compiled(sample.float()).to(sample.dtype)

    return forward


def serving_shapes(pipe, sizes: Sequence[tuple[int, int]], max_images: int) -> dict[str, list[tuple]]:
    """Every static input shape of the policy: each UNet bucket (CFG doubles the batch) and each
    VAE bucket up to ``max_images``, at each size, and the text encoder's one prompt."""
    scale = pipe.vae_scale_factor
    tokens = int(pipe.tokenizer.model_max_length)
    hidden = pipe.unet.config.cross_attention_dim
    buckets = batch_buckets(pipe)
    unet_buckets = sorted({bucket_for(n, buckets) for n in range(1, 2 * max_images + 1)})
    vae_buckets = sorted({bucket_for(n, buckets) for n in range(1, max_images + 1)})
    shapes: dict[str, list[tuple]] = {"unet": [], "vae_decoder": [], "text_encoder": [((1, tokens),)]}
    for height, width in sizes:
        latent = (height // scale, width // scale)
        for b in unet_buckets:
            shapes["unet"].append(((b, pipe.unet.config.in_channels, *latent), (b,), (b, tokens, hidden)))
        for b in vae_buckets:
            shapes["vae_decoder"].append(((b, pipe.vae.config.latent_channels, *latent),))
    return shapes


def warm_up_shapes(pipe, sizes: Sequence[tuple[int, int]], max_images: int) -> int:
    """Run once every shape of the policy (compiled statically first on a small model); returns how
    many shapes were warmed."""
    count = 0
    for name, shape_list in serving_shapes(pipe, sizes, max_images).items():
        module = pipe.openvino_modules[name]
        for shapes in shape_list:
            compiled = module.compile_static(shapes)
            compiled([np.zeros(s, dtype=np.int64 if name == "text_encoder" else np.float32) for s in shapes])
            count += 1
    release_freed_memory()
    return count
