"""Training batches made on the accelerator: gather and per-image augmentation
in `keras.ops` alone (no TensorFlow), pure functions of `(seed, step)`.

The uint8 training set stays on the device; a compiled train step picks batch
`step`'s examples (`batch_indices`), augments them (`augment_batch`) and mixes
them (`mix_batch`), with the distributions of the host pipeline
(`nam_keras.data.pipeline`): the same recipes, parameters and composition, drawn
from other random streams (the numbers differ, the distributions do not).

Every draw is stateless: a key of shape (2,) (`step_key`, from the run's seed
and the global step) goes to `keras.random` as its `seed`. On JAX that is a
`jax.random` key array (`keras.random` takes one as it is, inside `jax.jit`);
on the other backends a `SeedGenerator` stand-in hands the key over.

Example:

>>> import keras, numpy as np
>>> from nam_keras.data import device_augment as da
>>> train = np.zeros((100, 32, 32, 3), "uint8"), np.arange(100) % 10
>>> images, labels = da.training_batch(*train, step=3, seed=0, batch_size=8)
>>> tuple(images.shape), keras.backend.standardize_dtype(images.dtype), tuple(labels.shape)
((8, 32, 32, 3), 'float32', (8,))
"""

import math

import keras
from keras import ops

#: Recipe name -> arguments of `augment_batch`, as `pipeline.AUGMENTATIONS`.
AUGMENTATIONS = {
    "reference": {},
    "crop-flip": {"rotation_deg": 0.0, "brightness": 0.0, "contrast": 0.0},
    "none": None,
}

#: The random streams of a step, as in the host pipeline: the shuffling, the
#: per-image augmentation, MixUp/CutMix.
SHUFFLE, AUGMENT, MIX = 0, 1, 2

# ITU-R 601 luma weights of the contrast's grey mean (torchvision, Paddle, pipeline.py).
_GREY = (0.299, 0.587, 0.114)


class _Key(keras.random.SeedGenerator):
    """A stateless stand-in for `SeedGenerator` whose `next()` is one fixed key
    (`keras.random`'s `seed=` takes a `SeedGenerator` on every backend)."""

    def __init__(self, key):  # no super().__init__(): no state variable wanted
        self._key = key

    def next(self, ordered=True):
        """The key, every time."""
        return self._key


def _seed(key):
    """The `seed=` argument of `keras.random` that draws from `key` (use each key once)."""
    if keras.backend.backend() == "jax":
        return key  # a jax.random key array (uint32 (2,)), stateless as it is
    return _Key(key)


def _as_key(words):
    """Int words (2,) as the backend's stateless seed (uint32 on JAX, int32 elsewhere)."""
    words = ops.cast(words, "int32")
    if keras.backend.backend() == "jax":
        return ops.cast(words, "uint32")
    return words


def split(key, num):
    """A list of `num` independent keys (2,) drawn from `key` (a stateless split)."""
    words = keras.random.randint((num, 2), 0, 2**31 - 1, dtype="int32", seed=_seed(key))
    keys = _as_key(words)
    return [keys[i] for i in range(num)]


def step_key(seed, step, stream=AUGMENT):
    """The key of `stream` (`SHUFFLE`, `AUGMENT`, `MIX`) for global step `step`
    (for `SHUFFLE`: the pass over the data) of a run seeded with `seed`:
    a pure function of the three. Seeds and steps below 2**31."""
    words = ops.stack([ops.cast(seed, "int32"), ops.cast(step, "int32")])
    return split(_as_key(words), 3)[stream]


# --------------------------------------------------------------------------- gather


def pass_permutation(seed, pass_index, n):
    """The order (n,) of the examples in pass `pass_index` over `n` examples."""
    key = step_key(seed, pass_index, SHUFFLE)
    return keras.random.shuffle(ops.arange(n, dtype="int32"), seed=_seed(key))


def batch_indices(step, seed, batch_size, n):
    """The example indices (batch_size,) of training batch `step` (0-based,
    global): positions `step * batch_size ...` of the endless sequence of passes
    over the `n` examples, each pass a permutation keyed by `(seed, pass)`.

    The same contract as `pipeline.batch_indices` (each pass a permutation; a
    batch may span two passes; a resumed run continues the order), with
    another permutation: TensorFlow's `index_shuffle` has no `keras.ops` form.
    Costs a shuffle of `n` keys per call (two for a batch that spans two passes).
    """
    step = ops.cast(step, "int32")
    positions = step * batch_size + ops.arange(batch_size, dtype="int32")
    passes, within = positions // n, positions % n
    first = passes[0]
    this = ops.take(pass_permutation(seed, first, n), within)

    def spanning():
        following = ops.take(pass_permutation(seed, first + 1, n), within)
        return ops.where(passes == first, this, following)

    return ops.cond(passes[-1] == first, lambda: this, spanning)


# --------------------------------------------------------------------------- augmentation


def _inverse_maps(draws, size, pad, rotation_deg, flip):
    """Per-image affine maps (output -> input pixel coordinates, x = column,
    y = row) of `rotate(flip(crop(pad(image))))`, as `pipeline._affine_transforms`
    composes them: rows `(a0, a1, a2, b0, b1, b2)` with
    `x_in = a0 x + a1 y + a2`, `y_in = b0 x + b1 y + b2`.

    `draws`: uniform [0, 1) (B, >= 4): the crop's shift in x and y (an integer
    uniform in [-pad, pad]), the flip (p 0.5), the angle (uniform in
    +-rotation_deg)."""
    draws = ops.cast(draws, "float32")
    shift = ops.minimum(ops.floor(draws[:, 0:2] * (2 * pad + 1)) - pad, pad)
    sign = ops.where(draws[:, 2] < 0.5, -1.0, 1.0) if flip else ops.ones_like(draws[:, 2])
    angle = (draws[:, 3] * 2.0 - 1.0) * (rotation_deg * math.pi / 180.0)
    cos, sin = ops.cos(angle), ops.sin(angle)
    c = (size - 1) / 2.0
    # rotation about the centre: q = M p + (c - M c), M = [[cos, -sin], [sin, cos]]
    t0 = c - (cos * c - sin * c)
    t1 = c - (sin * c + cos * c)
    # horizontal flip x -> (size - 1) - x, then the crop's integer shift
    flip_off = ops.where(sign < 0, float(size - 1), 0.0)
    return ops.stack(
        [sign * cos, -sign * sin, sign * t0 + flip_off + shift[:, 0], sin, cos, t1 + shift[:, 1]],
        axis=1,
    )


def resample(images, maps):
    """`images` (B, H, W, C) float sampled at the input coordinates of `maps`
    (B, 6), bilinear, zero outside: what TensorFlow's `ImageProjectiveTransformV3`
    does (BILINEAR, CONSTANT fill 0) for affine transforms, in `keras.ops`."""
    _, height, width, channels = images.shape
    batch = ops.shape(images)[0]  # unknown in a tf.data batch: a tensor there
    ys, xs = ops.meshgrid(
        ops.arange(height, dtype="float32"), ops.arange(width, dtype="float32"), indexing="ij"
    )
    xs, ys = ops.reshape(xs, (1, -1)), ops.reshape(ys, (1, -1))
    m = [maps[:, i : i + 1] for i in range(6)]
    x_in = m[0] * xs + m[1] * ys + m[2]
    y_in = m[3] * xs + m[4] * ys + m[5]
    x0, y0 = ops.floor(x_in), ops.floor(y_in)
    flat = ops.reshape(images, (-1, channels))
    base = ops.arange(batch, dtype="int32")[:, None] * (height * width)
    out = 0.0
    for dy in (0.0, 1.0):
        for dx in (0.0, 1.0):
            x, y = x0 + dx, y0 + dy
            weight = (1.0 - ops.abs(x_in - x)) * (1.0 - ops.abs(y_in - y))
            inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
            weight = ops.where(inside, weight, 0.0)
            xi = ops.cast(ops.clip(x, 0, width - 1), "int32")
            yi = ops.cast(ops.clip(y, 0, height - 1), "int32")
            pixels = ops.take(flat, base + yi * width + xi, axis=0)
            out = out + weight[..., None] * pixels
    return ops.reshape(out, (-1, height, width, channels))


def _factor(value, apply, amount, p):
    """A factor uniform in [1 - amount, 1 + amount] with probability `p`, else 1."""
    f = 1.0 - amount + (2.0 * amount) * value
    return ops.where(apply < p, f, 1.0)[:, None, None, None]


def augment_batch(
    images, key, pad=4, flip=True, rotation_deg=15.0, brightness=0.1, contrast=0.1, p=0.5
):
    """The reference training augmentation, drawn independently for every
    image, as `pipeline.augment_batch` does it (same arguments, same
    distributions), in `keras.ops`: runs inside a compiled step.

    `images`: uint8 or float (B, H, W, 3) in [0, 255]; `key`: a key (2,)
    (`step_key`). Zero-pad `pad` pixels and crop back (a random integer shift),
    horizontal flip with p 0.5, rotation uniform in +-`rotation_deg` (one
    bilinear resampling for the three, zero fill), then with probability `p`
    each a brightness factor in [1 - b, 1 + b] and a contrast factor in
    [1 - c, 1 + c] (a blend with the image's grey mean). Returns float32 in
    [0, 255].
    """
    images = ops.cast(images, "float32")
    batch, size = ops.shape(images)[0], images.shape[1]
    draws = keras.random.uniform((batch, 8), seed=_seed(key))
    if pad or flip or rotation_deg:
        images = resample(images, _inverse_maps(draws, size, pad, rotation_deg, flip))
    if brightness:
        factor = _factor(draws[:, 4], draws[:, 5], brightness, p)
        images = ops.clip(images * factor, 0.0, 255.0)
    if contrast:
        grey = ops.mean(ops.tensordot(images, ops.array(_GREY), axes=[[3], [0]]), axis=(1, 2))
        grey = grey[:, None, None, None]
        factor = _factor(draws[:, 6], draws[:, 7], contrast, p)
        images = ops.clip(grey + (images - grey) * factor, 0.0, 255.0)
    return images


def _blend(images, labels, perm, image_weight, label_weight):
    """`w x + (1 - w) x[perm]` for the images and for the labels."""
    others = ops.take(images, perm, axis=0)
    images = image_weight * images + (1.0 - image_weight) * others
    label_weight = label_weight[:, None]
    labels = label_weight * labels + (1.0 - label_weight) * ops.take(labels, perm, axis=0)
    return images, labels


def mix_up(images, labels, key, alpha):
    """`keras.layers.MixUp(alpha)` in `keras.ops`, its draws keyed by `key`: a
    weight w ~ Beta(alpha, alpha) per image, blended with a random other image
    of the batch (a permutation), the labels with the same w."""
    k_perm, k_weight = split(key, 2)
    batch = ops.shape(images)[0]
    perm = keras.random.shuffle(ops.arange(batch, dtype="int32"), seed=_seed(k_perm))
    w = keras.random.beta((batch,), alpha, alpha, seed=_seed(k_weight))
    return _blend(images, labels, perm, w[:, None, None, None], w)


def cut_mix(images, labels, key, factor):
    """`keras.layers.CutMix(factor)` in `keras.ops`, its draws keyed by `key`:
    per batch alpha ~ U(0, factor); per image w ~ Beta(alpha, alpha) and a box
    of sides sqrt(1 - w) H and sqrt(1 - w) W at a uniform position inside the
    image, filled from a random other image; labels weighted by the box area."""
    k_alpha, k_weight, k_x, k_y, k_perm = split(key, 5)
    batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
    alpha = keras.random.uniform((), 0.0, factor, seed=_seed(k_alpha)) + 1e-6
    w = keras.random.beta((batch,), alpha, alpha, seed=_seed(k_weight))
    ratio = ops.sqrt(1.0 - w)
    box = []
    for length, k in ((width, k_x), (height, k_y)):
        side = ratio * length
        start = keras.random.uniform((batch,), seed=_seed(k)) * (length - side)
        box.append((start[:, None, None], (start + side)[:, None, None]))
    (x0, x1), (y0, y1) = box
    ys, xs = ops.meshgrid(
        ops.arange(height, dtype="float32"), ops.arange(width, dtype="float32"), indexing="ij"
    )
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    area = (x1 - x0)[:, 0, 0] * (y1 - y0)[:, 0, 0] / (width * height)
    perm = keras.random.shuffle(ops.arange(batch, dtype="int32"), seed=_seed(k_perm))
    image_weight = 1.0 - ops.cast(inside, images.dtype)[..., None]
    return _blend(images, labels, perm, image_weight, 1.0 - area)


def mix_batch(images, labels, key, mixup=0.0, cutmix=0.0):
    """MixUp then CutMix on a batch, as the host pipeline applies
    `keras.layers.MixUp` and `keras.layers.CutMix`, their draws keyed by `key`
    (`step_key(..., MIX)`). `labels`: float one-hot (B, classes)."""
    k_mixup, k_cutmix = split(key, 2)
    if mixup:
        images, labels = mix_up(images, labels, k_mixup, mixup)
    if cutmix:
        images, labels = cut_mix(images, labels, k_cutmix, cutmix)
    return images, labels


def augment_and_mix(images, labels, step, seed, augment="reference", mixup=0.0, cutmix=0.0):
    """The augmentation of training batch `step` of the run seeded with `seed`,
    on its gathered examples (`images` (B, H, W, 3), uint8 or float; `labels`
    int class ids, or float one-hot (B, classes), which MixUp and CutMix
    need): the recipe `augment` (`AUGMENTATIONS`), then MixUp and CutMix.
    Returns `(float32 images in [0, 255], labels)`."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}; received {augment!r}.")
    images = ops.cast(images, "float32")
    if AUGMENTATIONS[augment] is not None:
        images = augment_batch(images, step_key(seed, step, AUGMENT), **AUGMENTATIONS[augment])
    if mixup or cutmix:
        images, labels = mix_batch(images, labels, step_key(seed, step, MIX), mixup, cutmix)
    return images, labels


def training_batch(
    images,
    labels,
    step,
    seed,
    batch_size,
    augment="reference",
    mixup=0.0,
    cutmix=0.0,
    num_classes=100,
    one_hot=False,
):
    """Training batch `step` of the run seeded with `seed`, from the whole
    training set (`images` uint8 (N, H, W, 3) and `labels` int (N,), on the
    device): the gather (`batch_indices`), then `augment_and_mix`. Returns
    `(float32 images in [0, 255], labels)`: int class ids, or float32 one-hot
    (B, num_classes) with MixUp, CutMix or `one_hot`.
    (RandAugment has no device-side form: `keras.layers.RandAugment` draws
    from its own state, not from a key.)"""
    index = batch_indices(step, seed, batch_size, images.shape[0])
    batch_labels = ops.take(labels, index, axis=0)
    if mixup or cutmix or one_hot:
        batch_labels = ops.one_hot(batch_labels, num_classes)
    return augment_and_mix(
        ops.take(images, index, axis=0), batch_labels, step, seed, augment, mixup, cutmix
    )
