"""The device-side input (nam_keras.data.device_augment) against the host
pipeline (nam_keras.data.pipeline): the same distributions of crops, flips,
rotations, brightness and contrast, measured on the outputs of both for the
same inputs; the gather's order contract; determinism in (seed, step); a
compiled step (jax.jit on JAX, XLA tf.function on TensorFlow).

Runs on any backend (the host pipeline needs TensorFlow installed, not as the
backend). On JAX every call goes through `jax.jit`: op-by-op dispatch compiles
each primitive and would cost more than the tests.
"""

import doctest
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from nam_keras.data import device_augment as da
from nam_keras.data import pipeline

JAX = keras.backend.backend() == "jax"
N = 2000  # images per distribution: per-bin frequencies to about +-0.007 (1 sd)
C = 15.5  # centre of a 32-pixel image


def compiled(fn, **static):
    """`fn` with `static` keyword arguments bound, jitted on JAX."""
    fn = functools.partial(fn, **static)
    if JAX:
        import jax

        return jax.jit(fn)
    return fn


def device(images, step=0, **recipe):
    """`device_augment.augment_batch` of `images` with the key of (7, step)."""
    run = compiled(lambda x, s: da.augment_batch(x, da.step_key(7, s), **recipe))
    return np.asarray(keras.ops.convert_to_numpy(run(images, np.int32(step))))


def host(images, **recipe):
    """`pipeline.augment_batch` of `images` (TensorFlow, seeded)."""
    return pipeline.augment_batch(images, tf.constant([3, 5]), **recipe).numpy()


def ramps(n):
    """Images whose channels 0 and 1 are 4 x + 40 and 4 y + 40 (x column, y
    row), channel 2 flat: the output of an affine resampling reveals the map."""
    y, x = np.mgrid[0:32, 0:32].astype("float32")
    image = np.stack([4 * x + 40, 4 * y + 40, np.full_like(x, 100)], axis=-1)
    return np.repeat(image[None], n, axis=0)


def affine_parameters(out):
    """Per-image (shift x, shift y, flipped, angle in degrees) of the map that
    produced `out` from `ramps`: a least-squares fit of the input coordinates
    over the central 12 x 12 pixels (inside the image for every shift and angle)."""
    y, x = np.mgrid[10:22, 10:22].astype("float64")
    design = np.stack([x.ravel(), y.ravel(), np.ones(x.size)], axis=1)
    window = out[:, 10:22, 10:22, :2].reshape(len(out), -1, 2)
    coef = np.linalg.lstsq(design, ((window - 40) / 4).transpose(1, 0, 2).reshape(144, -1))[0]
    a, b = coef[:, 0::2].T, coef[:, 1::2].T  # (n, 3): x_in and y_in as functions of (x, y, 1)
    shift_x = a[:, 0] * C + a[:, 1] * C + a[:, 2] - C
    shift_y = b[:, 0] * C + b[:, 1] * C + b[:, 2] - C
    flipped = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] < 0
    angle = np.degrees(np.arctan2(b[:, 0], b[:, 1]))
    return shift_x, shift_y, flipped, angle


def frequencies(values, support):
    return np.array([np.mean(values == v) for v in support])


def quantiles(values):
    return np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])


@pytest.mark.backend_independent  # eager on JAX: every primitive compiled, 9 s
def test_the_docstring_example_runs():
    result = doctest.testmod(da, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_the_recipes_are_the_host_pipelines():
    assert da.AUGMENTATIONS == pipeline.AUGMENTATIONS


def test_resampling_is_tensorflows_projective_transform(rng):
    """Bilinear, zero fill, the same coordinates: the kernel the host uses."""
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    draws = rng.uniform(size=(16, 4)).astype("float32")
    maps = keras.ops.convert_to_numpy(da._inverse_maps(draws, 32, 4, 15.0, True))
    got = keras.ops.convert_to_numpy(compiled(da.resample)(images, maps))
    want = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=np.concatenate([maps, np.zeros((16, 2), "float32")], axis=1),
        output_shape=[32, 32],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    ).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.fixture(scope="module")
def geometry():
    """Measured (shift x, shift y, flipped, angle) of the reference recipe's
    geometry, host and device, on the same ramp images."""
    images = ramps(N)
    recipe = {"brightness": 0.0, "contrast": 0.0}
    return affine_parameters(host(images, **recipe)), affine_parameters(device(images, **recipe))


def test_crops_shift_by_an_integer_uniform_in_plus_minus_4_as_on_the_host(geometry):
    for shift_x, shift_y, _, _ in geometry:
        for shift in (shift_x, shift_y):
            np.testing.assert_allclose(shift, np.round(shift), atol=1e-3)
    support = np.arange(-4, 5)
    (hx, hy, _, _), (dx, dy, _, _) = geometry
    for h, d in ((hx, dx), (hy, dy)):
        freq_h, freq_d = frequencies(np.round(h), support), frequencies(np.round(d), support)
        np.testing.assert_allclose(freq_d, 1 / 9, atol=0.035)
        np.testing.assert_allclose(freq_d, freq_h, atol=0.04)
    assert abs(np.corrcoef(dx, dy)[0, 1]) < 0.08  # independent per axis


def test_flips_half_of_the_images_as_on_the_host(geometry):
    (_, _, flip_h, _), (shift_x, _, flip_d, _) = geometry
    assert abs(flip_d.mean() - 0.5) < 0.04 and abs(flip_d.mean() - flip_h.mean()) < 0.05
    assert abs(np.corrcoef(flip_d, shift_x)[0, 1]) < 0.08


def test_rotations_are_uniform_in_plus_minus_15_degrees_as_on_the_host(geometry):
    (_, _, _, angle_h), (_, _, _, angle_d) = geometry
    assert np.abs(angle_d).max() <= 15.01 and np.abs(angle_d).max() > 14.5
    np.testing.assert_allclose(quantiles(angle_d), [-13.5, -7.5, 0, 7.5, 13.5], atol=1.2)
    np.testing.assert_allclose(quantiles(angle_d), quantiles(angle_h), atol=1.5)


def test_crop_flip_recipe_has_no_rotation():
    out = device(ramps(256), **da.AUGMENTATIONS["crop-flip"])
    shift_x, _, flipped, angle = affine_parameters(out)
    np.testing.assert_allclose(angle, 0.0, atol=1e-3)
    assert 0.35 < flipped.mean() < 0.65 and set(np.round(shift_x)) == set(range(-4, 5))


def factors(out_h, out_d):
    """Both sides' factors: the fraction left at 1 and the quantiles of the others."""
    result = []
    for f in (out_h, out_d):
        changed = np.abs(f - 1.0) > 1e-6
        assert np.all(np.abs(f - 1.0) <= 0.1 + 1e-4)
        result.append((1 - changed.mean(), quantiles(f[changed])))
    return result


def assert_factor_distribution(out_h, out_d):
    """Factors 1 with probability 0.5, else uniform in [0.9, 1.1], on both sides."""
    (kept_h, q_h), (kept_d, q_d) = factors(out_h, out_d)
    assert abs(kept_d - 0.5) < 0.04 and abs(kept_d - kept_h) < 0.05
    np.testing.assert_allclose(q_d, [0.91, 0.95, 1.0, 1.05, 1.09], atol=0.01)
    np.testing.assert_allclose(q_d, q_h, atol=0.012)


NO_GEOMETRY = {"pad": 0, "flip": False, "rotation_deg": 0.0}


def test_brightness_scales_by_a_factor_in_0_9_to_1_1_half_the_time_as_on_the_host():
    """Flat images: the output over the input is the brightness factor."""
    images = np.full((N, 32, 32, 3), 100.0, "float32")
    recipe = {**NO_GEOMETRY, "contrast": 0.0}
    out_h, out_d = host(images, **recipe), device(images, **recipe)
    np.testing.assert_allclose(out_d, out_d[:, :1, :1, :1] * np.ones_like(out_d), rtol=1e-6)
    assert_factor_distribution(out_h[:, 0, 0, 0] / 100, out_d[:, 0, 0, 0] / 100)


def test_contrast_scales_about_the_grey_mean_half_the_time_as_on_the_host():
    """Half 50, half 150 (grey mean 100): the spread over 100 is the factor."""
    images = np.full((N, 32, 32, 3), 50.0, "float32")
    images[:, :, 16:] = 150.0
    recipe = {**NO_GEOMETRY, "brightness": 0.0}
    out_h, out_d = host(images, **recipe), device(images, **recipe)
    np.testing.assert_allclose(out_d[:, 0, 0] + out_d[:, 0, 31], 200.0, atol=1e-3)
    assert_factor_distribution(
        (out_h[:, 0, 31, 0] - out_h[:, 0, 0, 0]) / 100,
        (out_d[:, 0, 31, 0] - out_d[:, 0, 0, 0]) / 100,
    )


def test_reference_output_is_float32_in_range_and_matches_the_hosts_statistics(rng):
    images = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    out_d = device(images)
    out_h = host(images.astype("float32"))
    assert out_d.shape == images.shape and out_d.dtype == np.float32
    assert out_d.min() >= 0.0 and out_d.max() <= 255.0
    for stat in (np.mean, np.std):
        s_h, s_d = stat(out_h, axis=(1, 2, 3)), stat(out_d, axis=(1, 2, 3))
        np.testing.assert_allclose(quantiles(s_d), quantiles(s_h), rtol=0.03)
    # zero-filled border pixels: same share on both sides (shifts and rotations)
    assert abs(np.mean(out_d == 0) - np.mean(out_h == 0)) < 0.01


def test_a_step_is_a_pure_function_of_seed_and_step(rng):
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 64)
    batch = compiled(da.training_batch, batch_size=16, mixup=0.2, cutmix=1.0)
    a, b = (batch(images, labels, np.int32(5), np.int32(0)) for _ in range(2))
    other_step = batch(images, labels, np.int32(6), np.int32(0))
    other_seed = batch(images, labels, np.int32(5), np.int32(1))
    as_np = keras.ops.convert_to_numpy
    for x, y in zip(a, b):
        np.testing.assert_array_equal(as_np(x), as_np(y))
    for other in (other_step, other_seed):
        assert not np.allclose(as_np(a[0]), as_np(other[0]))


def test_batch_indices_walk_through_a_new_permutation_every_pass():
    index = compiled(da.batch_indices, batch_size=4, n=10)
    order = np.concatenate([keras.ops.convert_to_numpy(index(s, 0)) for s in range(10)])
    passes = order.reshape(4, 10)  # 40 positions: 4 passes, batches 2 and 7 span two
    for p in passes:
        assert sorted(p) == list(range(10))
    assert len({tuple(p) for p in passes}) == 4
    other_seed = keras.ops.convert_to_numpy(index(0, 1))
    assert not np.array_equal(other_seed, order[:4])


def flat_classes(n, size=8):
    """Images of value 10 x i (i = 0..n-1) and their one-hot labels."""
    classes = np.arange(n)
    images = np.repeat(10.0 * classes, size * size * 3).reshape(n, size, size, 3)
    return images.astype("float32"), np.eye(n, dtype="float32")


def ks_distance(a, b):
    """Kolmogorov-Smirnov distance of two samples."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)
    return np.abs(cdf(a) - cdf(b)).max()


def mixed_only(weights):
    """The weights below 1: drops the images a permutation left in place (and,
    alike for every sample, the draws within 1e-6 of 1)."""
    return weights[weights < 1 - 1e-6]


def own_weights(labels):
    """Each mixed image's label weight on its own class."""
    return mixed_only(np.diag(np.asarray(labels)))


def host_mix(layer, images, labels, step):
    """The host pipeline's MixUp/CutMix (`pipeline._mix`) of batch `step`, the
    layer on TensorFlow whatever the Keras backend (as in `tf.data`)."""
    key = pipeline.augmentation_seed(step, 0, stream=2)
    layer.backend.set_backend("tensorflow")
    try:
        return [t.numpy() for t in pipeline._mix([layer], images, labels, key)]
    finally:
        layer.backend.reset()


def test_mixup_weights_are_beta_alpha_alpha_as_on_the_host():
    """Flat images of value 10 x class: the output is its labels' mean class x 10."""
    images, labels = flat_classes(N, size=2)
    out, mixed = (
        keras.ops.convert_to_numpy(t)
        for t in compiled(da.mix_batch, mixup=0.4)(images, labels, da.step_key(0, 3, da.MIX))
    )
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out[:, 0, 0, 0], 10.0 * mixed @ np.arange(N), rtol=1e-4, atol=0.05)
    layer = keras.layers.MixUp(alpha=0.4, dtype="float32")
    theory = mixed_only(np.random.default_rng(0).beta(0.4, 0.4, 100_000))
    host_w, device_w = own_weights(host_mix(layer, images, labels, 3)[1]), own_weights(mixed)
    assert len(device_w) > 0.99 * N - 10
    assert ks_distance(device_w, theory) < 0.045 and ks_distance(host_w, theory) < 0.045


def test_cutmix_pastes_a_box_weighted_by_its_area_as_on_the_host():
    """Keras' CutMix: per batch alpha ~ U(0, factor), per image w ~ Beta(alpha,
    alpha), a box of area 1 - w from another image; 100 batches of 20."""
    images, labels = flat_classes(20)
    mix = compiled(da.mix_batch, cutmix=1.0)
    layer = keras.layers.CutMix(factor=1.0, dtype="float32")
    device_w, host_w = [], []
    for step in range(100):
        out, mixed = (
            keras.ops.convert_to_numpy(t) for t in mix(images, labels, da.step_key(0, step, da.MIX))
        )
        for i in range(20):  # every pixel from the image itself or from the one it mixes with
            assert set(np.unique(out[i])) <= {10.0 * j for j in np.flatnonzero(mixed[i])}
        own = np.mean(out == images, axis=(1, 2, 3))
        np.testing.assert_allclose(own, np.diag(mixed), atol=0.3)  # box area vs its bounds
        device_w.append(own_weights(mixed))
        host_w.append(own_weights(host_mix(layer, images, labels, step)[1]))
    device_w, host_w = np.concatenate(device_w), np.concatenate(host_w)
    rng = np.random.default_rng(0)
    theory = mixed_only(rng.beta(*[np.repeat(rng.uniform(0, 1, 5000) + 1e-6, 20)] * 2))
    # 100 draws of alpha: a looser bound than MixUp's (measured 0.036-0.045 on both sides)
    assert ks_distance(device_w, theory) < 0.08 and ks_distance(host_w, theory) < 0.08


# On JAX, test_a_step_is_a_pure_function_of_seed_and_step compiles MixUp and CutMix.
MIXINGS = [{}] if JAX else [{}, {"mixup": 0.2, "cutmix": 1.0}]


@pytest.mark.parametrize("mixing", MIXINGS)
def test_runs_compiled(mixing):
    """The whole batch (gather, augmentation, mixing) in one XLA program on JAX;
    on TensorFlow in one graph, XLA without MixUp/CutMix (TensorFlow has no XLA
    kernel for the stateless gamma draws of their Beta weights)."""
    images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(64) % 100

    def batch(step):
        return da.training_batch(images, labels, step, 0, 16, one_hot=True, **mixing)

    if JAX:
        import jax

        run = jax.jit(batch)
    else:
        run = tf.function(batch, jit_compile=not mixing)
    out = [keras.ops.convert_to_numpy(t) for t in run(np.int32(3))]
    assert out[0].shape == (16, 32, 32, 3) and out[1].shape == (16, 100)
    assert out[0].min() >= 0 and out[0].max() <= 255 and out[0].std() > 10
    np.testing.assert_allclose(out[1].sum(axis=1), 1.0, rtol=1e-5)
