"""CIFAR-100 batches for Keras: `tf.data` pipelines with per-image augmentation.

`train_pipeline` and `eval_pipeline` batch `(image uint8 (32, 32, 3), label
int32)` datasets (`load_cifar100` makes them from `nam_keras.data.sources`).

Normalisation is **not** done here: the models of `build_resnet` take raw
pixels in [0, 255] and normalise with the CIFAR-100 mean/std in their first
(weight-free) layer, so the exported serving model takes raw uint8 images too.
"""

import contextlib
import functools
import math

import keras
import tensorflow as tf

from nam_keras.cifar100 import NUM_CLASSES
from nam_keras.data.sources import check_batch_size, load_cifar100_arrays


def load_cifar100(
    source="cifar100", data_dir=None, tfds_data_dir=None, synthetic_sizes=(50_000, 10_000), seed=0
):
    """Train and test `tf.data.Dataset`s of `(uint8 image (32, 32, 3), int32 label)`.

    Same arguments as `load_cifar100_arrays`; the data is decoded once and
    held in memory.

    Example:

    >>> from nam_keras.data import pipeline
    >>> train, test = pipeline.load_cifar100("synthetic", synthetic_sizes=(256, 64))
    >>> batches = pipeline.train_pipeline(train, batch_size=64, seed=0)
    >>> images, labels = next(iter(batches))
    >>> images.shape, images.dtype.name, labels.shape
    (TensorShape([64, 32, 32, 3]), 'float32', TensorShape([64]))
    """
    arrays = load_cifar100_arrays(source, data_dir, tfds_data_dir, synthetic_sizes, seed)
    return tuple(tf.data.Dataset.from_tensor_slices(arrays[s]) for s in ("train", "test"))


# --------------------------------------------------------------------------- augmentation


def _affine_transforms(seed, batch, size, pad, rotation_deg, flip):
    """Per-image projective transforms (output -> input pixel coordinates) of
    `rotate(flip(crop(pad(image))))`: one resampling pass for all three."""
    s_shift, s_flip, s_angle = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shift = tf.cast(
        tf.random.stateless_uniform(
            [batch, 2], s_shift, minval=-pad, maxval=pad + 1, dtype=tf.int32
        ),
        tf.float32,
    )
    sign = tf.ones([batch])
    if flip:
        sign = tf.where(tf.random.stateless_uniform([batch], s_flip) < 0.5, -1.0, 1.0)
    angle = tf.random.stateless_uniform([batch], s_angle, -1.0, 1.0) * (
        rotation_deg * math.pi / 180.0
    )
    cos, sin = tf.cos(angle), tf.sin(angle)
    c = (size - 1) / 2.0
    # rotation about the centre: q = M p + (c - M c)
    m00, m01, m10, m11 = cos, -sin, sin, cos
    t0 = c - (m00 * c + m01 * c)
    t1 = c - (m10 * c + m11 * c)
    # horizontal flip x -> (size - 1) - x, then the crop's integer shift
    flip_off = tf.where(sign < 0, float(size - 1), 0.0)
    zeros = tf.zeros([batch])
    return tf.stack(
        [
            sign * m00,
            sign * m01,
            sign * t0 + flip_off + shift[:, 0],
            m10,
            m11,
            t1 + shift[:, 1],
            zeros,
            zeros,
        ],
        axis=1,
    )


def augment_batch(
    images, seed, pad=4, flip=True, rotation_deg=15.0, brightness=0.1, contrast=0.1, p=0.5
):
    """The reference training augmentation, drawn independently for every image.

    `images`: float32 (B, H, W, 3) in [0, 255]; `seed`: int shape (2,) for the
    stateless random ops. Zero-pad `pad` pixels and crop back (a random integer
    shift), horizontal flip with p 0.5, rotation uniform in +-`rotation_deg`
    (bilinear, zero fill), then with probability `p` each a brightness factor
    in [1 - b, 1 + b] and a contrast factor in [1 - c, 1 + c] (blend with the
    image's grey mean, as torchvision/Paddle do). Returns float32 in [0, 255].
    """
    images = tf.convert_to_tensor(images, tf.float32)
    batch, size = tf.shape(images)[0], images.shape[1]
    s_geo, s_b, s_bp, s_c, s_cp = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    if pad or flip or rotation_deg:
        transforms = _affine_transforms(s_geo, batch, size, pad, rotation_deg, flip)
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.shape(images)[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )

    def factor(s_val, s_apply, amount):
        f = tf.random.stateless_uniform([batch, 1, 1, 1], s_val, 1.0 - amount, 1.0 + amount)
        apply = tf.random.stateless_uniform([batch, 1, 1, 1], s_apply) < p
        return tf.where(apply, f, 1.0)

    if brightness:
        images = tf.clip_by_value(images * factor(s_b, s_bp, brightness), 0.0, 255.0)
    if contrast:
        grey = tf.reduce_mean(
            tf.tensordot(images, tf.constant([0.299, 0.587, 0.114]), axes=[[3], [0]]),
            axis=[1, 2],
        )[:, None, None, None]
        images = tf.clip_by_value(grey + (images - grey) * factor(s_c, s_cp, contrast), 0.0, 255.0)
    return images


#: --augment NAME -> arguments of `augment_batch` (`None`: no augmentation).
AUGMENTATIONS = {
    "reference": {},
    "crop-flip": {"rotation_deg": 0.0, "brightness": 0.0, "contrast": 0.0},
    "none": None,
}


def _with_options(ds):
    options = tf.data.Options()
    options.deterministic = True
    # In-memory data: shard by example, not by file, under MultiWorkerMirroredStrategy.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _as_arrays(data):
    """`(images, labels)` tensors of a finite dataset of `(image, label)` or of an array pair."""
    if isinstance(data, tf.data.Dataset):
        n = int(data.cardinality())
        if n < 1:
            raise ValueError(f"expected a finite, non-empty training dataset; its size is {n}.")
        return data.batch(n).get_single_element()
    images, labels = data
    return tf.convert_to_tensor(images), tf.convert_to_tensor(labels)


def batch_indices(step, seed, batch_size, n):
    """The example indices of training batch `step` (0-based, global): positions
    `step * batch_size ...` of the endless sequence of passes over the `n`
    examples, each pass a permutation keyed by `(seed, pass)`
    (`tf.random.experimental.index_shuffle`). A batch may span two passes."""
    step = tf.cast(step, tf.int64)
    positions = step * batch_size + tf.range(batch_size, dtype=tf.int64)
    passes, within = positions // n, positions % n
    first = passes[0]

    def shuffled(p):
        key = tf.random.experimental.stateless_fold_in(tf.stack([tf.cast(seed, tf.int64), 0]), p)
        return tf.random.experimental.index_shuffle(within, key, n - 1)

    return tf.where(passes == first, shuffled(first), shuffled(first + 1))


def augmentation_seed(step, seed, stream=1):
    """The stateless seed (shape (2,)) of training batch `step`'s augmentation
    (`stream` 1: `augment_batch`; 2: MixUp and CutMix)."""
    base = tf.stack([tf.cast(seed, tf.int64), stream])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))


@contextlib.contextmanager
def tensorflow_backend(*layers):
    """Keras preprocessing `layers` computing with TensorFlow, whatever the
    Keras backend, as inside `tf.data` (what calling a layer does for itself;
    its methods alone do not)."""
    for layer in layers:
        layer.backend.set_backend("tensorflow")
    try:
        yield
    finally:
        for layer in layers:
            layer.backend.reset()


class StepSeeds(keras.random.SeedGenerator):
    """Seeds for the `seed=` argument of a Keras augmentation layer's
    `get_random_transformation`, keyed by one batch: the i-th draw is
    `stateless_fold_in(key, i)`. It has no state to advance, so the draws of a
    batch depend on its key alone (not on the batches before it, nor on the
    order in which a parallel `map` runs)."""

    def __init__(self, key):  # not the base class': it makes a state variable
        self._key = key
        self._draws = 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._key, self._draws)


def _mix(mixers, images, labels, key):
    """`images, labels` through the MixUp/CutMix layers `mixers`, their draws keyed by `key`."""
    seeds = StepSeeds(key)
    for mixer in mixers:
        with tensorflow_backend(mixer):
            data = {"images": images, "labels": labels}
            drawn = mixer.get_random_transformation(data, training=True, seed=seeds)
            images = mixer.transform_images(images, drawn, training=True)
            labels = mixer.transform_labels(labels, drawn, training=True)
    return images, labels


#: The ops of `keras.layers.RandAugment` (attributes of the layer), in the order
#: its drawn `layer_idxes` index them: Keras' private `_AUGMENT_LAYERS`, which a
#: test checks this equals.
RAND_AUGMENT_OPS = (
    "random_shear",
    "random_translation",
    "random_rotation",
    "random_brightness",
    "random_color_degeneration",
    "random_contrast",
    "random_sharpness",
    "random_posterization",
    "solarization",
    "auto_contrast",
    "equalization",
)


def _rand_augment_op(op, images, transform, dtype):
    """`images` through the RandAugment op layer `op` with its drawn `transform`, as `dtype`."""
    return tf.cast(op.transform_images(images, transform, training=True), dtype)


def rand_augment_transform(layer, images, drawn):
    """`layer.transform_images(images, drawn, training=True)` of a
    `keras.layers.RandAugment` `layer`, computing only the drawn op of each of
    its `num_ops` slots, each slot on the output of the one before (Keras
    computes all 11 ops per slot and keeps one with `where`). The whole batch
    takes each slot's op. `layer` and its ops must compute with TensorFlow
    (`tensorflow_backend`)."""
    dtype = layer.compute_dtype
    images = tf.cast(images, dtype)
    for i in range(layer.num_ops):
        branches = [
            functools.partial(
                _rand_augment_op, getattr(layer, name), images, drawn["transforms"][name], dtype
            )
            for name in RAND_AUGMENT_OPS
        ]
        images = tf.switch_case(tf.cast(drawn["layer_idxes"][i], tf.int32), branches)
    return images


def _rand_augment(layer, images):
    """`images` through the `keras.layers.RandAugment` `layer`, as calling it
    does (its draws from its own seed generator), at the cost of the drawn ops
    alone (`rand_augment_transform`)."""
    with tensorflow_backend(layer, *(getattr(layer, name) for name in RAND_AUGMENT_OPS)):
        drawn = layer.get_random_transformation(images, training=True)
        return rand_augment_transform(layer, images, drawn)


def train_pipeline(
    data,
    batch_size,
    seed=0,
    augment="reference",
    randaugment=False,
    mixup=0.0,
    cutmix=0.0,
    num_classes=NUM_CLASSES,
    repeat=False,
    one_hot=False,
    start_step=0,
):
    """Shuffled, batched, augmented training batches, each a function of
    `(seed, step)` alone.

    Yields `(images float32 (B, 32, 32, 3) in [0, 255], labels)`; labels are
    int32 class ids, or float32 one-hot (B, num_classes) when MixUp or CutMix
    is on. `batch_size` is the global batch (under a `tf.distribute` strategy
    Keras splits it across replicas).

    Batch `step` (counted from 0 over the whole run) holds the examples at
    positions `step * batch_size ...` of consecutive passes over the data, each
    pass a permutation keyed by `(seed, pass)` (`batch_indices`), and its
    reference augmentation draws are keyed by `(seed, step)`
    (`augmentation_seed`; MixUp's and CutMix's too, through `StepSeeds`). A
    pipeline started at `start_step` therefore yields exactly the batches an
    uninterrupted one yields from that step on: a resumed run sees the batches
    it would have seen. (`keras.layers.RandAugment` draws from its own seed
    generator: seeded, but not keyed by the step.)

    Args:
        data: the training examples, in memory: a finite `tf.data.Dataset` of
            `(uint8 image, label)` or a pair of arrays `(images, labels)`.
        augment: `"reference"` (`augment_batch`: crop, flip, rotation,
            brightness, contrast), `"crop-flip"` (the official NAM code's:
            4-pixel pad + crop and flip only) or `"none"`.
        randaugment: also apply `keras.layers.RandAugment` (computing only
            its drawn ops: `rand_augment_transform`).
        mixup: MixUp alpha (0 disables); `keras.layers.MixUp`.
        cutmix: CutMix alpha (0 disables); `keras.layers.CutMix`.
        repeat: endless (use with `steps_per_epoch`); otherwise one pass of
            `n // batch_size` batches, a new permutation each time the dataset
            is iterated (the last partial batch is dropped).
        one_hot: one-hot labels even without MixUp/CutMix (label smoothing).
        start_step: the first batch's step (`repeat` only): a resumed run's
            completed steps.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; received {batch_size}.")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}; received {augment!r}.")
    if start_step and not repeat:
        raise ValueError(f"start_step={start_step} needs repeat=True.")
    images, labels = _as_arrays(data)
    n = int(images.shape[0])
    check_batch_size(batch_size, n)
    if repeat:
        steps = tf.data.Dataset.counter(int(start_step)).map(lambda s: (tf.cast(seed, tf.int64), s))
    else:  # one pass, keyed by a new draw of `seed`'s stream each time it is iterated
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
        passes = n // batch_size
        steps = keys.flat_map(lambda key: tf.data.Dataset.range(passes).map(lambda s: (key, s)))

    # Keras core augmentation layers, applied to whole batches in tf.data, with
    # their dtype given like every layer's: float32, the pipeline's images and labels.
    rand_aug = keras.layers.RandAugment(seed=seed, dtype="float32") if randaugment else None
    mixers = []
    if mixup:
        mixers.append(keras.layers.MixUp(alpha=mixup, seed=seed, dtype="float32"))
    if cutmix:
        mixers.append(keras.layers.CutMix(factor=cutmix, seed=seed, dtype="float32"))

    def transform(key, step):
        index = batch_indices(step, key, batch_size, n)
        batch_images = tf.cast(tf.gather(images, index), tf.float32)
        batch_labels = tf.gather(labels, index)
        if AUGMENTATIONS[augment] is not None:
            batch_images = augment_batch(
                batch_images, augmentation_seed(step, key), **AUGMENTATIONS[augment]
            )
        if rand_aug is not None:
            batch_images = _rand_augment(rand_aug, batch_images)
        if mixers or one_hot:
            batch_labels = tf.one_hot(batch_labels, num_classes)
            key = augmentation_seed(step, key, stream=2)
            batch_images, batch_labels = _mix(mixers, batch_images, batch_labels, key)
        return batch_images, batch_labels

    ds = steps.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def eval_pipeline(ds, batch_size, one_hot=None):
    """Batched, never augmented: `(images float32 in [0, 255], labels)`.

    Labels are int32 class ids, or float32 one-hot of width `one_hot` when it
    is given (to match a model trained with MixUp/CutMix).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; received {batch_size}.")

    def prepare(x, y):
        return tf.cast(x, tf.float32), (tf.one_hot(y, one_hot) if one_hot else y)

    ds = ds.batch(batch_size).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))
