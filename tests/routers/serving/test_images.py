"""Images under the policy's limits: bombs, broken files, hosts off the allowlist, and a
broken image failing only its own request."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import random
import socket
import struct
import threading
import zlib

import pytest

from extproc import BatchConfig, ImageLimits, ScorerError
from routers.serving.images import decode_data_url, load_image, with_loaded_images
from tests.routers.serving.support import far, request
from tests.routers.test_probe_support import data_url


def png_bytes(size=(8, 8), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def as_data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def with_declared_size(raw: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR claiming another size (CRC fixed): pixels it does not have."""
    start = raw.index(b"IHDR")
    body = struct.pack(">II", width, height) + raw[start + 12 : start + 17]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return raw[:start] + b"IHDR" + body + crc + raw[start + 21 :]


def test_a_good_data_url_decodes_to_rgb():
    image = decode_data_url(as_data_url(png_bytes((5, 3), "L")), ImageLimits())
    assert image.size == (5, 3) and image.mode == "RGB"


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = png_bytes((7000, 7000), "1")  # 49 megapixels of one colour, a few kilobytes
    assert len(bomb) < 100_000
    with pytest.raises(ScorerError, match="7000x7000 pixels, over images.max_pixels=40000000; not decoded"):
        decode_data_url(as_data_url(bomb), ImageLimits())
    # a header claiming far more than Pillow's own bomb limit is refused the same way
    liar = with_declared_size(png_bytes(), 200_000, 200_000)
    with pytest.raises(ScorerError, match="decompression bomb|over images.max_pixels"):
        decode_data_url(as_data_url(liar), ImageLimits(max_pixels=10**12))


def test_truncated_and_garbage_images_are_scorer_errors():
    raw = png_bytes((64, 64))
    with pytest.raises(ScorerError, match="Cannot decode a data: image"):
        decode_data_url(as_data_url(raw[: len(raw) // 2]), ImageLimits())
    with pytest.raises(ScorerError, match="Cannot decode a data: image"):
        decode_data_url(as_data_url(b"definitely not an image"), ImageLimits())
    with pytest.raises(ScorerError, match="not valid base64"):
        decode_data_url("data:image/png;base64,@@@@", ImageLimits())
    with pytest.raises(ScorerError, match="must be base64-encoded"):
        decode_data_url("data:image/png,rawbytes", ImageLimits())


def test_a_data_url_over_max_bytes_is_refused_before_decoding():
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(buf, format="PNG")
    assert len(buf.getvalue()) > 1000
    with pytest.raises(ScorerError, match="over images.max_bytes=1000"):
        decode_data_url(as_data_url(buf.getvalue()), ImageLimits(max_bytes=1000))


class Listener:
    """A local TCP listener that counts the connections it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> int:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return self.connections


def test_a_host_off_the_allowlist_is_never_contacted():
    listener = Listener()
    try:
        url = f"http://127.0.0.1:{listener.port}/cat.png"
        with pytest.raises(ScorerError, match=r"Image host '127.0.0.1' is not in images.allow_hosts \(empty\); not fetched"):
            load_image(url, ImageLimits())
        with pytest.raises(ScorerError, match="not in images.allow_hosts"):
            load_image(url, ImageLimits(allow_hosts=("images.example.com", "localhost")))
        with pytest.raises(ScorerError, match="not in images.allow_hosts"):
            load_image(f"http://user@127.0.0.1:{listener.port}@images.example.com.evil/x.png", ImageLimits(allow_hosts=("127.0.0.1",)))
        with pytest.raises(ScorerError, match="scheme 'file'"):
            load_image("file:///etc/passwd", ImageLimits(allow_hosts=("127.0.0.1",)))
    finally:
        assert listener.close() == 0  # not one connection was opened


@pytest.fixture()
def image_server():
    """A local HTTP server: /ok.png, /big.png, /redirect, /slow."""
    good = png_bytes((9, 7))
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/ok.png":
                self._send(200, good)
            elif self.path == "/big.png":
                self._send(200, b"x" * 5000)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.end_headers()
            elif self.path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b"x")
                self.wfile.flush()
                release.wait(5)
            else:
                self._send(404, b"")

        def _send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_an_allowed_host_is_fetched_within_its_limits(image_server):
    limits = ImageLimits(allow_hosts=("127.0.0.1",), max_bytes=1000, fetch_timeout_ms=300)
    assert load_image(f"{image_server}/ok.png", limits).size == (9, 7)
    with pytest.raises(ScorerError, match="5000 bytes, over images.max_bytes=1000"):
        load_image(f"{image_server}/big.png", limits)
    with pytest.raises(ScorerError, match="HTTP 302 \\(redirects are not followed\\)"):
        load_image(f"{image_server}/redirect", limits)
    with pytest.raises(ScorerError, match="HTTP 404"):
        load_image(f"{image_server}/missing.png", limits)
    with pytest.raises(ScorerError, match="Cannot fetch|took longer"):
        load_image(f"{image_server}/slow", limits)


def test_messages_get_decoded_images_and_the_request_is_untouched():
    messages = [
        {"role": "system", "content": "look"},
        {"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": data_url((1, 2, 3), 10)}}]},
    ]
    out = with_loaded_images(messages, ImageLimits())
    assert out[0] is messages[0]
    assert out[1]["content"][0] == {"type": "text", "text": "what?"}
    assert out[1]["content"][1]["type"] == "image" and out[1]["content"][1]["image"].size == (10, 10)
    assert messages[1]["content"][1]["type"] == "image_url"


@pytest.fixture(scope="module")
def vl_group(tmp_path_factory):
    """A prefill group on a tiny Qwen2-VL backbone with one last-token probe."""
    import torch

    from routers.backbone import BackboneConfig, TruncatedBackbone
    from routers.mlp import MLPConfig
    from routers.probes import LastTokenProbeConfig, build_probe
    from routers.serving.prefill import BackboneKey, PrefillGroup, ProbeMember
    from tests.routers.test_probe_support import tiny_vl_model, vl_processor

    folder = tiny_vl_model(tmp_path_factory.mktemp("vl"))
    backbone = TruncatedBackbone(BackboneConfig(str(folder), layer=2), processor=vl_processor())
    torch.manual_seed(0)
    probe = build_probe("last_token", LastTokenProbeConfig(32, 2, mlp=MLPConfig(depth=2, width=16)))
    group = PrefillGroup(backbone, BackboneKey.of(str(folder), "cpu", None), BatchConfig(8, 50), ImageLimits(), "vl prefill")
    member = ProbeMember({"p": probe})
    group.join(member)
    return group, member


def test_a_broken_image_fails_only_its_own_request(vl_group):
    group, member = vl_group
    raw = png_bytes((32, 32))

    def image_request(url):
        return request([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it"}]}])

    async def main():
        requests = [
            image_request(data_url((200, 10, 10), 32)),
            image_request(as_data_url(raw[: len(raw) // 2])),  # truncated PNG
            image_request("http://203.0.113.7/x.png"),  # off the allowlist
            request([{"role": "user", "content": "no image at all"}]),
        ]
        return await asyncio.gather(*(group.prefill(r, far(), member) for r in requests), return_exceptions=True)

    good, truncated, remote, text = asyncio.run(main())
    assert 0.0 < good[member.key]["p"] < 1.0 and 0.0 < text[member.key]["p"] < 1.0
    assert isinstance(truncated, ScorerError) and "Cannot decode a data: image" in str(truncated)
    assert isinstance(remote, ScorerError) and "not in images.allow_hosts" in str(remote)


def test_a_text_only_backbone_refuses_images_without_decoding_them(tmp_path):
    from routers.backbone import BackboneConfig, TruncatedBackbone
    from routers.serving.prefill import BackboneKey, PrefillGroup, ProbeMember
    from tests.routers.test_probe_support import tiny_text_model

    backbone = TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path)), layer=1))
    group = PrefillGroup(backbone, BackboneKey.of("text", "cpu", None), BatchConfig(4, 1), ImageLimits(), "text prefill")
    member = ProbeMember({})
    group.join(member)
    bomb = as_data_url(with_declared_size(png_bytes(), 200_000, 200_000))

    async def main():
        try:
            return await group.prefill(request([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bomb}}]}]), far(), member)
        finally:
            await group.close()

    with pytest.raises(ScorerError, match="takes no images"):
        asyncio.run(main())
