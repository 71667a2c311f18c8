"""API keys: required everywhere but the routes SECURITY.md names, when set; constant-time; never logged."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import start_server, stop_server
from tests.test_readme import app_routes

KEY = "s3cret-key-123"


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    s = start_server(tmp_path_factory, "--api-keys", f"other,{KEY}")
    yield s
    stop_server(s)


def test_health_is_open_everything_else_needs_a_key(locked):
    assert httpx.get(locked.url + "/api/health").status_code == 200
    for method, path in (("POST", "/api/predict"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("GET", "/metrics"), ("POST", "/api/ocr")):
        r = httpx.request(method, locked.url + path, json={})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.request("POST", locked.url + "/api/predict", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_security_md_names_exactly_the_routes_open_without_a_key(locked):
    text = (Path(__file__).resolve().parents[2] / "SECURITY.md").read_text()
    sentence = re.search(r"required on every route\s+except (.+?)\. Keys are", text, flags=re.S).group(1)
    named = {p.replace("*", "app.js") for p in re.findall(r"`(/[^`]*)`", sentence)}
    gets = {path for method, path in app_routes() if method == "GET"} | named
    is_open = {path for path in gets if httpx.get(locked.url + path, timeout=30).status_code != 401}
    assert is_open == named


def test_a_valid_key_works_by_bearer_or_header(locked):
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(locked.url + "/api/predict", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60).status_code == 200
    assert httpx.get(locked.url + "/v1/models", headers={"X-API-Key": "other"}).status_code == 200


def test_keys_never_reach_the_log(locked):
    httpx.post(locked.url + "/api/predict", json={"prompt": "x", "max_tokens": 1},
               headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert KEY not in locked.log()


def test_cors_is_off_by_default(server):
    r = httpx.options(server.url + "/api/predict", headers={"Origin": "http://evil.example",
                                                            "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_ollamas_client_sends_its_key_as_a_bearer_token(locked, monkeypatch):
    ollama = pytest.importorskip("ollama")
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=locked.url).list()
    assert e.value.status_code == 401 and "API key" in e.value.error  # Ollama's error shape: one string
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    assert ollama.Client(host=locked.url).list().models
