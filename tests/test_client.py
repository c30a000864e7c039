"""The TF Serving REST client against a stub server."""

import http.server
import json
import re
import socket
import socketserver
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
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert client.main([*paths, "--server", f"http://127.0.0.1:{port}", "--model", "nam"]) == 0
    finally:
        server.shutdown()
        server.server_close()
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
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        client.predict("http://127.0.0.1:1", np.zeros((1, 32, 32, 3), np.uint8), float("nan"))


# --- a raw socket server that can send any bytes, malformed or slowly ---------------------


class _RawReply(socketserver.BaseRequestHandler):
    """Reads one HTTP request, then sends `pieces`, sleeping `gap_s` before each one."""

    pieces: typing.ClassVar[tuple] = ()
    gap_s = 0.0

    def handle(self):
        try:
            stream = self.request.makefile("rb")
            length = 0
            while (line := stream.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            stream.read(length)
            for piece in self.pieces:
                time.sleep(self.gap_s)
                self.request.sendall(piece)
        except OSError:
            pass  # the client gave up first, as it should


@pytest.fixture
def serve():
    """`serve(pieces, gap_s)` starts a raw server on 127.0.0.1; returns its address."""
    servers = []

    def start(pieces, gap_s=0.0):
        handler = type("H", (_RawReply,), {"pieces": tuple(pieces), "gap_s": gap_s})
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def png(tmp_path):
    """A 32x32 PNG file's path."""
    from PIL import Image

    path = str(tmp_path / "img.png")
    Image.new("RGB", (32, 32)).save(path)
    return path


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def _http(body, head=OK, length=True):
    """A whole reply: `head` (status line and headers), Content-Length, `body`."""
    body = body.encode() if isinstance(body, str) else body
    return head + (b"Content-Length: %d\r\n" % len(body) if length else b"") + b"\r\n" + body


def _json(reply):
    return _http(json.dumps(reply))


def _pred(classes=(3, 30, 55, 8, 99), probabilities=None):
    probabilities = [0.01] * 100 if probabilities is None else probabilities
    return {"probabilities": probabilities, "top5_classes": list(classes)}


def _preds(second):
    """A reply of two predictions whose second one is `second`."""
    return _json({"predictions": [_pred(), second]})


def _run_main(png, address, capsys, timeout=5.0):
    """`main`'s exit code and stderr for two images sent to `address`."""
    code = client.main([png, png, "--server", address, "--timeout", str(timeout)])
    return code, capsys.readouterr().err


MALFORMED = {
    "garbage status line": ([b"garbage\r\n\r\n"], "malformed HTTP reply.*BadStatusLine"),
    "status out of range": ([b"HTTP/1.1 1 OK\r\n\r\n"], "malformed HTTP reply"),
    "no reply at all": ([], "malformed HTTP reply.*closed connection"),
    "101 headers": (
        [OK + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n"],
        "malformed HTTP reply.*more than 100 headers",
    ),
    "70 KB header line": ([OK + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n"], "LineTooLong"),
    "bad chunk size": (
        [OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"],
        "malformed HTTP reply.*IncompleteRead",
    ),
    "truncated body": (
        [OK + b"Content-Length: 1000\r\n\r\n" + b'{"predictions": ['],
        "the reply ends 983 bytes short of its Content-Length",
    ),
    "HTTP error": (
        [_http("model not found \x1b[31mred", b"HTTP/1.1 404 Not Found\r\n")],
        r"HTTP 404 Not Found: model not found  \[31mred",
    ),
    "not JSON": ([_http("not json")], "the reply is not JSON"),
    "bad UTF-8": ([_http(b'{"a": "\xff\xfe"}')], "the reply is not JSON"),
    "nested 100,000 deep": ([_http("[" * 100_000)], "the reply is not JSON"),
    "a list": ([_json([1, 2])], "expected 2 predictions, received no"),
    "error reply": ([_json({"error": "oops"})], "expected 2 predictions, received no"),
    "one prediction": ([_json({"predictions": [_pred()]})], "expected 2 predictions, received 1"),
    "not a dict": ([_preds([1, 2])], "prediction 1 is malformed.*not an object"),
    "no probabilities": ([_preds({"top5_classes": [1]})], "prediction 1 is malformed"),
    "class 100": ([_preds(_pred((1, 2, 3, 4, 100)))], r"\[1, 2, 3, 4, 100\] are not 5 integers"),
    "class -1": ([_preds(_pred((-1, 2, 3, 4, 5)))], "not 5 integers in 0..99"),
    "class 1e400": ([_http('{"predictions": [{"top5_classes": [1e400, 1, 2, 3, 4]}, 0]}')], "in 0"),
    "class 3.5": ([_preds(_pred((3.5, 1, 2, 3, 4)))], "not 5 integers in 0..99"),
    "class true": ([_preds(_pred((True, 1, 2, 3, 4)))], "not 5 integers in 0..99"),
    "class '3'": ([_preds(_pred(("3", 1, 2, 3, 4)))], "not 5 integers in 0..99"),
    "class huge": ([_preds(_pred((10**400, 1, 2, 3, 4)))], "not 5 integers in 0..99"),
    "4 classes": ([_preds(_pred((1, 2, 3, 4)))], "not 5 integers in 0..99"),
    "classes a dict": ([_preds(_pred({"a": 1}))], "not 5 integers in 0..99"),
    "NaN probability": ([_preds(_pred(probabilities=[float("nan")] * 100))], "100 numbers in"),
    "inf probability": ([_preds(_pred(probabilities=[0.01] * 99 + [1e400]))], "100 numbers"),
    "huge probability": ([_preds(_pred(probabilities=[10**400] * 100))], "100 numbers in"),
    "negative probability": ([_preds(_pred(probabilities=[-0.5] * 100))], "100 numbers in"),
    "string probability": ([_preds(_pred(probabilities=["0.5"] * 100))], "100 numbers in"),
    "99 probabilities": ([_preds(_pred(probabilities=[0.01] * 99))], "100 numbers in"),
    "probabilities a dict": ([_preds(_pred(probabilities={"3": 0.5}))], "100 numbers in"),
}


@pytest.mark.parametrize("pieces, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_replies_are_clear_errors(serve, png, capsys, pieces, message):
    address = serve(pieces)
    code, err = _run_main(png, address, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"client: error: {address}/v1/models/nam:predict: "), err
    assert re.search(message, err), err
    assert "\x1b" not in err


@pytest.mark.parametrize("length", [True, False], ids=["Content-Length", "streamed"])
def test_a_huge_reply_is_not_read_into_memory(serve, png, capsys, monkeypatch, length):
    monkeypatch.setattr(client, "MAX_REPLY_BYTES_PER_IMAGE", 100)
    address = serve([_http(b"[" + b"0," * 200_000 + b"0]", length=length)])
    code, err = _run_main(png, address, capsys)
    assert code == 2 and "the reply exceeds 65,736 bytes" in err, err


SLOW = {
    # 20 headers 0.2 s apart: urllib's per-read timeout never fires (4 s for --timeout 0.5)
    "dripping headers": ([OK] + [b"X-Drip: y\r\n"] * 20 + [b"\r\n{}"], 0.2),
    "dripping body": (
        [OK + b"Content-Length: 400\r\n\r\n"] + [b" " * 8] * 50,
        0.05,
    ),
    "silent server": ([b""], 3.0),
    "endless 100 Continue": ([b"HTTP/1.1 100 Continue\r\n\r\n"] * 100, 0.05),
}


@pytest.mark.parametrize("pieces, gap_s", SLOW.values(), ids=SLOW.keys())
def test_timeout_is_one_deadline_for_the_whole_exchange(serve, png, capsys, pieces, gap_s):
    address = serve(pieces, gap_s)
    start = time.monotonic()
    code, err = _run_main(png, address, capsys, timeout=0.5)
    elapsed = time.monotonic() - start
    assert code == 2, err
    url = f"{address}/v1/models/nam:predict"
    assert f"client: error: {url}: the 0.5 s timeout ran out before a complete reply" in err, err
    assert elapsed < 3.0, elapsed  # the 0.5 s deadline, with room for a loaded machine


def test_an_unreachable_server_is_a_clear_error(png, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    code, err = _run_main(png, f"127.0.0.1:{port}", capsys)
    assert code == 2 and "cannot reach the server" in err, err


def test_a_good_reply_is_read_with_any_timeout(serve, png, capsys):
    address = serve([_json({"predictions": [_pred(), _pred((0, 1, 2, 3, 4), [0.2] * 100)]})])
    assert client.main([png, png, "--server", address, "--timeout", "1e300"]) == 0
    out = capsys.readouterr().out
    assert f"{png}: bear 1.0%, dolphin 1.0%" in out and "apple 20.0%" in out


def test_a_chunked_reply_is_read(serve, png, capsys):
    body = json.dumps({"predictions": [_pred()] * 2}).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 999]), body[i : i + 999])
        for i in range(0, len(body), 999)
    )
    address = serve([OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"])
    code, err = _run_main(png, address, capsys)
    assert code == 0, err
