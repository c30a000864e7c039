"""Send images to a TF Serving REST endpoint and print the top-5 CIFAR-100 labels.

    python -m nam_keras.serving.client cat.png truck.jpg   # localhost:8501, model "nam"
    python -m nam_keras.serving.client --server http://host:8501 --model nam --version 2 img.png

Images that are not 32x32 are resized to 32x32 (CIFAR-100's size) first.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from nam_keras.cifar100 import CIFAR100_LABELS

#: Largest image file and decoded size accepted (a CIFAR image is 32x32).
MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_PIXELS = 40_000_000
#: Largest reply read: 100 float probabilities per image, with room to spare.
MAX_REPLY_BYTES_PER_IMAGE = 64 << 10


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


def _read_reply(response, limit, deadline, url):
    """The reply body, read in chunks under an overall deadline and a size cap."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: no complete reply within the deadline.")
        chunk = response.read1(1 << 16)  # what has arrived: the deadline is checked often
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise RuntimeError(f"{url}: the reply exceeds {limit:,} bytes; not a prediction.")
        chunks.append(chunk)


def parse_reply(reply, n_images, url):
    """`[(top-5 class ids, their probabilities)]` from a `predict` reply, checked."""
    predictions = reply.get("predictions") if isinstance(reply, dict) else None
    if not isinstance(predictions, list) or len(predictions) != n_images:
        got = len(predictions) if isinstance(predictions, list) else "no"
        raise RuntimeError(
            f"{url}: expected {n_images} predictions, received {got} "
            f"(reply starts {str(reply)[:200]!r})."
        )
    out = []
    for i, pred in enumerate(predictions):
        try:
            classes = [int(c) for c in pred["top5_classes"]]
            probabilities = pred["probabilities"]
            if not all(0 <= c < len(CIFAR100_LABELS) for c in classes):
                raise ValueError(f"class ids {classes} outside 0..{len(CIFAR100_LABELS) - 1}")
            out.append((classes, [float(probabilities[c]) for c in classes]))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise RuntimeError(f"{url}: prediction {i} is malformed ({err}).") from None
    return out


def predict(url, images, timeout=30.0):
    """POSTs the images; returns a list of `(top5 class ids, their probabilities)`.

    `timeout` bounds the whole exchange (connecting, waiting, reading), not
    only each socket operation.
    """
    deadline = time.monotonic() + timeout
    body = json.dumps(build_request(images)).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    limit = MAX_REPLY_BYTES_PER_IMAGE * len(images) + (1 << 16)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = _read_reply(response, limit, deadline, url)
    except urllib.error.HTTPError as err:
        detail = err.read(2000).decode(errors="replace")
        raise RuntimeError(f"{url}: HTTP {err.code}: {detail}") from None
    except urllib.error.URLError as err:
        raise RuntimeError(
            f"{url}: cannot reach the server ({err.reason}). Is TF Serving running?"
        ) from None
    except (TimeoutError, OSError) as err:
        raise RuntimeError(f"{url}: no reply within {timeout:g} s ({err}).") from None
    try:
        reply = json.loads(raw)
    except ValueError:
        raise RuntimeError(f"{url}: the reply is not JSON (starts {raw[:200]!r}).") from None
    return parse_reply(reply, len(images), url)


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
