"""Send images to a TF Serving REST endpoint and print the top-5 CIFAR-100 labels.

    python -m nam_keras.serving.client cat.png truck.jpg   # localhost:8501, model "nam"
    python -m nam_keras.serving.client --server http://host:8501 --model nam --version 2 img.png

Images that are not 32x32 are resized to 32x32 (CIFAR-100's size) first. `--timeout` is one
deadline for the whole exchange; every malformed reply is an error (exit code 2), and the
connection is direct (proxy variables are not used).
"""

import argparse
import email.errors
import http.client
import io
import json
import os
import sys
import time
import urllib.parse

import numpy as np

from nam_keras.cifar100 import CIFAR100_LABELS

#: Largest image file and decoded size accepted (a CIFAR image is 32x32).
MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_PIXELS = 40_000_000
#: Largest reply read: 100 float probabilities per image, with room to spare.
MAX_REPLY_BYTES_PER_IMAGE = 64 << 10
#: Longest single socket wait (the platform's limit is far below `--timeout 1e300`).
MAX_SOCKET_TIMEOUT_S = 1e6
#: Class ids per prediction (`top5_classes`), and how far over 1 a probability may round.
TOP_K = 5
PROBABILITY_SLACK = 1e-3


def load_image(path):
    """An image file as uint8 (32, 32, 3) RGB, resized when it is another size.

    Files over `MAX_IMAGE_BYTES` or images over `MAX_IMAGE_PIXELS` are refused
    before they are decoded (a small PNG can decode to gigabytes).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_IMAGE_BYTES >> 20} MB; not a CIFAR image.")
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"{path}: {img.width}x{img.height} pixels is more than this client decodes "
                    f"({MAX_IMAGE_PIXELS:,}); resize it first."
                )
            img = img.convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image ({err}).") from None


def build_request(images):
    """TF Serving's REST `predict` body (row format) for uint8 images (N, 32, 32, 3)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(
            "expected uint8 images of shape (N, 32, 32, 3); "
            f"received {images.dtype} {images.shape}."
        )
    return {
        "signature_name": "serving_default",
        "instances": [{"images": image.tolist()} for image in images],
    }


def predict_url(server, model, version=None):
    """The REST `predict` URL of `model` (a given `version`, else the latest)."""
    base = server.rstrip("/")
    if "://" not in base:
        base = "http://" + base
    return f"{base}/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that gives up at `deadline` (a `time.monotonic()`)."""

    def __init__(self, sock, deadline):
        super().__init__()
        self._sock, self._deadline = sock, deadline
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open while read

    def readable(self):
        return True

    def readinto(self, buffer):
        self._sock.settimeout(_remaining(self._deadline))
        return self._raw.readinto(buffer)

    def close(self):
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What `HTTPResponse` reads from: `makefile` gives a `_DeadlineReader`."""

    def __init__(self, sock, deadline):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineMixin:
    """Connects, sends and reads (status line, each header, the body) by one deadline."""

    def __init__(self, host, port, deadline):
        super().__init__(host, port)
        self.deadline = deadline

    def connect(self):
        self.timeout = _remaining(self.deadline)
        super().connect()

    def send(self, data):
        if self.sock is not None:
            self.sock.settimeout(_remaining(self.deadline))
        super().send(data)

    def response_class(self, sock, *args, **kwargs):
        """The reply, read through `_DeadlineSocket` (`getresponse` calls this)."""
        return http.client.HTTPResponse(_DeadlineSocket(sock, self.deadline), *args, **kwargs)


class _HTTPConnection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    pass


def _remaining(deadline):
    """Seconds left before `deadline` (for a socket timeout); `TimeoutError` when none."""
    left = deadline - time.monotonic()
    if not left > 0:
        raise TimeoutError("deadline passed")
    return min(left, MAX_SOCKET_TIMEOUT_S)


def _printable(text, n=2000):
    """At most `n` characters of a server's `text`, with control characters as spaces."""
    return "".join(c if c.isprintable() else " " for c in text[:n])


def _connection(url, deadline):
    """An unopened `_HTTPConnection` (or HTTPS) to `url`'s host, and the request path."""
    parts = urllib.parse.urlsplit(url)
    kinds = {"http": _HTTPConnection, "https": _HTTPSConnection}
    if parts.scheme not in kinds or not parts.hostname:
        raise ValueError(f"{url}: expected an http:// or https:// URL with a host.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return kinds[parts.scheme](parts.hostname, parts.port, deadline), path


def _read_reply(response, limit, deadline, url):
    """The reply body, read in chunks under an overall deadline and a size cap."""
    if response.length is not None and response.length > limit:
        raise RuntimeError(f"{url}: the reply exceeds {limit:,} bytes; not a prediction.")
    chunks, size = [], 0
    while True:
        _remaining(deadline)
        chunk = response.read1(1 << 16)  # what has arrived: the deadline is checked often
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise RuntimeError(f"{url}: the reply exceeds {limit:,} bytes; not a prediction.")
        chunks.append(chunk)
    if response.length:  # the server closed the connection early
        raise RuntimeError(
            f"{url}: the reply ends {response.length:,} bytes short of its Content-Length."
        )
    return b"".join(chunks)


def _exchange(conn, path, body, limit, url):
    """POSTs `body` on the connected `conn`; the reply's body, or `RuntimeError`."""
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        detail = response.read1(2000).decode(errors="replace")
        raise RuntimeError(
            f"{url}: HTTP {response.status} {_printable(response.reason, 200)}: "
            f"{_printable(detail)}"
        )
    return _read_reply(response, limit, conn.deadline, url)


def _post(url, body, limit, timeout):
    """The reply body of a POST to `url`, all of it within `timeout` seconds."""
    conn, path = _connection(url, time.monotonic() + timeout)
    try:
        try:
            conn.connect()
        except OSError as err:
            if isinstance(err, TimeoutError):
                raise
            raise RuntimeError(
                f"{url}: cannot reach the server ({err}). Is TF Serving running?"
            ) from None
        return _exchange(conn, path, body, limit, url)
    except TimeoutError:
        raise RuntimeError(
            f"{url}: the {timeout:g} s timeout ran out before a complete reply."
        ) from None
    except (http.client.HTTPException, email.errors.MessageError, ValueError) as err:
        raise RuntimeError(
            f"{url}: malformed HTTP reply ({type(err).__name__}: {_printable(str(err), 200)})."
        ) from None
    except OSError as err:
        raise RuntimeError(f"{url}: the connection failed ({err}).") from None
    finally:
        conn.close()


def _decode(raw, url):
    """The JSON value of the reply body `raw`, or `RuntimeError`."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise RuntimeError(f"{url}: the reply is not JSON (starts {raw[:200]!r}).") from None


def _is_number(value, low, high):
    """Whether `value` is a JSON number (not a bool) in [low, high]; False for NaN."""
    return type(value) in (int, float) and low <= value <= high


def _check_prediction(pred):
    """A prediction's `(top-5 class ids, their probabilities)`; `ValueError` if malformed."""
    n = len(CIFAR100_LABELS)
    if not isinstance(pred, dict):
        raise ValueError(f"not an object: {_printable(repr(pred), 100)}")
    classes, probabilities = pred.get("top5_classes"), pred.get("probabilities")
    if not (
        isinstance(classes, list)
        and len(classes) == TOP_K
        and all(type(c) is int and 0 <= c < n for c in classes)
    ):
        shown = _printable(repr(classes), 100)
        raise ValueError(f"top5_classes {shown} are not {TOP_K} integers in 0..{n - 1}")
    if not (
        isinstance(probabilities, list)
        and len(probabilities) == n
        and all(_is_number(p, 0.0, 1.0 + PROBABILITY_SLACK) for p in probabilities)
    ):
        raise ValueError(f"probabilities are not {n} numbers in [0, 1]")
    return classes, [float(probabilities[c]) for c in classes]


def parse_reply(reply, n_images, url):
    """`[(top-5 class ids, their probabilities)]` from a `predict` reply, checked.

    Class ids must be JSON integers in 0..99 (TF Serving writes the int32
    `top5_classes` as such), probabilities 100 finite numbers in [0, 1].
    """
    predictions = reply.get("predictions") if isinstance(reply, dict) else None
    if not isinstance(predictions, list) or len(predictions) != n_images:
        got = len(predictions) if isinstance(predictions, list) else "no"
        raise RuntimeError(
            f"{url}: expected {n_images} predictions, received {got} "
            f"(reply starts {_printable(str(reply), 200)!r})."
        )
    out = []
    for i, pred in enumerate(predictions):
        try:
            out.append(_check_prediction(pred))
        except ValueError as err:
            raise RuntimeError(f"{url}: prediction {i} is malformed ({err}).") from None
    return out


def predict(url, images, timeout=30.0):
    """POSTs the images; returns a list of `(top5 class ids, their probabilities)`.

    `timeout` is one deadline for the whole exchange: connecting, sending, the
    status line, each header and the body (a server that drips its reply is cut
    off). Every failure, a malformed reply included, is a `RuntimeError` that
    names the URL. The connection is direct: proxy variables are not used.
    """
    if not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds; received {timeout}")
    body = json.dumps(build_request(images)).encode()
    limit = MAX_REPLY_BYTES_PER_IMAGE * len(images) + (1 << 16)
    raw = _post(url, body, limit, timeout)
    return parse_reply(_decode(raw, url), len(images), url)


def main(argv=None):
    """The client's command line; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m nam_keras.serving.client", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("images", nargs="+", help="PNG/JPEG files")
    p.add_argument("--server", default="http://localhost:8501", help="TF Serving REST address")
    p.add_argument("--model", default="nam", help="MODEL_NAME given to TF Serving")
    p.add_argument("--version", type=int, help="a model version (default: the latest)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for the whole request, reply included"
    )
    args = p.parse_args(argv)
    if not 0 < args.timeout < float("inf"):
        p.error(f"--timeout must be a positive number of seconds; received {args.timeout}")
    try:
        images = np.stack([load_image(path) for path in args.images])
        results = predict(predict_url(args.server, args.model, args.version), images, args.timeout)
    except (ValueError, RuntimeError) as err:
        print(f"client: error: {err}", file=sys.stderr)
        return 2
    for path, (classes, probs) in zip(args.images, results):
        labels = ", ".join(f"{CIFAR100_LABELS[c]} {p:.1%}" for c, p in zip(classes, probs))
        print(f"{path}: {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
