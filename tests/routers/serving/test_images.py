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
        with pytest.raises(ScorerError, match=rf"Image host '127.0.0.1:{listener.port}' is not in images.allow_hosts \(empty\); not fetched"):
            load_image(url, ImageLimits())
        # the host alone allows the scheme's default port only, never another port on it
        with pytest.raises(ScorerError, match=rf"'127.0.0.1:{listener.port}' is not in images.allow_hosts \(127.0.0.1\)"):
            load_image(url, ImageLimits(allow_hosts=("127.0.0.1",)))
        with pytest.raises(ScorerError, match="not in images.allow_hosts"):
            load_image(url, ImageLimits(allow_hosts=(f"127.0.0.1:{listener.port + 1}", f"localhost:{listener.port}")))
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
    limits = ImageLimits(allow_hosts=(image_server.removeprefix("http://"),), max_bytes=1000, fetch_timeout_ms=300)
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
    from routers.probes import LastTokenProbeConfig, build_probe
    from routers.probes.mlp import MLPConfig
    from routers.serving.prefill import BackboneKey, PrefillGroup, ProbeMember
    from tests.routers.test_probe_support import tiny_vl_model

    folder = tiny_vl_model(tmp_path_factory.mktemp("vl"))
    backbone = TruncatedBackbone(BackboneConfig(str(folder), layer=2))  # processor loaded from the folder
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


@pytest.mark.parametrize(
    "entries,url,allowed",
    [
        (("allowed",), "http://allowed/x.png", True),
        (("allowed",), "http://allowed:80/x.png", True),
        (("allowed",), "https://allowed/x.png", True),
        (("allowed",), "http://allowed:8080/x.png", False),  # the host alone is its default port only
        (("allowed",), "http://allowed:443/x.png", False),
        (("allowed:8080",), "http://allowed:8080/x.png", True),
        (("allowed:8080",), "http://allowed/x.png", False),
        (("Allowed:8080",), "http://ALLOWED:8080/x.png", True),
        (("[::1]:8080",), "http://[::1]:8080/x.png", True),
        (("[::1]:8080",), "http://[::1]/x.png", False),
        (("allowed",), "http://allowed.evil/x.png", False),
    ],
)
def test_the_allowlist_matches_host_and_port(entries, url, allowed):
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    assert ImageLimits(allow_hosts=entries).allows(parts.scheme, parts.hostname, parts.port) is allowed


@pytest.mark.parametrize("entry", ["allowed:", "allowed:http", "::1", "allowed:99999", "http://allowed", "a b", "user@host"])
def test_a_bad_allowlist_entry_is_refused(entry):
    with pytest.raises(ValueError, match=r"`images.allow_hosts` entry .* write `host` or `host:port`"):
        ImageLimits(allow_hosts=(entry,))


def test_a_bad_allowlist_entry_is_a_policy_error_at_its_line(tmp_path):
    from extproc import PolicyError, load_policy

    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nbackends:\n  small: {cluster: small, model: s}\ndefault: small\nscorers:\n  probe:\n"
        "    kind: probe\n    checkpoints: {p: unused}\n    remote: {target: '127.0.0.1:9'}\n"
        "    images:\n      allow_hosts: ['cdn.example.com:https']\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    [problem] = info.value.problems
    assert problem.line == 11 and "'cdn.example.com:https' has a bad port" in problem.message


def test_the_per_request_image_keys_have_declared_defaults(tmp_path):
    from extproc import load_policy

    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nbackends:\n  small: {cluster: small, model: s}\ndefault: small\nscorers:\n  probe:\n"
        "    kind: probe\n    checkpoints: {p: unused}\n    remote: {target: '127.0.0.1:9'}\n"
        "    images: {max_images: 3, allow_hosts: ['cdn.example.com', 'img.example.com:8443']}\n"
    )
    images = load_policy(path).scorers["probe"].images
    assert images == ImageLimits(max_images=3, allow_hosts=("cdn.example.com", "img.example.com:8443"))
    assert (images.max_total_bytes, images.max_total_pixels) == (ImageLimits().max_total_bytes, ImageLimits().max_total_pixels)


class DecodeSpy:
    """Stands in for the pixel decoding: counts the images decoded (returning a 1x1 image,
    so no test allocates gigapixels) and advances a fake clock by ``step`` each time."""

    def __init__(self, step: float = 0.0) -> None:
        self.decoded = 0
        self.now = 0.0
        self.step = step

    def __call__(self, image):
        from PIL import Image

        self.decoded += 1
        self.now += self.step
        return Image.new("RGB", (1, 1))

    def clock(self) -> float:
        return self.now


@pytest.fixture()
def decode_spy(monkeypatch):
    from routers.serving import images

    spy = DecodeSpy()
    monkeypatch.setattr(images, "_decode_pixels", spy)
    return spy


def image_message(urls) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "compare"}] + [
        {"type": "image_url", "image_url": {"url": url}} for url in urls
    ]}]  # fmt: skip


def test_eight_huge_images_in_one_message_are_refused_by_the_request_budget(decode_spy):
    """The issue's case: eight 6300x6300 images (each under max_pixels) in one message. The
    first is decoded; the second would take the request over max_total_pixels, so it and
    the rest are never decoded."""
    huge = as_data_url(png_bytes((6300, 6300), "1"))
    with pytest.raises(ScorerError, match="over images.max_total_pixels=50000000; not decoded"):
        with_loaded_images(image_message([huge] * 8), ImageLimits())
    assert decode_spy.decoded == 1


def test_too_many_images_or_bytes_are_refused_before_any_is_decoded(decode_spy):
    small = data_url((1, 2, 3), 8)
    with pytest.raises(ScorerError, match="has 17 images, over images.max_images=16; none decoded"):
        with_loaded_images(image_message([small] * 17), ImageLimits())
    assert 30 < len(small) * 3 // 4 < 100
    with pytest.raises(ScorerError, match="over images.max_total_bytes=300; none decoded"):
        with_loaded_images(image_message([small] * 10), ImageLimits(max_total_bytes=300))
    assert decode_spy.decoded == 0
    assert len(with_loaded_images(image_message([small] * 16), ImageLimits())[0]["content"]) == 17


def test_fetched_images_count_against_the_request_budget(image_server, decode_spy):
    size = len(png_bytes((9, 7)))  # what /ok.png serves
    limits = ImageLimits(allow_hosts=(image_server.removeprefix("http://"),), max_total_bytes=2 * size + 1)
    with pytest.raises(ScorerError, match=rf"{3 * size} bytes, over images.max_total_bytes={2 * size + 1}; not decoded"):
        with_loaded_images(image_message([f"{image_server}/ok.png"] * 4), limits)
    assert decode_spy.decoded == 2


def test_the_deadline_is_checked_between_images(decode_spy):
    """Each decode takes one (fake) second: with the deadline at 1.5 s, two images are read
    and the third is not; the request fails as a scorer failure."""
    decode_spy.step = 1.0
    small = data_url((4, 5, 6), 8)
    with pytest.raises(ScorerError, match="deadline passed after 2 of its images were read"):
        with_loaded_images(image_message([small] * 5), ImageLimits(), deadline=1.5, clock=decode_spy.clock)
    assert decode_spy.decoded == 2


def test_a_vision_language_backbone_loads_without_torchvision_and_scores_an_image(tmp_path):
    """A tiny random-init Qwen2-VL saved as a model folder (image processor, tokenizer,
    weights), trained-probe checkpoints on it, loaded by the `probe` entry point the server
    uses, scoring a request with a data: image through the serving prefill."""
    import importlib.util

    from routers.serving.loaders import PROBE_LOADER
    from tests.routers.serving.support import probe_checkpoints, probe_spec
    from tests.routers.test_probe_support import tiny_vl_model

    folders = probe_checkpoints(tiny_vl_model(tmp_path), tmp_path / "ck")
    scorer = PROBE_LOADER.load(probe_spec(folders))
    image = {"type": "image_url", "image_url": {"url": data_url((120, 40, 200), 40)}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what is it"}]}]

    async def main():
        try:
            return await scorer.score(request(messages), deadline=far())
        finally:
            await scorer.close()

    scores = asyncio.run(main())
    assert set(scores.values) == set(folders) and all(0.0 < v < 1.0 for v in scores.values.values())
    if importlib.util.find_spec("torchvision") is None:  # the documented install
        assert "ImagesOnly" in type(scorer.group.backbone.processor).__name__
