"""--allow-remote-images: image URLs fetched from an image server on loopback (listed in
--allow-remote-hosts); private, link-local and unlisted loopback targets refused before any
connection is made, on the first hop and after every redirect. No traffic leaves the machine."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from tests.server.conftest import png_b64, start_server, stop_server

PNG = base64.b64decode(png_b64(96, 64))
HITS: list[str] = []


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        HITS.append(self.path)
        port = self.server.server_address[1]
        routes = {
            "/cat.png": (200, {"Content-Type": "image/png"}, PNG),
            "/page.html": (200, {"Content-Type": "text/html"}, b"<html></html>"),
            "/huge.png": (200, {"Content-Type": "image/png"}, b"\0" * (2 * 1024 * 1024)),
            "/to-cat": (302, {"Location": "/cat.png"}, b""),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/to-localhost": (302, {"Location": f"http://localhost:{port}/cat.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {"Content-Type": "text/plain"}, b"no"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory):
    s = start_server(tmp_path_factory, "--allow-remote-images", "--allow-remote-hosts", "127.0.0.1",
                     "--max-body-mb", "1")
    yield s
    stop_server(s)


def _ask(server, url: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, json={"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is it?"}]}]})


def test_a_listed_loopback_host_is_fetched(remote_server, images):
    client = openai.OpenAI(base_url=remote_server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": images + "/cat.png"}}, {"type": "text", "text": "Describe."}]}])
    assert r.usage.prompt_tokens > 64  # the image's tokens are in the prompt
    assert _ask(remote_server, images + "/to-cat").status_code == 200  # a redirect to an allowed place
    r = httpx.post(remote_server.url + "/api/predict", timeout=60,
                   json={"image": images + "/cat.png", "prompt": "What is it?", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["image_tokens"] > 0


@pytest.mark.parametrize("path,code,status", [
    ("/page.html", "invalid_image", 400), ("/huge.png", "image_too_large", 413),
    ("/missing.png", "remote_image_unavailable", 400), ("/loop", "remote_image_refused", 400),
    ("/to-metadata", "remote_image_refused", 400), ("/to-localhost", "remote_image_refused", 400)])
def test_bad_answers_and_redirects_are_refused(remote_server, images, path, code, status):
    r = _ask(remote_server, images + path)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/cat.png",
                                 "http://192.168.0.1/cat.png", "http://[::1]:9/cat.png", "http://0.0.0.0:9/x.png",
                                 "http://224.0.0.1/x.png", "ftp://127.0.0.1/x.png"])
def test_private_targets_are_refused_before_connecting(remote_server, url):
    r = _ask(remote_server, url)
    assert r.status_code == 400 and r.json()["error"]["code"] in ("remote_image_refused", "invalid_image_url",
                                                                  "invalid_parameter"), r.text


def test_unlisted_loopback_names_are_refused(remote_server, images):
    HITS.clear()
    port = images.rsplit(":", 1)[1]
    r = _ask(remote_server, f"http://localhost:{port}/cat.png")
    assert r.status_code == 400 and r.json()["error"]["code"] == "remote_image_refused"
    assert HITS == []  # refused on the resolved address: no connection was made


def test_without_the_flag_urls_stay_refused(server, images):
    r = _ask(server, images + "/cat.png")
    assert r.status_code == 400 and r.json()["error"]["code"] == "remote_image_refused"
