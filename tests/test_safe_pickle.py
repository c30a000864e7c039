"""The restricted unpickler: CIFAR's data loads, code and oversized arrays are refused."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from nam_keras.data import safe_pickle, sources
from nam_keras.errors import DataError


class _Exploit:
    """Unpickling this with `pickle.loads` creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_entry(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"fine_labels": [1, 2, 3][:n],
        b"coarse_labels": [0, 0, 1][:n],
        b"filenames": [b"a.png"] * n,
        b"batch_label": b"training batch 1 of 1",
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_layouts_load(protocol):
    entry = _cifar_entry()
    got = safe_pickle.loads(pickle.dumps(entry, protocol=protocol))
    np.testing.assert_array_equal(got[b"data"], entry[b"data"])
    assert got[b"fine_labels"] == [1, 2, 3] and got[b"filenames"] == [b"a.png"] * 3


def test_a_python2_pickle_of_the_real_format_loads():
    # what cPickle protocol 2 in Python 2 wrote for CIFAR-100: numpy.core names, str keys as bytes
    raw = (
        b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\n"
        b"ndarray\nq\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01K\x04\x86cnumpy\ndtype\nq\x05U\x02"
        b"u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U"
        b"\x04\x01\x02\x03\x04tbU\x0bfine_labelsq\x07]q\x08K\x05au."
    )
    got = safe_pickle.loads(raw)
    assert got[b"data"].dtype == np.uint8 and got[b"data"].tolist() == [[1, 2, 3, 4]]
    assert got[b"fine_labels"] == [5]


def test_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Exploit(marker)}, protocol=2)
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"refused global (posix|os)\.system"):
        safe_pickle.loads(blob)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        (np.zeros(3, dtype=object), "refused array dtype"),
        (np.zeros(3, dtype=np.float64), "refused array dtype"),
        (np.ma.masked_array([1, 2]), "refused global numpy.ma.core"),
    ],
)
def test_non_integer_or_subclassed_arrays_are_refused(payload, message):
    with pytest.raises(safe_pickle.UnsafePickleError, match=message):
        safe_pickle.loads(pickle.dumps({b"data": payload}, protocol=2))


def test_a_huge_declared_array_is_refused_before_allocation():
    # _reconstruct(ndarray, (10**12,), b'b'): a terabyte if it were allocated
    raw = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85U\x01b\x87R."
    )
    with pytest.raises(safe_pickle.UnsafePickleError, match="refused an array of"):
        safe_pickle.loads(raw)


def _archive_with(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_a_code_bearing_archive_is_refused_naming_file_and_global(tmp_path):
    marker = tmp_path / "pwned"
    good = pickle.dumps(_cifar_entry(), protocol=2)
    evil = pickle.dumps({b"data": _Exploit(marker), b"fine_labels": [1]}, protocol=2)
    path = _archive_with(tmp_path / "c.tar.gz", {"train": evil, "test": good})
    with pytest.raises(DataError) as info:
        sources.read_cifar100_python(path)
    message = str(info.value)
    assert str(path) in message and "'train' member was refused" in message
    assert "system" in message and not marker.exists()


def test_an_oversized_member_is_refused_unread(tmp_path, monkeypatch):
    good = pickle.dumps(_cifar_entry(), protocol=2)
    path = _archive_with(tmp_path / "c.tar.gz", {"train": good, "test": good})
    monkeypatch.setitem(sources.MAX_MEMBER_BYTES, "test", len(good) - 1)
    with pytest.raises(DataError, match=r"cifar-100-python/test declares .* refused without"):
        sources.read_cifar100_python(path)
    assert sources.MAX_MEMBER_BYTES["train"] > 50_000 * 3072  # the real split fits


def test_links_in_the_archive_are_ignored(tmp_path):
    good = pickle.dumps(_cifar_entry(), protocol=2)
    path = tmp_path / "c.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/test")
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
        link = tarfile.TarInfo("cifar-100-python/train")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        escape = tarfile.TarInfo("../../train")
        escape.size = len(good)
        tar.addfile(escape, io.BytesIO(good))
    with pytest.raises(DataError, match="has no cifar-100-python/train member"):
        sources.read_cifar100_python(path)


def test_an_oversized_file_in_the_extracted_folder_is_refused_unread(
    tmp_path, make_cifar_archive, monkeypatch
):
    folder, _ = make_cifar_archive(tmp_path, folder=True)
    monkeypatch.setitem(sources.MAX_MEMBER_BYTES, "train", 10)
    with pytest.raises(DataError, match=r"cifar-100-python/train declares .* refused without"):
        sources.read_cifar100_python(folder)
