"""Video over real HTTP: MP4 and WebM through both APIs, streaming and not, the openai client with a
video_url part, usage with the video tokens, the vision cache, and every bad clip a 4xx."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from tests import clips
from tests.server.conftest import png_b64, start_server, stop_server


@pytest.fixture(scope="module")
def vserver(tmp_path_factory):
    # a low decode limit so that the bomb below is refused; the rest are the defaults
    s = start_server(tmp_path_factory, "--max-input-pixels", "2000000", "--max-video-seconds", "20",
                     "--default-max-tokens", "64")
    yield s
    stop_server(s)


def _url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


MP4 = _url(clips.mp4(n=30, w=128, h=96), "video/mp4")
WEBM = _url(clips.webm(n=24, w=112, h=64), "video/webm")


@pytest.mark.parametrize("video", [MP4, WEBM], ids=["mp4", "webm"])
def test_predict_answers_about_a_clip(vserver, video):
    with vserver.client() as c:
        r = c.post("/api/predict", json={"video": video, "prompt": "What moves?", "max_tokens": 8,
                                         "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] and body["usage"]["video_tokens"] > 0 and body["usage"]["image_tokens"] == 0
    assert body["usage"]["prompt_tokens"] > body["usage"]["video_tokens"]


@pytest.mark.parametrize("video", [MP4, WEBM], ids=["mp4", "webm"])
def test_predict_streams_a_clip_with_fps_and_max_frames(vserver, video):
    with vserver.client() as c, c.stream("POST", "/api/predict", json={
            "video": video, "image": png_b64(), "prompt": "Compare.", "max_tokens": 6, "stream": True,
            "fps": 4, "max_frames": 6}) as r:
        assert r.status_code == 200
        lines = [json.loads(x) for x in r.iter_lines() if x]
    last = lines[-1]
    assert last["done"] and last["usage"]["video_tokens"] > 0 and last["usage"]["image_tokens"] > 0
    assert any(x["token"] for x in lines[:-1])


def test_max_frames_lowers_the_token_cost(vserver):
    with vserver.client() as c:
        few = c.post("/api/predict", json={"video": MP4, "prompt": "x", "max_tokens": 1, "max_frames": 4}).json()
        more = c.post("/api/predict", json={"video": MP4, "prompt": "x", "max_tokens": 1, "fps": 4}).json()
    assert few["usage"]["video_tokens"] < more["usage"]["video_tokens"]


@pytest.fixture(scope="module")
def client(vserver) -> openai.OpenAI:
    return openai.OpenAI(base_url=vserver.url + "/v1", api_key="unused", max_retries=0)


def _video_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens in this clip?"}]}]


def test_openai_client_with_a_video_url_part(client):
    r = client.chat.completions.create(model="m", messages=_video_message(MP4), max_tokens=8, temperature=0)
    assert r.choices[0].message.content
    assert r.usage.prompt_tokens_details.video_tokens > 0  # edgevl's extension of prompt_tokens_details


def test_openai_client_streams_a_webm(client):
    kw = dict(model="m", messages=_video_message(WEBM), max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.video_tokens == whole.usage.prompt_tokens_details.video_tokens > 0


def test_openai_frame_list_part(client):
    frames = ["data:image/png;base64," + png_b64(96, 64, seed=i) for i in range(4)]
    r = client.chat.completions.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "video", "video": frames, "fps": 1}, {"type": "text", "text": "What changes?"}]}])
    assert r.usage.prompt_tokens_details.video_tokens > 0


def test_a_repeated_clip_hits_the_vision_cache(vserver):
    clip = _url(clips.mp4(n=22, w=96, h=96), "video/mp4")
    with vserver.client() as c:
        first = c.post("/api/predict", json={"video": clip, "prompt": "one", "max_tokens": 2}).json()
        # another system prompt: the KV prefix cannot cover the clip, the vision cache must
        again = c.post("/api/predict", json={"video": clip, "prompt": "two", "max_tokens": 2,
                                             "system": "Be brief."}).json()
    assert first["timings"]["vision_cache_hits"] == 0 and again["timings"]["vision_cache_hits"] == 1


def _truncated() -> bytes:
    data = clips.mp4(n=40)
    return data[: len(data) // 2]


BAD = {
    "corrupt": lambda: b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8,
    "truncated": _truncated,
    "audio only": lambda: clips.encode("", "mp4", video=False, audio=True),
    "zero frames": lambda: clips.encode("libvpx", "webm", n=0, audio=True),  # a video track with no frame
    "one frame": lambda: clips.mp4(n=1),
    "absurd resolution": lambda: clips.encode("libx264", "mp4", n=2, w=3000, h=3000, solid=True),  # a bomb
    "absurd fps": lambda: clips.mp4(n=30, fps=1000),
    "too long": lambda: clips.mp4(n=30, fps=1, w=32, h=32),
    "not base64": None,
}


@pytest.mark.parametrize("api", ["predict", "chat"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_clips_get_a_4xx_and_the_server_keeps_serving(vserver, case, api):
    make = BAD[case]
    video = "data:video/mp4;base64,@@not base64@@" if make is None else _url(make(), "video/mp4")
    with vserver.client() as c:
        if api == "predict":
            r = c.post("/api/predict", json={"video": video, "prompt": "x", "max_tokens": 2})
        else:
            r = c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": _video_message(video)})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["code"] and err["param"], err
        ok = c.post("/api/predict", json={"video": MP4, "prompt": "still there?", "max_tokens": 2})
        assert ok.status_code == 200


def test_fields_that_need_a_video_are_refused_without_one(vserver):
    with vserver.client() as c:
        r = c.post("/api/predict", json={"prompt": "x", "fps": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "fps"
        r = c.post("/api/predict", json={"prompt": "x", "video": MP4, "max_frames": 1000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_frames"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": MP4, "max_frames": 1000}}]}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0.video_url.max_frames"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": MP4}, "fps": 3}]}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0.fps"
