"""instructor: a nested model out of a picture in TOOLS mode (a forced, named tool call) and in
JSON_SCHEMA mode (response_format), and its re-ask loop after a validation error."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

instructor = pytest.importorskip("instructor")
openai = pytest.importorskip("openai")

MODES = ["TOOLS", "JSON_SCHEMA"]


class Colour(BaseModel):
    # closed (additionalProperties false): an open schema lets the demo model write keys of its own
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    share: int = Field(ge=0, le=100)


class Scene(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(max_length=12)
    main: Colour
    others: list[Colour] = Field(max_length=1)


class Counted(BaseModel):
    """A scene whose first validation fails, so that instructor has to ask again."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(max_length=12)
    main: Colour

    @field_validator("title")
    @classmethod
    def _reject_first(cls, value: str, info: ValidationInfo) -> str:
        attempts = (info.context or {})["attempts"]
        attempts.append(value)
        if len(attempts) == 1:
            raise ValueError("the title must name the main colour; try again")
        return value


def _client(base_url: str, mode: str):
    raw = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return instructor.from_openai(raw, mode=getattr(instructor.Mode, mode))


def _messages(image_url: str) -> list[dict]:
    return [{"role": "system", "content": "You describe pictures."},
            {"role": "user", "content": [{"type": "text", "text": "Describe the colours of this picture."},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


@pytest.mark.parametrize("mode", MODES)
def test_a_nested_model_from_a_picture(base_url, model, image_url, mode):
    scene = _client(base_url, mode).chat.completions.create(
        model=model, response_model=Scene, messages=_messages(image_url), max_tokens=200, temperature=0,
        max_retries=0)
    assert isinstance(scene, Scene) and isinstance(scene.main, Colour)
    assert all(isinstance(c, Colour) for c in scene.others)


@pytest.mark.parametrize("mode", MODES)
def test_a_validation_error_is_asked_again(base_url, model, image_url, mode):
    attempts: list[str] = []
    counted, completion = _client(base_url, mode).chat.completions.create_with_completion(
        model=model, response_model=Counted, messages=_messages(image_url), max_tokens=120, temperature=0,
        max_retries=2, context={"attempts": attempts})
    assert isinstance(counted, Counted) and isinstance(counted.main, Colour)
    assert len(attempts) == 2  # the re-ask (the failed answer and the error sent back) was accepted
    assert completion.choices[0].finish_reason in ("stop", "tool_calls")
