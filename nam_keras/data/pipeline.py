"""CIFAR-100 batches for Keras: `tf.data` pipelines with per-image augmentation.

`train_pipeline` and `eval_pipeline` batch `(image uint8 (32, 32, 3), label
int32)` datasets (`load_cifar100` makes them from `nam_keras.data.sources`).

Normalisation is **not** done here: the models of `build_resnet` take raw
pixels in [0, 255] and normalise with the CIFAR-100 mean/std in their first
(weight-free) layer, so the exported serving model takes raw uint8 images too.
"""

import math

import keras
import tensorflow as tf

from nam_keras.cifar100 import NUM_CLASSES
from nam_keras.data.sources import load_cifar100_arrays
from nam_keras.errors import DataError


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


def train_pipeline(
    ds,
    batch_size,
    seed=0,
    augment="reference",
    randaugment=False,
    mixup=0.0,
    cutmix=0.0,
    num_classes=NUM_CLASSES,
    repeat=False,
    shuffle_buffer=None,
    one_hot=False,
):
    """Shuffled (every epoch, from `seed`), batched, augmented training batches.

    Yields `(images float32 (B, 32, 32, 3) in [0, 255], labels)`; labels are
    int32 class ids, or float32 one-hot (B, num_classes) when MixUp or CutMix
    is on. `batch_size` is the global batch (under a `tf.distribute` strategy
    Keras splits it across replicas); the last partial batch is dropped.
    The same seed gives the same batches.

    Args:
        augment: `"reference"` (`augment_batch`: crop, flip, rotation,
            brightness, contrast), `"crop-flip"` (the official NAM code's:
            4-pixel pad + crop and flip only) or `"none"`.
        randaugment: also apply `keras.layers.RandAugment`.
        mixup: MixUp alpha (0 disables); `keras.layers.MixUp`.
        cutmix: CutMix alpha (0 disables); `keras.layers.CutMix`.
        repeat: repeat forever (use with `steps_per_epoch`).
        one_hot: one-hot labels even without MixUp/CutMix (label smoothing).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; received {batch_size}.")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}; received {augment!r}.")
    n = int(ds.cardinality())
    if n >= 0 and n < batch_size:
        raise DataError(f"batch_size {batch_size} is larger than the {n} training examples.")
    ds = ds.shuffle(shuffle_buffer or max(n, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds))

    # Keras core augmentation layers, applied to whole batches in tf.data, with
    # their dtype given like every layer's: float32, the pipeline's images and labels.
    rand_aug = keras.layers.RandAugment(seed=seed, dtype="float32") if randaugment else None
    mixers = []
    if mixup:
        mixers.append(keras.layers.MixUp(alpha=mixup, seed=seed, dtype="float32"))
    if cutmix:
        mixers.append(keras.layers.CutMix(factor=cutmix, seed=seed, dtype="float32"))

    def transform(batch, batch_seed):
        images, labels = batch
        images = tf.cast(images, tf.float32)
        if AUGMENTATIONS[augment] is not None:
            images = augment_batch(images, batch_seed, **AUGMENTATIONS[augment])
        if rand_aug is not None:
            images = rand_aug(images, training=True)
        if mixers or one_hot:
            labels = tf.one_hot(labels, num_classes)
            for mixer in mixers:
                out = mixer({"images": images, "labels": labels}, training=True)
                images, labels = out["images"], out["labels"]
        return images, labels

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
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
