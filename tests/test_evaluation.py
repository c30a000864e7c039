"""The accuracy report, the NAM figures and report, softmax and flip TTA,
against hand computations."""

import numpy as np
import pytest

import nam_keras
from nam_keras.models.resnet import nam_weight_figures
from nam_keras.reports import evaluation
from nam_keras.training.callbacks import NAMSparsity


def test_accuracy_report_by_hand():
    logits = np.array([[5, 4, 3, 2, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6], [1, 0, 0, 0, 0, 0, 0]], float)
    logits = np.pad(logits, ((0, 0), (0, 93)), constant_values=-10)
    labels = np.array([0, 1, 99])
    r = evaluation.accuracy_report(logits, labels)
    assert r["top1"] == pytest.approx(1 / 3)  # only the first
    assert r["top5"] == pytest.approx(1 / 3)  # label 1 is 6th of row 2; 99 is last of row 3
    p0 = np.exp(logits[0]) / np.exp(logits[0]).sum()
    p1 = np.exp(logits[1]) / np.exp(logits[1]).sum()
    p2 = np.exp(logits[2]) / np.exp(logits[2]).sum()
    assert r["loss"] == pytest.approx(-(np.log(p0[0]) + np.log(p1[1]) + np.log(p2[99])) / 3)
    assert r["per_class_accuracy"] == {"apple": 1.0, "aquarium_fish": 0.0, "worm": 0.0}
    assert [w["class"] for w in r["worst_classes"]] == ["aquarium_fish", "worm", "apple"]


def test_nam_report_weights_are_gamma_over_sum(rng):
    model = nam_keras.build_resnet(depth=18, width=8)
    for layer in nam_keras.nam_layers(model):
        n = layer.channel_bn.gamma.shape[0]
        layer.channel_bn.gamma.assign(rng.normal(size=n).astype("float32"))
    report = evaluation.nam_report(model, near_zero=0.5)
    below = total = 0
    for layer, entry in zip(nam_keras.nam_layers(model), report["layers"]):
        g = np.abs(layer.channel_bn.gamma.numpy().astype(np.float64))
        np.testing.assert_allclose(entry["channel"]["weights"], g / g.sum(), rtol=1e-6)
        expected = int((g / g.sum() < 0.5 / g.size).sum())
        assert entry["channel"]["near_zero"] == expected
        below, total = below + expected, total + g.size
    assert report["near_zero_fraction"] == pytest.approx(below / total)
    assert 0 < below < total


def test_console_lines_of_the_reports():
    test = {
        "examples": 3,
        "loss": 1.25,
        "top1": 0.5,
        "top5": 0.75,
        "worst_classes": [{"class": "worm", "accuracy": 0.0}],
    }
    assert evaluation.accuracy_lines("m", test) == [
        "m on 3 test images: loss 1.2500, top-1 50.00%, top-5 75.00%",
        "worst classes: worm 0%",
    ]
    assert evaluation.nam_lines(None, 0.1) == [
        "NAM report: the model has no NAM layers (a baseline); nothing to report."
    ]


def test_superclass_report_by_hand():
    from nam_keras.cifar100 import CIFAR100_COARSE_LABELS as COARSE
    from nam_keras.cifar100 import CIFAR100_LABELS

    index = CIFAR100_LABELS.index
    labels = np.array([index("apple"), index("aquarium_fish"), index("baby")])
    # apple right; aquarium_fish taken for a trout (same superclass: fish); baby for a bear
    predicted = [index("apple"), index("trout"), index("bear")]
    logits = np.full((3, 100), -5.0)
    logits[np.arange(3), predicted] = 5.0
    r = evaluation.accuracy_report(logits, labels)
    assert r["superclass_top1"] == pytest.approx(2 / 3)
    assert r["near_miss"] == pytest.approx(1 / 3)
    assert r["per_superclass"]["fish"] == {"examples": 1, "top1": 0.0, "superclass_top1": 1.0}
    assert r["per_superclass"]["people"]["superclass_top1"] == 0.0
    assert set(r["per_superclass"]) == {"fruit_and_vegetables", "fish", "people"}
    # confusion matrices: rows the true class, columns the predicted one
    cells = {
        (i, j): n for i, row in enumerate(r["confusion_matrix"]) for j, n in enumerate(row) if n
    }
    assert cells == dict.fromkeys(zip(labels, predicted), 1)
    coarse = COARSE.index
    sup = {
        (i, j): n
        for i, row in enumerate(r["superclass_confusion_matrix"])
        for j, n in enumerate(row)
        if n
    }
    assert sup == {
        (coarse("fruit_and_vegetables"), coarse("fruit_and_vegetables")): 1,
        (coarse("fish"), coarse("fish")): 1,
        (coarse("people"), coarse("large_carnivores")): 1,
    }
    lines = evaluation.accuracy_lines("m", r)
    assert "superclasses: top-1 66.67%; near misses (wrong class, right superclass) 33.33%" in (
        "\n".join(lines)
    )


def test_flip_tta_averages_the_image_and_its_mirror(tmp_path):
    import keras

    from nam_keras.config import EvalConfig
    from nam_keras.data import sources

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    logits = keras.layers.Dense(100)(keras.layers.Flatten()(inputs / 255.0))
    model = keras.Model(inputs, logits)  # not mirror-symmetric: flipping changes its output
    config = EvalConfig(model="m", dataset="synthetic", synthetic_size=(8, 16), batch_size=5)
    images, labels = sources.load_for(config)["test"]
    x = images.astype("float32")
    a = evaluation.softmax(np.asarray(model(x), np.float64))
    b = evaluation.softmax(np.asarray(model(x[:, :, ::-1]), np.float64))
    assert not np.allclose(a, b)
    mean = (a + b) / 2
    want = -np.log(mean[np.arange(len(labels)), labels]).mean()
    plain = evaluation.evaluate_test_set(model, config)
    tta = evaluation.evaluate_test_set(model, EvalConfig(**{**vars(config), "tta": "flip"}))
    assert tta["loss"] == pytest.approx(want, rel=1e-5)
    assert plain["loss"] == pytest.approx(-np.log(a[np.arange(16), labels]).mean(), rel=1e-5)
    assert tta["top1"] == pytest.approx((mean.argmax(1) == labels).mean())


def _assign_ones_except_first(model, first):
    layers = nam_keras.nam_layers(model)
    for layer in layers:
        layer.channel_bn.gamma.assign(np.ones(layer.channel_bn.gamma.shape, "float32"))
    layers[0].channel_bn.gamma.assign(np.asarray(first, "float32"))
    return layers


def test_nam_weight_figures_by_hand():
    model = nam_keras.build_resnet(depth=18, width=4, input_shape=(8, 8, 3))
    layers = _assign_ones_except_first(model, [0.01, -1.0, 2.0, 1.0])
    figures = nam_weight_figures(model, near_zero=0.1)
    # layer 0: |gamma| / 4.01 * 4 = [0.00998, 0.998, 1.995, 0.998]: one below 0.1;
    # every other layer is uniform (1.0 each)
    first = figures["layers"][0]["channel"]
    np.testing.assert_allclose(first["weights"], np.array([0.01, 1, 2, 1]) / 4.01, rtol=1e-6)
    np.testing.assert_allclose(first["relative"], np.array([0.01, 1, 2, 1]) * 4 / 4.01, rtol=1e-6)
    assert first["near_zero"] == 1
    assert all(e["channel"]["near_zero"] == 0 for e in figures["layers"][1:])
    assert [e["layer"] for e in figures["layers"]] == [layer.name for layer in layers]
    channels = sum(layer.channel_bn.gamma.shape[0] for layer in layers)
    assert figures["channels"] == channels and figures["near_zero_channels"] == 1
    assert figures["near_zero_fraction"] == pytest.approx(1 / channels)
    assert figures["max_relative"] == pytest.approx(8 / 4.01)
    # the same from the layers, and a threshold above 1 counts every uniform weight too
    from_layers = nam_weight_figures(layers, near_zero=1.0)
    assert from_layers["near_zero_channels"] == 1 + 2  # 0.00998 and the two 0.998


def test_nam_weight_figures_count_spatial_weights_per_layer_only():
    model = nam_keras.build_resnet(
        depth=18, width=4, input_shape=(8, 8, 3), attention_kwargs={"spatial": True}
    )
    figures = nam_weight_figures(model)
    entry = figures["layers"][0]
    assert entry["spatial"]["weights"].size == 8 * 8  # one weight per pixel position
    assert entry["spatial"]["weights"].sum() == pytest.approx(1.0)
    assert figures["channels"] == sum(e["channel"]["weights"].size for e in figures["layers"])
    plain = nam_keras.build_resnet(depth=18, width=4, input_shape=(8, 8, 3), attention=None)
    assert nam_weight_figures(plain) is None


def test_nam_sparsity_and_nam_report_agree(rng):
    model = nam_keras.build_resnet(depth=18, width=8)
    for layer in nam_keras.nam_layers(model):
        n = layer.channel_bn.gamma.shape[0]
        layer.channel_bn.gamma.assign(rng.normal(size=n).astype("float32"))
    sparsity = NAMSparsity(near_zero=0.3)
    sparsity.set_model(model)
    logs = sparsity.figures()
    report = evaluation.nam_report(model, near_zero=0.3)
    assert logs["nam_near_zero"] == report["near_zero_fraction"]
    assert 0 < report["near_zero_fraction"] < 1
    peak = max(e["channel"]["relative_to_uniform"]["max"] for e in report["layers"])
    assert logs["nam_max_weight"] == peak > 1


def test_softmax_log_softmax_and_flip_average_by_hand():
    a = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    b = np.array([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    p = np.exp(a[0]) / np.exp(a[0]).sum()
    np.testing.assert_allclose(evaluation.softmax(a)[0], p, rtol=1e-12)
    np.testing.assert_allclose(evaluation.softmax(a)[1], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(evaluation.log_softmax(a)[0], np.log(p), rtol=1e-12)
    assert evaluation.log_softmax(a)[1, 2] == pytest.approx(-2000.0)  # finite, not -inf
    mean = (evaluation.softmax(a) + evaluation.softmax(b)) / 2
    np.testing.assert_allclose(np.exp(evaluation.flip_average(a, b)), mean, rtol=1e-12)
    np.testing.assert_allclose(evaluation.flip_average(a, a), evaluation.log_softmax(a))
