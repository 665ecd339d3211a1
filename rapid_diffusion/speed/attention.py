"""FlashAttention for the SD1.x / PAI-Diffusion UNet through diffusers' ``attention_dispatch``.

``UNet2DConditionModel`` uses ``AttnProcessor2_0``, which calls ``F.scaled_dot_product_attention``
directly and ignores diffusers' ``set_attention_backend``. :class:`DispatchAttnProcessor` does the
same computation but routes the attention kernel through ``dispatch_attention_fn``, so any
backend diffusers knows can run it: ``flash`` (flash-attn 2), ``_flash_3`` (FlashAttention-3 on
Hopper) or ``native`` (PyTorch SDPA, whose CUDA flash kernel is FlashAttention-2). Because the
processor carries ``_attention_backend``, diffusers' own ``unet.set_attention_backend(name)``
also switches it once installed.

SD1.x head dims are 40/80/160; ``pad_multiple`` zero-pads the head dim to a kernel tile
(40 -> 64, 80 -> 96 with 32) and slices the output back: zero columns leave ``q @ k^T``
unchanged and give zero output columns, so the result is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.utils import is_flash_attn_3_available, is_flash_attn_available, is_flash_attn_version

FLASH_BACKENDS = ("flash", "_flash_3")
FLASH_ATTN_MIN_VERSION = "2.6.3"  # the oldest flash-attn diffusers' "flash" backend accepts
HALF_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    """flash-attn 2 installed at a version diffusers supports (``pip install .[flash]``), by diffusers'
    public checks; should its import still fail, choosing the backend raises and the level falls back
    to PyTorch SDPA with the reason logged (``levels.choose_attention``)."""
    return is_flash_attn_available() and is_flash_attn_version(">=", FLASH_ATTN_MIN_VERSION)


def flash_attn_3_available() -> bool:
    return is_flash_attn_3_available()


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (9, 0)


def best_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The fastest attention backend usable for ``device``/``dtype``.

    flash-attn kernels need CUDA and fp16/bf16; everything else runs PyTorch SDPA (``native``),
    which on CUDA picks its own FlashAttention-2 kernel and on CPU its flash-cpu/math kernels.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or dtype not in HALF_DTYPES:
        return AttentionBackendName.NATIVE.value
    if flash_attn_3_available() and is_hopper(device):
        return AttentionBackendName._FLASH_3.value
    if flash_attn_available():
        return AttentionBackendName.FLASH.value
    return AttentionBackendName.NATIVE.value


def padded_head_dim(head_dim: int, multiple: int | None) -> int:
    if not multiple:
        return head_dim
    return -(-head_dim // multiple) * multiple


def pad_head_dim(x: torch.Tensor, target: int) -> torch.Tensor:
    """Zero-pad the last (head) dimension of ``x`` to ``target``."""
    extra = target - x.shape[-1]
    return F.pad(x, (0, extra)) if extra > 0 else x


def project_qkv(attn, hidden_states: torch.Tensor, context: torch.Tensor | None):
    """Query, key and value projections, using the fused ``to_qkv``/``to_kv`` when present."""
    fused = getattr(attn, "fused_projections", False)
    if fused and context is None and hasattr(attn, "to_qkv"):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    query = attn.to_q(hidden_states)
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if fused and hasattr(attn, "to_kv"):
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    return query, key, value


class DispatchAttnProcessor:
    """``AttnProcessor2_0`` semantics with the kernel chosen by ``attention_dispatch``."""

    def __init__(self, backend: str = "native", pad_multiple: int | None = None):
        self._attention_backend = AttentionBackendName(backend)
        self.pad_multiple = pad_multiple

    @property
    def backend(self) -> str:
        return self._attention_backend.value

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch_size)
            mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        hidden_states = self.attend(query, key, value, mask)

        hidden_states = hidden_states.flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, query, key, value, mask):
        """Attention on (batch, seq, heads, head_dim) tensors; flash kernels take no mask."""
        head_dim = query.shape[-1]
        target = padded_head_dim(head_dim, self.pad_multiple)
        if target != head_dim:
            query, key, value = (pad_head_dim(x, target) for x in (query, key, value))
        backend = self._attention_backend
        if mask is not None and backend.value in FLASH_BACKENDS:
            backend = AttentionBackendName.NATIVE
        out = dispatch_attention_fn(query, key, value, attn_mask=mask, scale=head_dim**-0.5, backend=backend)
        return out[..., :head_dim]


def check_backend(backend: str) -> None:
    """Raise ``RuntimeError`` when the backend's package is missing or too old (diffusers' public checks)."""
    usable = {"flash": flash_attn_available, "_flash_3": flash_attn_3_available}.get(AttentionBackendName(backend).value)
    if usable is not None and not usable():
        raise RuntimeError(f"attention backend '{backend}' needs flash-attn (>= {FLASH_ATTN_MIN_VERSION}; FlashAttention-3 for '_flash_3')")


def set_attention_backend(model: torch.nn.Module, backend: str, pad_multiple: int | None = None) -> None:
    """Install :class:`DispatchAttnProcessor` with ``backend`` on every attention layer of ``model``."""
    check_backend(backend)
    model.set_attn_processor(DispatchAttnProcessor(backend, pad_multiple))
