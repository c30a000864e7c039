"""The TF Serving REST client against a stub server."""

import http.server
import json
import threading
import time
import typing

import numpy as np
import pytest

from nam_keras.serving import client


class _StubServing(http.server.BaseHTTPRequestHandler):
    received: typing.ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, self.headers["Content-Type"], body))
        n = len(body["instances"])
        probs = [[0.0] * 100 for _ in range(n)]
        for p in probs:
            p[3], p[30], p[55], p[8], p[99] = 0.5, 0.2, 0.1, 0.05, 0.04
        reply = {
            "predictions": [{"probabilities": p, "top5_classes": [3, 30, 55, 8, 99]} for p in probs]
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_client_sends_the_tf_serving_rest_body(tmp_path, capsys):
    from PIL import Image

    images = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(image).save(paths[-1])
    server = http.server.HTTPServer(("127.0.0.1", 0), _StubServing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert client.main([*paths, "--server", f"http://127.0.0.1:{port}", "--model", "nam"]) == 0
    finally:
        server.shutdown()
    path, content_type, body = _StubServing.received[-1]
    assert path == "/v1/models/nam:predict" and content_type == "application/json"
    assert body == {
        "signature_name": "serving_default",
        "instances": [{"images": image.tolist()} for image in images],
    }
    out = capsys.readouterr().out
    assert f"{paths[0]}: bear 50.0%, dolphin 20.0%, otter 10.0%, bicycle 5.0%, worm 4.0%" in out


def test_client_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 32, 32, 3\)"):
        client.build_request(np.zeros((1, 32, 32, 3), np.float32))
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    assert client.main([str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert (
        client.predict_url("localhost:8501", "nam", 2)
        == "http://localhost:8501/v1/models/nam/versions/2:predict"
    )


class _ScriptedServer(http.server.BaseHTTPRequestHandler):
    """Replies with `reply` (bytes), optionally dripping it slowly."""

    reply = b""
    drip_s = 0.0

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        for i in range(0, len(self.reply), 8 if self.drip_s else len(self.reply) or 1):
            self.wfile.write(self.reply[i : i + (8 if self.drip_s else len(self.reply))])
            self.wfile.flush()
            time.sleep(self.drip_s)

    def log_message(self, *args):
        pass


def _serve(reply, drip_s=0.0):
    handler = type("H", (_ScriptedServer,), {"reply": reply, "drip_s": drip_s})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1/models/nam:predict"


def _prediction(classes=(3, 30, 55, 8, 99)):
    return {"probabilities": [0.01] * 100, "top5_classes": list(classes)}


IMAGES = np.zeros((2, 32, 32, 3), np.uint8)


@pytest.mark.parametrize(
    "reply, message",
    [
        ([1, 2], "expected 2 predictions, received no"),
        ({"predictions": [_prediction()]}, "expected 2 predictions, received 1"),
        ({"predictions": [_prediction(), {"top5_classes": [1]}]}, "prediction 1 is malformed"),
        (
            {"predictions": [_prediction(), _prediction((1, 2, 3, 4, 100))]},
            r"class ids \[1, 2, 3, 4, 100\] outside 0..99",
        ),
        ({"predictions": [_prediction((-1, 2, 3, 4, 5)), _prediction()]}, "outside 0..99"),
        ("not json", "the reply is not JSON"),
    ],
)
def test_malformed_replies_are_clear_errors(reply, message):
    body = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
    server, url = _serve(body)
    try:
        with pytest.raises(RuntimeError, match=message):
            client.predict(url, IMAGES, timeout=10)
    finally:
        server.shutdown()


def test_a_slow_dripping_server_is_cut_off_at_the_deadline():
    server, url = _serve(json.dumps({"predictions": [_prediction()] * 2}).encode(), drip_s=0.2)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="no complete reply within the deadline"):
            client.predict(url, IMAGES, timeout=1.0)
    finally:
        server.shutdown()
    assert time.monotonic() - start < 3.0


def test_a_huge_reply_is_not_read_into_memory(monkeypatch):
    monkeypatch.setattr(client, "MAX_REPLY_BYTES_PER_IMAGE", 100)
    server, url = _serve(b"[" + b"0," * 200_000 + b"0]")
    try:
        with pytest.raises(RuntimeError, match="the reply exceeds"):
            client.predict(url, IMAGES, timeout=10)
    finally:
        server.shutdown()


def test_a_decompression_bomb_image_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000)).save(path)  # a small file, 9 M pixels
    monkeypatch.setattr(client, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ValueError, match=r"3000x3000 pixels is more than this client decodes"):
        client.load_image(path)


def test_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        client.main(["x.png", "--timeout", "0"])
    assert "--timeout must be a positive number" in capsys.readouterr().err
