"""Structured output and /api/detect over HTTP: answers parse and validate, boxes come back in pixels."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.conftest import png_b64

SCHEMA = {"type": "object", "properties": {"reading": {"type": "number", "minimum": 0, "maximum": 1000},
                                           "unit": {"enum": ["kWh", "m3"]}},
          "required": ["reading", "unit"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_predict_with_a_schema(server, stream):
    body = {"image": png_b64(), "prompt": "Read the meter.", "schema": SCHEMA, "max_tokens": 120,
            "temperature": 1.0, "seed": 5, "stream": stream}
    with server.client() as c:
        if stream:
            with c.stream("POST", "/api/predict", json=body) as r:
                lines = [json.loads(x) for x in r.iter_lines() if x]
            text, last = "".join(x["token"] for x in lines), lines[-1]
        else:
            last = c.post("/api/predict", json=body).json()
            text = last["answer"]
    assert last["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_invalid_schema_is_a_400(server):
    r = server.client().post("/api/predict", json={"prompt": "x", "schema": {"type": "nonsense"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_schema"


def test_openai_response_format(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Give me JSON."}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=150, seed=1, temperature=1.0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "meter", "schema": SCHEMA, "strict": True}}
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=120, seed=2, stream=True,
                                                 response_format=fmt))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=msgs, response_format={"type": "json_schema"})


@pytest.mark.parametrize("stream", [False, True])
def test_detect_returns_boxes_in_pixels(server, stream):
    body = {"image": png_b64(320, 200), "query": "every red car", "max_tokens": 200, "temperature": 1.0, "seed": 3,
            "stream": stream}
    out = server.edge("/api/detect", body)
    assert out["finish_reason"] == "stop" and out["image"] == {"width": 320, "height": 200, "exif_orientation": 1}
    assert isinstance(out["boxes"], list) and out["dropped"] >= 0
    for b in out["boxes"]:
        x1, y1, x2, y2 = b["box"]
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 200
        assert b["box"] == b["box_upright"]  # no EXIF rotation in this image
    assert len(out["boxes"]) + out["dropped"] == len(json.loads(out["text"]))
