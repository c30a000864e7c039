"""CIFAR-100 sources (TFDS, the python archive, synthetic) and the augmentation."""

import io
import pickle
import socket
import tarfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from nam_keras.data import pipeline, sources
from nam_keras.errors import DataError


def _assert_matches(arrays, expected):
    for split in ("train", "test"):
        images, labels = arrays[split]
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])


def test_archive_reader_decodes_chw_pixels(tmp_path, make_cifar_archive):
    path, expected = make_cifar_archive(tmp_path / "cifar-100-python.tar.gz")
    with pytest.warns(UserWarning, match="fewer than CIFAR-100's 50000; using it as a subset"):
        arrays = sources.read_cifar100_python(path)
    _assert_matches(arrays, expected)
    # a known pixel, by hand: image 0, row 1, column 2 = data[0][c*1024 + 1*32 + 2]
    with tarfile.open(path) as tar:
        raw = pickle.loads(tar.extractfile("cifar-100-python/train").read(), encoding="bytes")
    flat = raw[b"data"][0]
    assert arrays["train"][0][0, 1, 2].tolist() == [flat[34], flat[1024 + 34], flat[2048 + 34]]


def test_archive_in_a_folder_and_extracted_folder(tmp_path, make_cifar_archive):
    _path, expected = make_cifar_archive(tmp_path / "cifar-100-python.tar.gz")
    with pytest.warns(UserWarning):
        _assert_matches(sources.read_cifar100_python(tmp_path), expected)
    folder, expected = make_cifar_archive(tmp_path / "x", folder=True)
    with pytest.warns(UserWarning):
        _assert_matches(sources.read_cifar100_python(folder), expected)  # cifar-100-python/
    with pytest.warns(UserWarning):
        _assert_matches(sources.read_cifar100_python(folder.parent), expected)  # its parent


def test_load_cifar100_from_archive_gives_datasets(tmp_path, make_cifar_archive):
    path, expected = make_cifar_archive(tmp_path / "c.tar.gz")
    with pytest.warns(UserWarning):
        train, test = pipeline.load_cifar100(data_dir=str(path))
    images, labels = next(iter(train.batch(100)))
    assert images.dtype == tf.uint8 and labels.dtype == tf.int32
    np.testing.assert_array_equal(images.numpy(), expected["train"][0])
    assert int(test.cardinality()) == 4


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("truncate", "truncated or corrupt"),
        ("garbage", "truncated or corrupt"),
        ("missing", "no such file or folder"),
        ("no-test", "has no cifar-100-python/test member"),
        ("bad-pickle", "is not a CIFAR-100 python pickle"),
        ("bad-labels", "fine labels must lie in 0..99"),
        ("bad-shape", r"must be uint8 of shape \(N, 3072\)"),
    ],
)
def test_corrupt_archives_give_clear_errors(tmp_path, make_cifar_archive, breakage, message):
    path = tmp_path / "cifar-100-python.tar.gz"
    if breakage == "no-test":
        make_cifar_archive(path, drop="test")
    elif breakage in ("truncate", "garbage"):
        make_cifar_archive(path)
        blob = path.read_bytes()
        path.write_bytes(
            blob[: len(blob) // 2] if breakage == "truncate" else b"not a tarball" * 100
        )
    elif breakage == "missing":
        path = tmp_path / "nowhere.tar.gz"
    else:
        bodies = {
            "bad-pickle": b"\x80\x04garbage",
            "bad-labels": pickle.dumps(
                {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}
            ),
            "bad-shape": pickle.dumps(
                {b"data": np.zeros((2, 1024), np.uint8), b"fine_labels": [0, 1]}
            ),
        }
        with tarfile.open(path, "w:gz") as tar:
            for name in ("train", "test"):
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(bodies[breakage])
                tar.addfile(info, io.BytesIO(bodies[breakage]))
    with pytest.raises(sources.DataError, match=message) as err:
        sources.read_cifar100_python(path)
    assert str(path) in str(err.value)


def _mock_cifar100(coarse_shift=0):
    """TFDS `as_dataset` replacement: 12 examples whose superclass labels follow
    the fine-to-coarse table (shifted by `coarse_shift`: a foreign dataset)."""
    from nam_keras.cifar100 import FINE_TO_COARSE

    def as_dataset(*args, **kwargs):
        fine = np.arange(12) * 7 % 100
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": np.zeros((12, 32, 32, 3), np.uint8),
                "label": fine,
                "coarse_label": (np.asarray(FINE_TO_COARSE)[fine] + coarse_shift) % 20,
            }
        )

    return as_dataset


def test_tfds_code_path_on_mock_data():
    import tensorflow_datasets as tfds

    mock = tfds.testing.mock_data(as_dataset_fn=_mock_cifar100())
    with mock, pytest.warns(UserWarning, match="subset"):
        train, test = pipeline.load_cifar100("cifar100")
    images, labels = next(iter(train.batch(12)))
    assert images.shape == (12, 32, 32, 3) and images.dtype == tf.uint8
    assert (
        labels.dtype == tf.int32
        and int(tf.reduce_min(labels)) >= 0
        and int(tf.reduce_max(labels)) < 100
    )
    assert int(test.cardinality()) == 12
    foreign = tfds.testing.mock_data(as_dataset_fn=_mock_cifar100(coarse_shift=1))
    disagree = pytest.raises(DataError, match=r"12 of the 12 train superclass labels disagree")
    with foreign, disagree:
        pipeline.load_cifar100("cifar100")


def test_archive_superclasses_must_follow_the_table(tmp_path, make_cifar_archive):
    path, _ = make_cifar_archive(tmp_path / "ok.tar.gz")
    with pytest.warns(UserWarning, match="subset"):
        sources.read_cifar100_python(str(path))  # the writer uses the table: accepted
    raw = pickle.dumps(
        {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [4, 2]}
    )  # apple -> 4 is right, fish -> 2 is not
    with pytest.raises(DataError, match=r"1 of the 2 test superclass labels disagree"):
        sources._decode_pickle(raw, "test", "archive.tar.gz")  # fmt: skip


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_tfds_fails_fast_and_names_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOWNLOAD_PROBE", ("127.0.0.1", _closed_port()))
    start = time.monotonic()
    with pytest.raises(sources.DataError, match="`data_dir=PATH`") as err:
        pipeline.load_cifar100("cifar100", tfds_data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    assert "cannot be reached" in str(err.value) and str(tmp_path) in str(err.value)


def test_synthetic_source():
    train, test = pipeline.load_cifar100("synthetic", synthetic_sizes=(10, 3))
    assert int(train.cardinality()) == 10 and int(test.cardinality()) == 3
    image, label = next(iter(train))
    assert image.shape == (32, 32, 3) and image.dtype == tf.uint8 and label.dtype == tf.int32
    with pytest.raises(sources.DataError, match="Unknown dataset 'cifar10'"):
        pipeline.load_cifar100("cifar10")


# ------------------------------------------------------------------ augmentation


def _image(rng):
    return rng.integers(0, 256, size=(32, 32, 3)).astype("float32")


def test_64_copies_of_one_image_come_out_different(rng):
    batch = np.repeat(_image(rng)[None], 64, axis=0)
    out = pipeline.augment_batch(batch, tf.constant([3, 4], tf.int64)).numpy()
    flat = out.reshape(64, -1).round(3)
    assert len(np.unique(flat, axis=0)) >= 62
    assert out.min() >= 0.0 and out.max() <= 255.0 and out.dtype == np.float32


def test_crop_alone_is_an_integer_shift_with_zero_fill(rng):
    img = _image(rng)
    out = pipeline.augment_batch(
        np.repeat(img[None], 32, 0),
        tf.constant([5, 6], tf.int64),
        flip=False,
        rotation_deg=0.0,
        brightness=0.0,
        contrast=0.0,
    ).numpy()
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    crops = {(dy, dx): padded[dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
    seen = set()
    for o in out:
        match = [k for k, c in crops.items() if np.array_equal(c, o)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 10  # per image, not one offset for the whole batch


def test_flip_alone_mirrors_about_half(rng):
    img = _image(rng)
    out = pipeline.augment_batch(
        np.repeat(img[None], 64, 0),
        tf.constant([7, 8], tf.int64),
        pad=0,
        rotation_deg=0.0,
        brightness=0.0,
        contrast=0.0,
    ).numpy()
    flipped = [np.array_equal(o, img[:, ::-1]) for o in out]
    same = [np.array_equal(o, img) for o in out]
    assert all(f or s for f, s in zip(flipped, same))
    assert 16 < sum(flipped) < 48


def test_brightness_by_hand():
    img = np.full((1, 32, 32, 3), 100.0, "float32")
    out = pipeline.augment_batch(
        np.repeat(img, 256, 0),
        tf.constant([1, 1], tf.int64),
        pad=0,
        flip=False,
        rotation_deg=0.0,
        contrast=0.0,
        brightness=0.1,
    ).numpy()
    factors = out[:, 0, 0, 0] / 100.0
    assert np.all(np.abs(out - out[:, :1, :1, :1]) < 1e-4)  # one factor per image
    assert factors.min() >= 0.9 - 1e-6 and factors.max() <= 1.1 + 1e-6
    unchanged = np.isclose(factors, 1.0).mean()
    assert 0.35 < unchanged < 0.65  # applied with p = 0.5


def test_same_seed_same_first_batch_and_reshuffled_epochs():
    train, _ = pipeline.load_cifar100("synthetic", synthetic_sizes=(64, 8))
    first = lambda ds: next(iter(ds))
    a = pipeline.train_pipeline(train, 16, seed=1)
    b = pipeline.train_pipeline(train, 16, seed=1)
    c = pipeline.train_pipeline(train, 16, seed=2)
    np.testing.assert_array_equal(first(a)[0].numpy(), first(b)[0].numpy())
    assert not np.array_equal(first(a)[0].numpy(), first(c)[0].numpy())
    epoch1 = [y.numpy() for _, y in a]
    epoch2 = [y.numpy() for _, y in a]
    assert len(epoch1) == 4  # 64 / 16, drop_remainder
    assert not np.array_equal(np.concatenate(epoch1), np.concatenate(epoch2))
    assert sorted(np.concatenate(epoch1)) == sorted(np.concatenate(epoch2))


def test_a_pipeline_started_at_a_step_yields_the_uninterrupted_batches():
    """Order and augmentation are keyed by (seed, step): a resumed run's batches."""
    train, _ = pipeline.load_cifar100("synthetic", synthetic_sizes=(24, 8))
    arrays = next(iter(train.batch(24)))
    whole = pipeline.train_pipeline(arrays, 8, seed=3, repeat=True).take(7)
    later = pipeline.train_pipeline(train, 8, seed=3, repeat=True, start_step=4).take(3)
    whole = [(x.numpy(), y.numpy()) for x, y in whole]
    for (x, y), (want_x, want_y) in zip(later, whole[4:]):
        np.testing.assert_array_equal(x.numpy(), want_x)
        np.testing.assert_array_equal(y.numpy(), want_y)
    passes = [np.concatenate([y for _, y in whole[i : i + 3]]) for i in (0, 3)]
    assert sorted(passes[0]) == sorted(passes[1]) == sorted(arrays[1].numpy())  # every example
    assert not np.array_equal(*passes)  # once a pass, in a new order
    mixed = {"mixup": 0.4, "cutmix": 1.0, "repeat": True, "seed": 3}  # their draws too
    whole = list(pipeline.train_pipeline(train, 8, **mixed).take(2))[1]
    later = next(iter(pipeline.train_pipeline(train, 8, start_step=1, **mixed)))
    for got, want in zip(later, whole):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert (whole[1].numpy() > 0).sum(axis=1).max() >= 2  # mixed labels
    with pytest.raises(ValueError, match="start_step=4 needs repeat=True"):
        pipeline.train_pipeline(train, 8, start_step=4)


def test_eval_pipeline_is_never_augmented():
    _train, test = pipeline.load_cifar100("synthetic", synthetic_sizes=(8, 10))
    raw = np.stack([x.numpy() for x, _ in test])
    got = np.concatenate([x.numpy() for x, _ in pipeline.eval_pipeline(test, 4)])
    assert got.shape == (10, 32, 32, 3)  # keeps the last partial batch
    np.testing.assert_array_equal(got, raw.astype("float32"))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_mixup_cutmix_randaugment_give_one_hot_mixtures(policy):
    # a global policy a user may set must not reach the pipeline's layers (float32 by design)
    keras.mixed_precision.set_global_policy(policy)
    train, _ = pipeline.load_cifar100("synthetic", synthetic_sizes=(32, 8))
    ds = pipeline.train_pipeline(train, 16, seed=0, randaugment=True, mixup=0.4, cutmix=1.0)
    images, labels = next(iter(ds))
    assert images.shape == (16, 32, 32, 3) and labels.shape == (16, 100)
    assert images.dtype == labels.dtype == tf.float32
    np.testing.assert_allclose(labels.numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert (labels.numpy() > 0).sum(axis=1).max() >= 2  # some labels are mixtures


def test_pipeline_rejects_bad_batch_sizes():
    train, test = pipeline.load_cifar100("synthetic", synthetic_sizes=(8, 8))
    with pytest.raises(ValueError, match="larger than the 8 training examples"):
        pipeline.train_pipeline(train, 16)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipeline.eval_pipeline(test, 0)


# ------------------------------------------------------------------ RandAugment


def test_rand_augment_ops_are_keras_own_in_its_order():
    assert list(pipeline.RAND_AUGMENT_OPS) == keras.layers.RandAugment._AUGMENT_LAYERS


@pytest.mark.parametrize("num_ops", [2, 3])
def test_rand_augment_transform_equals_keras_for_fixed_draws(rng, num_ops):
    """Only the drawn op of each slot, each slot on the one before's output:
    Keras' own result for the same draws, with every op in every slot."""
    layer = keras.layers.RandAugment(num_ops=num_ops, seed=5, dtype="float32")
    ops = [getattr(layer, name) for name in pipeline.RAND_AUGMENT_OPS]
    images = tf.constant(rng.integers(20, 230, (4, 10, 10, 3)).astype("float32"))
    n, telling = len(ops), 0
    with pipeline.tensorflow_backend(layer, *ops):
        for first in range(n):
            drawn = layer.get_random_transformation(images, training=True)  # new draws each
            order = [(first + 4 * slot) % n for slot in range(num_ops)]  # distinct ops
            drawn["layer_idxes"] = tf.constant(order, drawn["layer_idxes"].dtype)
            want = layer.transform_images(images, drawn, training=True).numpy()
            got = pipeline.rand_augment_transform(layer, images, drawn).numpy()
            np.testing.assert_allclose(got, want, atol=1e-3)
            # a real check: one op alone (a slot skipped, or on the wrong input) differs,
            # but for a few pairs (auto_contrast after contrast is auto_contrast alone)
            names = [pipeline.RAND_AUGMENT_OPS[k] for k in order]
            alone = [
                getattr(layer, k).transform_images(images, drawn["transforms"][k]) for k in names
            ]
            telling += all(np.abs(a.numpy() - want).max() > 1.0 for a in alone)
    assert telling >= n - 2


def test_randaugment_pipeline_is_keras_randaugment(monkeypatch):
    """The pipeline's batch with RandAugment: shape, dtype, range, and exactly
    what calling the Keras layer gives for the same draws (one batch: one draw)."""
    train, _ = pipeline.load_cifar100("synthetic", synthetic_sizes=(16, 8))
    images, labels = next(iter(pipeline.train_pipeline(train, 16, seed=4, randaugment=True)))
    assert images.shape == (16, 32, 32, 3) and labels.shape == (16,)
    assert images.dtype == tf.float32 and labels.dtype == tf.int32
    assert images.numpy().min() >= 0.0 and images.numpy().max() <= 255.0
    monkeypatch.setattr(pipeline, "_rand_augment", lambda layer, x: layer(x, training=True))
    keras_own = next(iter(pipeline.train_pipeline(train, 16, seed=4, randaugment=True)))[0]
    np.testing.assert_allclose(images.numpy(), keras_own.numpy(), atol=1e-3)
