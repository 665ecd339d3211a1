"""The JSON API's body: one record, or a list of EasyNLP-style records, as a pydantic model.

FastAPI validates the body with :func:`body_type` (the OpenAPI page at ``/docs`` lists every
field, its bound and an example); the bounds are the core's :class:`Limits`, read once when the
app is built, so they are written nowhere else. A record becomes a :class:`GenerationRequest`
through the one builder every face uses (:func:`request_from_inputs`), and the core still checks
what only it knows (a blank prompt, ``seed + num_images``). :func:`refusal` turns pydantic's
errors into the API's ``{"error", "field"}`` through the one table of reasons (``messages``),
naming the field as the client sent it: ``prompt`` or ``text``, ``[2].seed`` inside a list.

A record carrying ``idx`` is answered as EasyNLP's latent-diffusion predictor answers it,
``idx``, ``text`` and ``gen_imgbase64`` (the first image, standard base64), beside this API's own
fields; a list is answered with a list in the same order.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, model_validator

from ..generation.pipeline import GenerationResult
from ..generation.request import GenerationRequest, Limits
from ..messages import say, validation_reason
from ..service.app import UserFacingError
from ..service.inputs import RANDOM_SEED, request_from_inputs

EXAMPLE_PROMPT = "左边有一个大的红色圆形"


def record_model(limits: Limits) -> type[BaseModel]:
    """``PredictRecord``: one request within these bounds."""
    bounds = limits.bounds()
    steps, guidance, images, seeds = (bounds[name] for name in ("num_inference_steps", "guidance_scale", "num_images", "seed"))

    class PredictRecord(BaseModel):
        """One generation request; with ``idx`` it is an EasyNLP record."""

        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
            "examples": [{"text": EXAMPLE_PROMPT, "num_inference_steps": 20, "seed": 42},
                         {"idx": 0, "text": EXAMPLE_PROMPT}]})

        text: str = Field(validation_alias=AliasChoices("text", "prompt"), min_length=1, max_length=limits.max_prompt_chars,
                          description="the prompt, in Chinese (also accepted as `prompt`)", examples=[EXAMPLE_PROMPT])
        idx: int | str | None = Field(None, description="an EasyNLP record id: the answer then carries `idx`, `text` and "
                                                        "`gen_imgbase64` (the first image) as EasyNLP's predictor does",
                                      examples=[0])
        negative_prompt: str | None = Field(None, max_length=limits.max_prompt_chars,
                                            description="null: the domain's; empty: none", examples=["模糊"])
        num_inference_steps: int | None = Field(None, ge=steps[0], le=steps[1], description="null: the domain's",
                                                examples=[20])
        guidance_scale: float | None = Field(None, ge=guidance[0], le=guidance[1], allow_inf_nan=False,
                                             description="null: the domain's", examples=[7.5])
        seed: int | None = Field(None, ge=RANDOM_SEED, le=seeds[1], description="null or -1: random; image i uses seed + i",
                                 examples=[42])
        num_images: int | None = Field(None, ge=images[0], le=images[1], description="null: 1", examples=[1])
        super_resolution: bool | None = Field(None, description="ESRGAN x4 after generation; null: the domain's",
                                              examples=[False])

        _prompt_sent_as: str = PrivateAttr("text")

        @model_validator(mode="wrap")
        @classmethod
        def _remember_prompt_name(cls, data: Any, handler):
            record = handler(data)
            record._prompt_sent_as = "prompt" if isinstance(data, dict) and "prompt" in data else "text"
            return record

        def request(self) -> GenerationRequest:
            return request_from_inputs(
                self.text,
                negative_prompt=self.negative_prompt,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                seed=self.seed,
                num_images=self.num_images,
                super_resolution=self.super_resolution,
            )

        def field_names(self, position: int | None) -> dict[str, tuple[str, str]]:
            """The core's field names -> as this client sent them (for the service's refusals)."""
            names = {name: sent_name(name, position) for name in type(self).model_fields}
            names["prompt"] = names["text"] = sent_name(self._prompt_sent_as, position)
            return {core: (name, name) for core, name in names.items()}

        def answer(self, result: GenerationResult) -> dict[str, Any]:
            answer = {
                "text": result.settings["prompt"],
                "images_base64": [base64.b64encode(result.png_bytes(i)).decode("ascii") for i in range(len(result.images))],
                "seeds": result.seeds,
                "timings": result.timings,
                "notes": result.notes,
            }
            if "idx" in self.model_fields_set:
                answer = {"idx": self.idx, **answer, "gen_imgbase64": answer["images_base64"][0]}
            return answer

    return PredictRecord


def body_type(record: type[BaseModel], limits: Limits) -> Any:
    """The body's type for FastAPI: a record, or a list of at most ``max_images`` records (each
    within one request's limits, so a list asks at most that many times what one request may)."""
    records = Annotated[list[record], Field(min_length=1, max_length=limits.max_images)]
    return Annotated[
        Union[Annotated[record, Tag("record")], Annotated[records, Tag("records")]],
        Discriminator(lambda body: "records" if isinstance(body, list) else "record"),
    ]


def sent_name(field: str, position: int | None) -> str:
    return field if position is None else f"[{position}].{field}"


def refusal(errors: list[dict[str, Any]], known: list[str]) -> UserFacingError:
    """FastAPI's validation errors of the body -> the API's refusal, naming the first field at fault.

    A ``loc`` is ``("body", "record", field, ...)`` or ``("body", "records", position, field, ...)``;
    an error about the body as a whole (not an object, too many records) is 400, a field's 422.
    """
    error = errors[0]
    loc = tuple(error["loc"])
    place = list(loc[2:])
    position = place.pop(0) if loc[1:2] == ("records",) and place and isinstance(place[0], int) else None
    reason_zh, reason_en = validation_reason(error, known=", ".join(known))
    if not place and position is None:
        return UserFacingError(400, say("invalid_body", reason_zh=reason_zh, reason_en=reason_en))
    field = sent_name(str(place[0]), position) if place else f"[{position}]"
    return UserFacingError(422, say("invalid_field", field_zh=field, field_en=field, reason_zh=reason_zh, reason_en=reason_en), field)
