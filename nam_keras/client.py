"""Send images to a TF Serving REST endpoint and print the top-5 CIFAR-100 labels.

    python -m nam_keras.client cat.png truck.jpg                       # localhost:8501, model "nam"
    python -m nam_keras.client --server http://host:8501 --model nam --version 2 img.png

Images that are not 32x32 are resized to 32x32 (CIFAR-100's size) first.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import numpy as np

from nam_keras.data import CIFAR100_LABELS


def load_image(path):
    """An image file as uint8 (32, 32, 3) RGB, resized when it is another size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
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


def predict(url, images, timeout=30.0):
    """POSTs the images; returns a list of `(top5 class ids, their probabilities)`."""
    body = json.dumps(build_request(images)).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        raise RuntimeError(f"{url}: HTTP {err.code}: {detail}") from None
    except urllib.error.URLError as err:
        raise RuntimeError(
            f"{url}: cannot reach the server ({err.reason}). Is TF Serving running?"
        ) from None
    if "predictions" not in reply:
        raise RuntimeError(f"{url}: unexpected reply {str(reply)[:200]!r}")
    out = []
    for pred in reply["predictions"]:
        classes = [int(c) for c in pred["top5_classes"]]
        probs = [float(pred["probabilities"][c]) for c in classes]
        out.append((classes, probs))
    return out


def main(argv=None):
    """The client's command line; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m nam_keras.client", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("images", nargs="+", help="PNG/JPEG files")
    p.add_argument("--server", default="http://localhost:8501", help="TF Serving REST address")
    p.add_argument("--model", default="nam", help="MODEL_NAME given to TF Serving")
    p.add_argument("--version", type=int, help="a model version (default: the latest)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds")
    args = p.parse_args(argv)
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
