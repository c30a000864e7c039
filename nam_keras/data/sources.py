"""CIFAR-100 sources as NumPy arrays: TFDS, the local python archive, synthetic data.

Plain Python and NumPy: the archive reader needs no TensorFlow (TFDS, only
when it is the source, imports it). Everything is decoded once into memory
(about 180 MB). `nam_keras.data.pipeline` turns the arrays into batches.
"""

import concurrent.futures
import os
import socket
import tarfile
import warnings
import zlib

import numpy as np

from nam_keras.cifar100 import FINE_TO_COARSE, FULL_SIZES, IMAGE_SHAPE, NUM_CLASSES
from nam_keras.data import safe_pickle
from nam_keras.errors import DataError

#: The data sources (`--dataset`).
SOURCES = ("cifar100", "synthetic")

# Host that TFDS downloads CIFAR-100 from; probed before a download so that an
# offline machine fails in seconds instead of retrying for minutes.
DOWNLOAD_PROBE = ("www.cs.toronto.edu", 443)
PROBE_TIMEOUT_S = 3.0

#: Largest plausible pickle per split: the images (N x 3,072 bytes) plus
#: labels and file names, with room to spare; a larger member is refused unread.
MAX_MEMBER_BYTES = {split: n * 3072 * 5 // 4 + (4 << 20) for split, n in FULL_SIZES.items()}

ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"


_OFFLINE_HELP = (
    "Download cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) on a "
    "machine with internet access and pass it with `data_dir=PATH` (the .tar.gz, its "
    "folder, or the extracted cifar-100-python/ folder), or use `dataset=synthetic` for "
    "a smoke run."
)


# --------------------------------------------------------------------------- sources


def _check_split(images, labels, split, origin):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{origin}: {split} images must be uint8 of shape (N, 32, 32, 3); "
            f"received {images.dtype} {images.shape}."
        )
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"{origin}: {split} has {images.shape[0]} images but labels of shape {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"{origin}: {split} fine labels must lie in 0..{NUM_CLASSES - 1}; "
            f"received {labels.min()}..{labels.max()}."
        )
    if images.shape[0] == 0:
        raise DataError(f"{origin}: the {split} split is empty.")
    if images.shape[0] < FULL_SIZES[split]:
        warnings.warn(
            f"{origin}: {split} split has {images.shape[0]} examples, fewer than "
            f"CIFAR-100's {FULL_SIZES[split]}; using it as a subset.",
            stacklevel=3,
        )
    return images, labels.astype(np.int32)


def _decode_pickle(raw, split, origin):
    """One CIFAR-100 python pickle -> (images NHWC uint8, fine labels)."""
    try:
        entry = safe_pickle.loads(raw)
        data = np.asarray(entry[b"data"])
        labels = np.asarray(entry[b"fine_labels"])
    except safe_pickle.UnsafePickleError as err:
        raise DataError(
            f"{origin}: the {split!r} member was refused before anything in it ran: {err}. "
            "Genuine CIFAR-100 archives hold only data; this one may have been tampered with."
        ) from None
    except Exception as err:  # damaged pickles raise many kinds of error
        raise DataError(
            f"{origin}: the {split!r} member is not a CIFAR-100 python pickle "
            f"({type(err).__name__}: {err})."
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{origin}: {split} b'data' must be uint8 of shape (N, 3072); "
            f"received {data.dtype} {data.shape}."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
    images, labels = _check_split(np.ascontiguousarray(images), labels, split, origin)
    if b"coarse_labels" in entry:
        check_coarse(labels, entry[b"coarse_labels"], split, origin)
    return images, labels


def check_coarse(fine, coarse, split, origin):
    """Refuses a source whose superclass labels disagree with `labels.FINE_TO_COARSE`
    (the table the superclass report uses): a mislabelled or foreign dataset."""
    coarse = np.asarray(coarse).reshape(-1)
    want = np.asarray(FINE_TO_COARSE)[np.asarray(fine)]
    if coarse.shape != want.shape or not np.array_equal(coarse, want):
        bad = int((coarse != want).sum()) if coarse.shape == want.shape else len(want)
        raise DataError(
            f"{origin}: {bad} of the {len(want)} {split} superclass labels disagree with "
            "CIFAR-100's fine-to-coarse table; is this CIFAR-100?"
        )


def _check_size(size, split, what):
    """Refuses a split pickle larger than CIFAR-100's, before it is read."""
    if size > MAX_MEMBER_BYTES[split]:
        raise DataError(
            f"{what} declares {size:,} bytes, more than CIFAR-100's {split} split can hold "
            f"({MAX_MEMBER_BYTES[split]:,}); refused without reading it."
        )


def _split_of(member, path):
    """The split a tar member holds ("train"/"test"), or None for anything
    else; refuses a split member larger than CIFAR-100's before reading it.
    Links and other non-files are ignored: the archive is never extracted."""
    split = os.path.basename(member.name)
    folder = os.path.basename(os.path.dirname(member.name))
    if not (member.isfile() and split in FULL_SIZES and folder in (FOLDER_NAME, "")):
        return None
    _check_size(member.size, split, f"{path}: member {member.name}")
    return split


def _read_archive(path, wanted=tuple(FULL_SIZES)):
    splits = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                split = _split_of(member, path)
                if split in wanted:
                    splits[split] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"{path}: cannot read the CIFAR-100 archive, it is truncated or corrupt "
            f"({type(err).__name__}: {err}). Download it again. {_OFFLINE_HELP}"
        ) from None
    missing = sorted(set(wanted) - set(splits))
    if missing:
        raise DataError(
            f"{path}: the archive has no {FOLDER_NAME}/{' or '.join(missing)} member; "
            f"is it the python version of CIFAR-100 ({ARCHIVE_NAME})?"
        )
    return {s: _decode_pickle(raw, s, path) for s, raw in splits.items()}


def _read_folder(folder, wanted=tuple(FULL_SIZES)):
    out = {}
    for split in wanted:
        path = os.path.join(folder, split)
        _check_size(os.path.getsize(path), split, path)
        with open(path, "rb") as f:
            out[split] = _decode_pickle(f.read(), split, path)
    return out


def read_cifar100_python(path, splits=tuple(FULL_SIZES)):
    """Reads CIFAR-100 from `cifar-100-python.tar.gz` or its extracted folder.

    `path` may be the archive, the extracted `cifar-100-python/` folder, or a
    folder holding either. The archive is read in memory, never extracted.
    Returns `{"train": (images, labels), "test": (images, labels)}` (the
    `splits` asked for) with images uint8 (N, 32, 32, 3) and fine labels int32.

    The files are Python pickles; they are read with `safe_pickle.loads`,
    which refuses anything but plain data (no code runs from the archive),
    and members larger than CIFAR-100's are refused before they are read.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return _read_archive(path, splits)
    if os.path.isdir(path):
        candidates = [
            (path, os.path.isfile(os.path.join(path, "train"))),
            (os.path.join(path, FOLDER_NAME), os.path.isdir(os.path.join(path, FOLDER_NAME))),
        ]
        for folder, ok in candidates:
            if ok:
                missing = [s for s in splits if not os.path.isfile(os.path.join(folder, s))]
                if missing:
                    raise DataError(f"{folder}: missing the CIFAR-100 {missing} file(s).")
                return _read_folder(folder, splits)
        if os.path.isfile(os.path.join(path, ARCHIVE_NAME)):
            return _read_archive(os.path.join(path, ARCHIVE_NAME), splits)
        raise DataError(
            f"{path}: found neither {ARCHIVE_NAME}, a {FOLDER_NAME}/ folder, nor the "
            f"train/test files. {_OFFLINE_HELP}"
        )
    raise DataError(f"{path}: no such file or folder. {_OFFLINE_HELP}")


def _reachable(address, timeout):
    """True when a TCP connection to `address` opens within `timeout` seconds
    (name resolution included, which socket timeouts do not cover)."""

    def connect():
        with socket.create_connection(address, timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout + 0.5)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def check_batch_size(batch_size, n):
    """`DataError` unless a batch of `batch_size` fits in the `n` training examples."""
    if n < batch_size:
        raise DataError(f"batch_size {batch_size} is larger than the {n} training examples.")


def _tfds_arrays(data_dir, wanted=tuple(FULL_SIZES)):
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # TFDS needs TensorFlow, which a JAX-only machine may lack
        raise DataError(
            f"TFDS cannot be imported ({err}): the cifar100 of TFDS needs TensorFlow and "
            f"tensorflow-datasets. {_OFFLINE_HELP}"
        ) from None

    def load(download):
        splits = tfds.load("cifar100", split=list(wanted), data_dir=data_dir, download=download)
        out = {}
        for name, ds in zip(wanted, splits):  # decode once, into memory
            chunks = list(tfds.as_numpy(ds.batch(10_000)))
            keys = ("image", "label", "coarse_label")
            out[name] = tuple(np.concatenate([c[k] for c in chunks]) for k in keys)
        return out

    try:
        arrays = load(download=False)
    except Exception as err:  # not prepared in data_dir (AssertionError or DatasetNotFoundError)
        if not _reachable(DOWNLOAD_PROBE, PROBE_TIMEOUT_S):
            where = data_dir or "the default TFDS folder (~/tensorflow_datasets)"
            raise DataError(
                f"TFDS has no prepared cifar100 in {where} and the download host "
                f"{DOWNLOAD_PROBE[0]} cannot be reached (offline?). {_OFFLINE_HELP}"
            ) from err
        arrays = load(download=True)
    out = {}
    for split, (x, y, coarse) in arrays.items():
        out[split] = _check_split(np.asarray(x), np.asarray(y), split, "tfds cifar100")
        check_coarse(out[split][1], coarse, split, "tfds cifar100")
    return out


def synthetic_arrays(train_size=50_000, test_size=10_000, seed=0):
    """Random uint8 images and labels with CIFAR-100's shapes (smoke runs, benchmarks)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", train_size), ("test", test_size)):
        if n < 1:
            raise DataError(f"synthetic {split} size must be >= 1; received {n}.")
        out[split] = (
            rng.integers(0, 256, size=(n, *IMAGE_SHAPE), dtype=np.uint8),
            rng.integers(0, NUM_CLASSES, size=(n,), dtype=np.int32),
        )
    return out


def load_cifar100_arrays(
    source="cifar100",
    data_dir=None,
    tfds_data_dir=None,
    synthetic_sizes=(50_000, 10_000),
    seed=0,
    splits=tuple(FULL_SIZES),
):
    """`{"train": (images, labels), "test": (images, labels)}` as NumPy arrays:
    the `splits` asked for, the others neither read nor decoded.

    Args:
        source: `"cifar100"` (TFDS, or the local archive when `data_dir` is
            given) or `"synthetic"`.
        data_dir: local `cifar-100-python.tar.gz`, or a folder with it or
            with the extracted files; takes precedence over TFDS.
        tfds_data_dir: TFDS data folder (default `~/tensorflow_datasets`).
        synthetic_sizes: (train, test) sizes of the synthetic source.
        seed: seed of the synthetic source.
        splits: `"train"`, `"test"` or both (the default).
    """
    if source not in SOURCES:
        raise DataError(f"Unknown dataset {source!r}; expected one of {list(SOURCES)}.")
    unknown = [s for s in splits if s not in FULL_SIZES]
    if unknown or not splits:
        raise DataError(f"splits must name 'train' and/or 'test'; received {splits!r}.")
    if source == "synthetic":  # the test split is drawn after the train split: both drawn
        arrays = synthetic_arrays(*synthetic_sizes, seed=seed)
        return {s: arrays[s] for s in splits}
    if data_dir:
        return read_cifar100_python(data_dir, tuple(splits))
    return _tfds_arrays(tfds_data_dir, tuple(splits))


def load_for(config, splits=tuple(FULL_SIZES)):
    """`load_cifar100_arrays` with the data settings of a `TrainConfig`/`EvalConfig`."""
    return load_cifar100_arrays(
        config.dataset,
        data_dir=config.data_dir,
        tfds_data_dir=config.tfds_data_dir,
        synthetic_sizes=tuple(config.synthetic_size),
        seed=config.seed,
        splits=splits,
    )
