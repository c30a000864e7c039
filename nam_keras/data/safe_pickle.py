"""A restricted unpickler for CIFAR's python pickles: data, never code.

`pickle.loads` runs whatever callable a pickle names (`os.system`, ...), so a
crafted `cifar-100-python.tar.gz` could run code on the machine that reads it.
`loads` here accepts only what the genuine CIFAR-100 files hold: dicts, lists,
strings, bytes, numbers, and uint8/integer NumPy arrays rebuilt through
NumPy's own reconstructors, with their sizes checked before any memory is
taken. Any other global is refused before anything runs.
"""

import io
import pickle

import numpy as np

#: The largest array a CIFAR-100 pickle holds: 50,000 x 3,072 uint8 (154 MB).
MAX_ARRAY_BYTES = 64 * 1024 * 1024 * 4

#: dtypes a CIFAR pickle's arrays may have.
ALLOWED_DTYPES = frozenset("u1 i1 u2 i2 i4 u4 i8 u8".split())


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names something other than plain data."""


class _NdarrayType:
    """Stands for `numpy.ndarray` inside a pickle: usable only as the first
    argument of `_reconstruct`, never called."""


def _checked_dtype(spec, *args):
    dtype = np.dtype(spec, *args[:2]) if args else np.dtype(spec)
    if dtype.str[1:] not in ALLOWED_DTYPES:
        raise UnsafePickleError(f"refused array dtype {dtype!r}; CIFAR arrays are integers")
    return dtype


def _checked_size(shape, itemsize=1):
    count = 1
    for n in shape if isinstance(shape, tuple) else (shape,):
        if not isinstance(n, int) or n < 0:
            raise UnsafePickleError(f"refused array shape {shape!r}")
        count *= n
    if count * itemsize > MAX_ARRAY_BYTES:
        raise UnsafePickleError(
            f"refused an array of {count * itemsize:,} bytes (more than CIFAR-100's "
            f"largest, limit {MAX_ARRAY_BYTES:,})"
        )


def _reconstruct(subtype, shape, dtype):
    """`numpy.core.multiarray._reconstruct`, for plain ndarrays of allowed size."""
    if subtype is not _NdarrayType:
        raise UnsafePickleError(f"refused array subtype {subtype!r}")
    _checked_size(shape)
    return np.ndarray.__new__(np.ndarray, shape, _checked_dtype(dtype))


def _frombuffer(buffer, dtype, shape, order):
    """`numpy.core.numeric._frombuffer` (pickle protocol 5), checked."""
    dtype = _checked_dtype(dtype)
    _checked_size(shape, dtype.itemsize)
    array = np.frombuffer(bytes(buffer), dtype=dtype)
    return array.reshape(shape, order=order).copy()


def _latin1_bytes(text, encoding="latin1"):
    """`_codecs.encode`, as Python 3 pickles bytes under protocol 2."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _checked_dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused global {module}.{name}: a CIFAR-100 pickle holds only data "
                "(dicts, lists, strings, numbers, integer NumPy arrays)"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refused a persistent id: a CIFAR-100 pickle has none")


def loads(data):
    """Unpickles `data` (bytes) like `pickle.loads(data, encoding="bytes")`,
    accepting only the plain data of a CIFAR pickle.

    Raises:
        UnsafePickleError: the pickle names a global other than NumPy's array
            reconstructors, or an array too large or of a non-integer dtype.
        pickle.UnpicklingError, EOFError, ValueError: damaged data.
    """
    return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
