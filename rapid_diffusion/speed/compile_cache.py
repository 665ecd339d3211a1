"""On-disk caches of compiled and converted models under ``$RAPID_DIFFUSION_HOME/cache``.

A cache entry is found by a key that hashes everything that makes compiled code invalid: the
module's weights and configuration, the library versions (torch, and OpenVINO for converted
models), the device and the compile options. Another torch, model or device therefore never
reuses an entry; it simply misses. An entry is written to a temporary name and renamed, so a
crash never leaves a half-written entry under a valid key; an entry that is corrupt anyway is
ignored with a log line by its reader. A Hugging Face Space keeps the cache across restarts
when ``RAPID_DIFFUSION_HOME`` points into its persistent storage (``/data``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..settings import settings

log = logging.getLogger(__name__)


def cache_root() -> Path | None:
    """``HOME/cache``; None when ``RAPID_DIFFUSION_COMPILE_CACHE`` is off."""
    return settings().home / "cache" if settings().compile_cache else None


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's class, configuration, parameter and buffer names, shapes and values.

    Hashing the values (not a file's path and mtime) also covers weights changed in memory,
    e.g. a model fine-tuned in this process; the demo model's 20 MB hash in well under a second.
    """
    digest = hashlib.blake2b(digest_size=20)
    digest.update(type(module).__qualname__.encode())
    digest.update(config_text(module).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype and memory format (channels-last included)."""
    flat = tensor.detach().cpu().reshape(-1)
    dense = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return dense.view(torch.uint8).numpy().tobytes()


def config_text(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    if config is None:
        return ""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(as_dict, sort_keys=True, default=str)


def cache_key(**parts) -> str:
    """A short stable hash of ``parts`` (versions, fingerprints, device, options)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def compile_cache_file(pipe, sizes) -> Path | None:
    """Where this pipeline's ``torch.compile`` artifacts live; keyed by weights, torch, device, sizes."""
    root = cache_root()
    if root is None:
        return None
    device = torch.device(pipe.device)
    key = cache_key(
        unet=module_fingerprint(pipe.unet),
        vae_decoder=module_fingerprint(pipe.vae.decoder),
        torch=torch.__version__,
        device=device_description(device),
        sizes=sorted(sizes),
    )
    return root / "torch-compile" / f"{key}.bin"


def device_description(device: torch.device) -> str:
    """The device as compiled code depends on it: the GPU model and capability, or the CPU's ISA."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}:{torch.cuda.get_device_capability(device)}"
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def load_compile_artifacts(pipe, sizes, log_line) -> Path | None:
    """Hot-load a previous process's inductor artifacts, if any; a corrupt file is ignored with a log line.

    Returns the cache file to save to after the warm-up (None when the cache is off).
    """
    path = compile_cache_file(pipe, sizes)
    if path is None or not path.is_file():
        return path
    try:
        loaded = torch.compiler.load_cache_artifacts(path.read_bytes())
        problem = None if loaded is not None else "torch could not read it"
    except Exception as exc:  # a corrupt pickle raises many classes (UnpicklingError, EOFError, KeyError, ...)
        problem = f"{type(exc).__name__}: {str(exc)[:200]}"
    if problem:
        log_line(f"ignoring the corrupt torch.compile cache {path.name} ({problem}); compiling")
    else:
        log_line(f"torch.compile: loaded cached artifacts {path.name}")
    return path


def save_compile_artifacts(path: Path | None, log_line) -> None:
    if path is None:
        return
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    write_atomically(path, artifacts[0])
    log_line(f"torch.compile: saved artifacts to {path}")
