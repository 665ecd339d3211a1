"""ESRGAN x4 super-resolution after generation: the paper upscales 256 -> 1024 with ESRGAN
instead of running a second diffusion model.

Two architectures, written here (no basicsr): ``RRDBNet`` (ESRGAN / Real-ESRGAN) and the
~15x cheaper ``SRVGGNetCompact`` (``realesr-general-x4v3``). Checkpoints load in their public
layouts (basicsr ``params_ema``/``params``, the original ESRGAN ``RRDB_trunk`` and the older
``model.N`` layout) from ``.safetensors`` or ``.pth`` through ``torch.load(weights_only=True)``;
the sizes are read from the state dict. Inference is tiled with overlap so memory stays
bounded for any input size. Weights named by a domain are fetched once into a cache and
checked by sha256; without them the pipeline falls back to a labelled Lanczos resize.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..domains import DomainSpec, SuperResolutionWeights
from ..paths import DEMO_SR_WEIGHTS

logger = logging.getLogger(__name__)

MAX_INPUT_PIXELS = 2048 * 2048
LRELU_SLOPE = 0.2


class UnknownCheckpointError(ValueError):
    """The file is not a super-resolution checkpoint in a layout this module knows."""


class SRWeightsUnavailable(RuntimeError):
    """The weights are not on disk and cannot be downloaded (offline, missing file)."""


class SRWeightsIntegrityError(ValueError):
    """The weights file does not have the sha256 its domain names."""


# ----------------------------------------------------------------------------- networks


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; the output is scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), LRELU_SLOPE))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks and a scaled skip."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN x4 generator with basicsr's parameter names (nearest upsampling x2, twice)."""

    scale = 4

    def __init__(self, num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), LRELU_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LRELU_SLOPE))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact model: a plain conv/PReLU chain at low resolution, a pixel shuffle,
    and the nearest-upsampled input added back."""

    def __init__(self, num_feat: int = 64, num_conv: int = 32, scale: int = 4):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, 3 * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# ----------------------------------------------------------------------------- checkpoints


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth`` file, unwrapped from ``params_ema``/``params``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refuses anything but tensors and plain containers
            raise UnknownCheckpointError(f"{path}: cannot be read safely as a torch checkpoint ({exc})") from exc
    if isinstance(state, dict):
        for wrapper in ("params_ema", "params", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnknownCheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


_ESRGAN_RENAMES = {"trunk_conv.": "conv_body.", "upconv1.": "conv_up1.", "upconv2.": "conv_up2.", "HRconv.": "conv_hr."}
_OLD_ESRGAN_RENAMES = {"model.0.": "conv_first.", "model.3.": "conv_up1.", "model.6.": "conv_up2.", "model.8.": "conv_hr.", "model.10.": "conv_last."}


def to_basicsr_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the original ESRGAN layouts (``RRDB_trunk`` and the older ``model.N``) to basicsr's."""
    if any(k.startswith("RRDB_trunk.") for k in state):
        return {_rename_esrgan_key(k): v for k, v in state.items()}
    if any(k.startswith("model.1.sub.") for k in state):
        return _rename_old_esrgan(state)
    return dict(state)


def _rename_esrgan_key(key: str) -> str:
    match = re.match(r"RRDB_trunk\.(\d+)\.RDB(\d)\.(conv\d)\.(weight|bias)$", key)
    if match:
        block, rdb, conv, kind = match.groups()
        return f"body.{block}.rdb{rdb}.{conv}.{kind}"
    for old, new in _ESRGAN_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _rename_old_esrgan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 2018 layout: ``model.1.sub.N.RDBk.convM.0.*`` blocks, ``model.1.sub.<last>`` = trunk conv."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))}
    trunk = f"model.1.sub.{len(blocks)}."
    renamed = {}
    for key, value in state.items():
        match = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.(conv\d)\.0\.(weight|bias)$", key)
        if match:
            block, rdb, conv, kind = match.groups()
            key = f"body.{block}.rdb{rdb}.{conv}.{kind}"
        elif key.startswith(trunk):
            key = "conv_body." + key[len(trunk):]
        else:
            for old, new in _OLD_ESRGAN_RENAMES.items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
        renamed[key] = value
    return renamed


@dataclass(frozen=True)
class SRArchitecture:
    """What a state dict describes; read from the tensor shapes, never from a config file."""

    kind: str  # "rrdb" or "srvgg"
    num_feat: int
    scale: int = 4
    num_block: int = 0
    num_grow_ch: int = 0
    num_conv: int = 0

    def build(self) -> nn.Module:
        if self.kind == "rrdb":
            return RRDBNet(self.num_feat, self.num_block, self.num_grow_ch)
        return SRVGGNetCompact(self.num_feat, self.num_conv, self.scale)

    def describe(self) -> str:
        if self.kind == "rrdb":
            return f"RRDBNet x4 ({self.num_block} blocks, {self.num_feat} features, growth {self.num_grow_ch})"
        return f"SRVGGNetCompact x{self.scale} ({self.num_conv} convs, {self.num_feat} features)"


_KNOWN_LAYOUTS = (
    "known layouts: basicsr/Real-ESRGAN RRDBNet ('conv_first', 'body.N.rdbK.convM', 'conv_body', "
    "'conv_up1/2', 'conv_hr', 'conv_last'), original ESRGAN ('RRDB_trunk.N.RDBK.convM', 'trunk_conv', "
    "'upconv1/2', 'HRconv'), or SRVGGNetCompact ('body.N.weight' conv/PReLU chain)"
)


def infer_architecture(state: dict[str, torch.Tensor], source: str = "checkpoint") -> SRArchitecture:
    """The network a (basicsr-layout) state dict belongs to; a clear error for anything else."""
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        first = state["conv_first.weight"]
        if first.shape[1] != 3:
            raise UnknownCheckpointError(
                f"{source}: RRDBNet with {first.shape[1]} input channels (a pixel-unshuffle x2/x1 model); only x4 is supported"
            )
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.rdb", k))}
        grow = state["body.0.rdb1.conv1.weight"].shape[0]
        return SRArchitecture("rrdb", first.shape[0], num_block=len(blocks), num_grow_ch=grow)
    convs = sorted(int(m.group(1)) for k, v in state.items() if (m := re.match(r"body\.(\d+)\.weight$", k)) and v.ndim == 4)
    prelus = [k for k, v in state.items() if re.match(r"body\.\d+\.weight$", k) and v.ndim == 1]
    if convs and convs[0] == 0 and prelus and len(convs) == len(prelus) + 1:
        out_channels = state[f"body.{convs[-1]}.weight"].shape[0]
        scale = int(round((out_channels / 3) ** 0.5))
        if 3 * scale * scale != out_channels:
            raise UnknownCheckpointError(f"{source}: SRVGGNetCompact with {out_channels} output channels is not 3*scale^2")
        return SRArchitecture("srvgg", state["body.0.weight"].shape[0], scale=scale, num_conv=len(convs) - 2)
    sample = ", ".join(list(state)[:4])
    raise UnknownCheckpointError(f"{source}: not a super-resolution checkpoint in a known layout (keys start {sample}); {_KNOWN_LAYOUTS}")


def model_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Build the network a state dict describes and load it strictly."""
    state = to_basicsr_layout(state)
    arch = infer_architecture(state, source)
    model = arch.build()
    mismatch = f"{source}: looks like {arch.describe()} but does not match it"
    try:
        keys = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shapes differ
        raise UnknownCheckpointError(f"{mismatch}: {' '.join(str(exc).split())}") from exc
    if keys.missing_keys or keys.unexpected_keys:
        raise UnknownCheckpointError(f"{mismatch}: missing {keys.missing_keys[:5]}, unexpected {keys.unexpected_keys[:5]}")
    model.architecture = arch
    return model.eval().requires_grad_(False)


def load_sr_model(path: Path) -> nn.Module:
    """An ESRGAN-family model from a checkpoint file in any supported layout."""
    return model_from_state_dict(read_state_dict(Path(path)), source=str(path))


# ----------------------------------------------------------------------------- inference


def tiled_forward(model: nn.Module, x: torch.Tensor, scale: int, tile: int | None, tile_pad: int) -> torch.Tensor:
    """``model(x)`` computed tile by tile; each tile sees ``tile_pad`` extra input pixels on
    every side, which are cropped from its output, so seams vanish once the padding covers
    the receptive field that matters."""
    _, _, height, width = x.shape
    if not tile or (height <= tile and width <= tile):
        return model(x)
    out = None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            pad_top, pad_left = max(top - tile_pad, 0), max(left - tile_pad, 0)
            patch = model(x[:, :, pad_top : min(bottom + tile_pad, height), pad_left : min(right + tile_pad, width)])
            if out is None:
                out = patch.new_zeros(x.shape[0], patch.shape[1], height * scale, width * scale)
            dy, dx = (top - pad_top) * scale, (left - pad_left) * scale
            out[:, :, top * scale : bottom * scale, left * scale : right * scale] = patch[
                :, :, dy : dy + (bottom - top) * scale, dx : dx + (right - left) * scale
            ]
    return out


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    array = x.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


@dataclass
class Upscaler:
    """The ``upscaler`` hook of a loaded model: ``upscaler(images) -> (images, "esrgan")``.

    ``tile`` bounds memory (input pixels per side per tile); ``tile_pad`` is the overlap.
    """

    model: nn.Module = field(repr=False)
    device: torch.device
    dtype: torch.dtype = torch.float32
    tile: int | None = 256
    tile_pad: int = 16

    def __post_init__(self):
        self.model = self.model.to(self.device, self.dtype).to(memory_format=torch.channels_last)

    @property
    def scale(self) -> int:
        return self.model.scale

    @property
    def description(self) -> str:
        arch = getattr(self.model, "architecture", None)
        return arch.describe() if arch else type(self.model).__name__

    def __call__(self, images: list[Image.Image]) -> tuple[list[Image.Image], str]:
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            return [self.upscale_batch([im])[0] for im in images], "esrgan"
        return self.upscale_batch(images), "esrgan"

    def upscale_batch(self, images: list[Image.Image]) -> list[Image.Image]:
        x = images_to_tensor(images).to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            y = tiled_forward(self.model, x, self.scale, self.tile, self.tile_pad)
        return tensor_to_images(y)


def open_image(path: Path, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """An RGB image, refusing oversized ones from the header, before decoding the pixels."""
    image = Image.open(path)
    if image.width * image.height > max_pixels:
        raise ValueError(f"{path}: {image.width}x{image.height} exceeds the {max_pixels}-pixel input limit")
    return image.convert("RGB")


# ----------------------------------------------------------------------------- weights


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected.lower():
        raise SRWeightsIntegrityError(f"{path}: sha256 is {actual}, the domain expects {expected}; refusing these weights")


def sr_cache_dir() -> Path:
    """Where URL downloads go: ``$HF_HOME/rapid-diffusion/sr-weights``."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HOME") or constants.HF_HOME).expanduser() / "rapid-diffusion" / "sr-weights"


def fetch_sr_weights(weights: SuperResolutionWeights, offline: bool | None = None) -> Path:
    """The local file of ``weights``, downloading it once if allowed, verified by sha256."""
    from ..settings import settings

    offline = settings().hub_offline if offline is None else offline
    if weights.path is not None:
        if not weights.path.is_file():
            raise SRWeightsUnavailable(f"SR weights file {weights.path} does not exist")
        path = weights.path
    elif weights.repo_id:
        path = _hub_file(weights, offline)
    else:
        path = _url_file(weights, offline)
    if weights.sha256:
        verify_sha256(path, weights.sha256)
    return path


def _hub_file(weights: SuperResolutionWeights, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(weights.repo_id, weights.filename, local_files_only=offline))
    except Exception as exc:  # offline cache misses and network errors come in many classes
        raise SRWeightsUnavailable(f"SR weights {weights.repo_id}/{weights.filename} unavailable ({type(exc).__name__}: {exc})") from exc


def _url_file(weights: SuperResolutionWeights, offline: bool) -> Path:
    parsed = urllib.parse.urlparse(weights.url)
    if parsed.scheme not in ("https", "http"):
        raise SRWeightsUnavailable(f"SR weights URL {weights.url} must be http(s)")
    if not weights.sha256:
        raise SRWeightsIntegrityError(f"SR weights URL {weights.url} has no sha256 to verify the download")
    target = sr_cache_dir() / weights.sha256[:16] / (Path(parsed.path).name or "weights.pth")
    if target.is_file():
        return target
    if offline:
        raise SRWeightsUnavailable(f"SR weights {weights.url} are not cached in {target.parent} and HF_HUB_OFFLINE is set")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        try:
            with _open_url(weights.url) as response:
                shutil.copyfileobj(response, tmp, 1 << 20)
        except OSError as exc:
            Path(tmp.name).unlink(missing_ok=True)
            raise SRWeightsUnavailable(f"could not download SR weights {weights.url}: {exc}") from exc
    try:
        verify_sha256(Path(tmp.name), weights.sha256)
    except SRWeightsIntegrityError:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    os.replace(tmp.name, target)
    return target


def _open_url(url: str):
    return urllib.request.urlopen(url, timeout=60)


def upscaler_for(
    spec: DomainSpec, device: torch.device, dtype: torch.dtype, log: Callable[[str], None] = logger.info
) -> Upscaler | None:
    """The ESRGAN upscaler of a domain, or None (the pipeline then labels its Lanczos fallback)."""
    if spec.sr_weights is None:
        return None
    try:
        path = fetch_sr_weights(spec.sr_weights)
        model = load_sr_model(path)
    except (SRWeightsUnavailable, SRWeightsIntegrityError, UnknownCheckpointError) as exc:
        logger.warning("domain '%s': no ESRGAN (%s); super-resolution will use labelled Lanczos", spec.id, exc)
        return None
    upscaler = Upscaler(model, device, dtype)
    log(f"domain '{spec.id}': super-resolution {upscaler.description} from {path.name}")
    return upscaler
