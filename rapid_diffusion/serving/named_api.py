"""The named ``/generate`` endpoint for ``gradio_client``: the Gradio page's one public API.

Its parameters use the diffusers vocabulary; any left empty takes the domain's default. It calls the
same service path as the Generate tab (``ui_common.generate_on_gpu``), so a refusal has the same reason.
"""

from __future__ import annotations

import json

import gradio as gr

from ..service.app import AppService
from ..service.inputs import request_from_inputs
from .ui_common import GPU_GROUP, generate_on_gpu, save_pngs, spec_or_error


def build_named_api(service: AppService) -> None:
    """``/generate`` for ``gradio_client``, with parameters in the diffusers vocabulary."""
    with gr.Column(visible=False):
        inputs = [
            gr.Textbox(label="prompt"),
            gr.Textbox(label="negative_prompt", value=None),
            gr.Textbox(label="domain"),
            RawNumber(label="num_inference_steps", precision=0),
            RawNumber(label="guidance_scale"),
            RawNumber(label="seed", precision=0),
            RawNumber(label="num_images", precision=0),
            gr.Textbox(label="sampler"),
            gr.Radio([True, False], value=None, label="super_resolution"),
        ]
        outputs = [gr.Gallery(label="images", format="png"), gr.JSON(label="info")]
        trigger = gr.Button(visible=False)
    trigger.click(
        make_api_generate(service),
        inputs,
        outputs,
        api_name="generate",
        concurrency_id=GPU_GROUP,
        concurrency_limit=service.gate.slots,
    )


# A refusal names the parameter as the caller sent it.
NAMED_API_FIELDS = {name: (name, name) for name in (
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "num_images", "height", "width", "sampler",
    "super_resolution",
)}


class RawNumber(gr.Number):
    """A number input of the named API that hands its value on unconverted.

    ``gr.Number`` rounds to its precision (1.5 became 2) and fails without a message on NaN or
    text; the core instead refuses such a value with the same bilingual reason the UI gives.
    Rendered as a plain number field.
    """

    def preprocess(self, payload):
        return payload

    def get_block_name(self) -> str:
        return "number"


def make_api_generate(service: AppService):
    def generate(
        prompt: str,
        negative_prompt: str | None = None,
        domain: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        sampler: str | None = None,
        super_resolution: bool | None = None,
    ):
        """Generate images; any parameter left empty takes the domain's default."""
        spec = spec_or_error(service, domain)
        request = request_from_inputs(
            prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            seed=seed, num_images=num_images, sampler=sampler, super_resolution=super_resolution,
        )
        result = generate_on_gpu(service, request, spec.id, None, None, None, None, NAMED_API_FIELDS)
        paths = save_pngs(result)
        info = {"seeds": result.seeds, "timings": result.timings, "notes": result.notes, "settings": result.settings}
        return [(str(p), f"seed {s}") for p, s in zip(paths, result.seeds)], json.loads(json.dumps(info, default=str))

    return generate

