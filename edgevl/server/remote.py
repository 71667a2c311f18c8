"""Image URLs fetched safely (--allow-remote-images): no request reaches an address the operator
did not mean to expose (SSRF).

Every hop's host is resolved here and each address checked; the connection then goes to the
checked address itself (with the original Host header and TLS name), so a second DNS answer
cannot swap in another target. Loopback, private, link-local (cloud metadata at 169.254.169.254),
multicast, reserved and unspecified addresses are refused unless the host is listed in
--allow-remote-hosts. Redirects are followed by hand, at most MAX_REDIRECTS, each re-checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from edgevl.server.errors import ApiError, PayloadTooLarge
from edgevl.server.settings import Settings

MAX_REDIRECTS = 3
TIMEOUT_S = 10.0


async def fetch_image(url: str, settings: Settings, param: str) -> bytes:
    """The image's bytes; every way this can fail is a 4xx ApiError. TIMEOUT_S bounds the whole
    fetch, redirects included (httpx's own timeout is per read, which a slow trickle never hits)."""
    try:
        return await asyncio.wait_for(_fetch(url, settings, param), TIMEOUT_S)
    except asyncio.TimeoutError as e:
        raise ApiError(f"the image URL did not answer within {TIMEOUT_S:.0f} s", "remote_image_unavailable",
                       param) from e


async def _fetch(url: str, settings: Settings, param: str) -> bytes:
    allowed = {h.lower() for h in settings.allow_remote_hosts}
    limit = int(settings.max_body_mb * 1024 * 1024)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target = _parse(url, param)
            address = await _checked_address(target, allowed, param)
            request = client.build_request(
                "GET", target.copy_with(host=address), headers={"Host": target.netloc.decode("ascii"),
                                                                "Accept": "image/*"},
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {})
            try:
                resp = await client.send(request, stream=True)
            except httpx.HTTPError as e:
                raise ApiError(f"the image URL could not be fetched ({type(e).__name__})", "remote_image_unavailable",
                               param) from e
            try:
                if resp.is_redirect and "location" in resp.headers:
                    url = str(target.join(resp.headers["location"]))
                    continue
                return await _body(resp, limit, param)
            finally:
                await resp.aclose()
    raise ApiError(f"the image URL redirects more than {MAX_REDIRECTS} times", "remote_image_refused", param)


def _parse(url: str, param: str) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise ApiError("the image URL is not a valid URL", "invalid_image_url", param) from e
    if target.scheme not in ("http", "https") or not target.host:
        raise ApiError("only http(s) image URLs are fetched", "remote_image_refused", param)
    return target


async def _checked_address(target: httpx.URL, allowed: set[str], param: str) -> str:
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ApiError(f"the image host {target.host!r} does not resolve", "remote_image_unavailable", param) from e
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise ApiError(f"the image host {target.host!r} does not resolve", "remote_image_unavailable", param)
    if target.host.lower() not in allowed:
        for a in addresses:
            if not is_public(a):
                raise ApiError(f"the image host {target.host!r} resolves to a non-public address; the server "
                               "fetches only public addresses (or hosts in --allow-remote-hosts)",
                               "remote_image_refused", param)
    return str(addresses[0])


def is_public(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_global and not (a.is_private or a.is_loopback or a.is_link_local or a.is_multicast
                                or a.is_reserved or a.is_unspecified)


async def _body(resp: httpx.Response, limit: int, param: str) -> bytes:
    if resp.status_code != 200:
        raise ApiError(f"the image URL answered HTTP {resp.status_code}", "remote_image_unavailable", param)
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        raise ApiError(f"the image URL is not an image (content type {ctype or 'missing'!r})", "invalid_image",
                       param)
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the image is {length} bytes; the limit is {limit}", "image_too_large", param)
    data = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            data += chunk
            if len(data) > limit:
                raise PayloadTooLarge(f"the image is over the limit of {limit} bytes", "image_too_large", param)
    except httpx.HTTPError as e:
        raise ApiError(f"the image download failed ({type(e).__name__})", "remote_image_unavailable", param) from e
    return bytes(data)
