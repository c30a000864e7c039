"""The TF Serving REST client against a stub server."""

import http.server
import json
import threading
import typing

import numpy as np
import pytest

from nam_keras import client


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
