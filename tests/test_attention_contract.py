"""The contract of every registered attention module, checked for each name in
`nam_keras.ATTENTIONS`: a module registered later is tested without editing
this file (only `LOSSES` below must name it: what it adds with `add_loss`).

The numeric checks of each module (against NumPy, parameter counts by hand)
are in tests/test_attention.py and tests/test_attention_baselines.py.
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import nam_keras
from nam_keras import ATTENTIONS, build_resnet, create_attention
from nam_keras.layers.attention import BATCH_NORM_FUSIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = sorted(ATTENTIONS)
SHAPE = (2, 8, 8, 32)
BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")

#: kind -> [(constructor arguments, number of losses a training call adds)]:
#: NAM's L1 sparsity penalty is one loss, none with `sparsity=0`.
LOSSES = {
    "nam": [({}, 1), ({"sparsity": 0.0}, 0)],
    "se": [({}, 0)],
    "cbam": [({}, 0)],
    "bam": [({}, 0)],
}


def test_the_loss_table_covers_exactly_the_registry():
    assert sorted(LOSSES) == KINDS


def inputs(seed=0):
    return np.random.default_rng(seed).normal(0.5, 2.0, size=SHAPE).astype("float32")


def sublayers(layer):
    """Every layer `layer` holds, at any depth, through its attributes (lists
    and tuples of layers included, as BAM's `dilated`)."""
    found, seen = [], {id(layer)}

    def visit(value):
        if isinstance(value, keras.layers.Layer):
            if id(value) in seen:
                return
            seen.add(id(value))
            found.append(value)
            for child in vars(value).values():
                visit(child)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for child in vars(layer).values():
        visit(child)
    return found


def batch_normalizations(layer):
    return [la for la in sublayers(layer) if isinstance(la, keras.layers.BatchNormalization)]


def randomise(layer, rng):
    """Every weight (BN moving statistics included) away from its initial value."""
    for w in layer.weights:
        if w.name == "moving_variance":
            value = rng.uniform(0.5, 1.5, w.shape)
        else:
            value = rng.normal(0.0, 0.5, w.shape)
        w.assign(value.astype("float32"))


def constructor_defaults(cls):
    """`{argument: default}` of the `__init__` of `cls` and of its own bases
    (up to the first Keras class), `*args`/`**kwargs` left out."""
    found = {}
    for klass in cls.__mro__:
        if klass.__module__.startswith("keras"):
            break
        if "__init__" not in vars(klass):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            found.setdefault(name, param.default)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_and_compute_output_shape(kind):
    layer = create_attention(kind, "attn")
    x = inputs()
    for training in (True, False):
        assert tuple(layer(x, training=training).shape) == SHAPE
    assert tuple(layer.compute_output_shape(SHAPE)) == SHAPE
    assert tuple(layer.compute_output_shape((None, *SHAPE[1:]))) == (None, *SHAPE[1:])


@pytest.mark.parametrize("synchronized", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_create_attention_passes_name_and_synchronized(kind, synchronized):
    layer = create_attention(kind, f"my_{kind}", synchronized=synchronized)
    assert type(layer) is ATTENTIONS[kind]
    assert layer.name == f"my_{kind}" and not layer.built
    assert tuple(layer(inputs(), training=True).shape) == SHAPE
    assert layer.get_config()["synchronized"] is synchronized
    # every BN of the module asked for it (Keras honours it on TensorFlow only)
    for bn in batch_normalizations(layer):
        assert bn.get_config()["synchronized"] is synchronized, bn.name


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip_gives_the_same_layer(kind):
    layer = create_attention(kind, "attn")
    x = inputs()
    layer.build(x.shape)
    randomise(layer, np.random.default_rng(1))
    config = layer.get_config()
    assert json.loads(json.dumps(config)) == config  # JSON only
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone.build(x.shape)
    assert [w.path.split("/", 1)[1] for w in clone.weights] == [
        w.path.split("/", 1)[1] for w in layer.weights
    ]
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(clone(x, training=False)),
        keras.ops.convert_to_numpy(layer(x, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_constructor_argument_is_in_the_config(kind):
    cls = ATTENTIONS[kind]
    defaults = constructor_defaults(cls)
    assert "synchronized" in defaults  # the registry's contract (`register_attention`)
    config = create_attention(kind, "attn").get_config()
    for name, default in defaults.items():
        assert name in config, f"{cls.__name__}.get_config() lacks {name!r}"
        if default is not inspect.Parameter.empty:
            assert config[name] == default, name


@pytest.mark.parametrize("kind", KINDS)
def test_an_explicit_mixed_policy_reaches_every_sublayer(kind):
    layer = create_attention(kind, "attn", dtype="mixed_bfloat16")
    x = inputs()
    spec = layer(keras.KerasTensor(SHAPE, dtype="float32"), training=False)
    out = layer(x, training=True)
    assert (layer.dtype_policy.name, layer.compute_dtype, layer.variable_dtype) == (
        "mixed_bfloat16",
        "bfloat16",
        "float32",
    )
    assert layer.weights and all(
        keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.weights
    )
    assert sublayers(layer)
    for sub in sublayers(layer):
        assert sub.dtype_policy.name == "mixed_bfloat16", sub.name
    # the output dtype is the one the layer declares (NAM's float32 gate: float32);
    # a layer that declares none returns its compute dtype
    got = keras.backend.standardize_dtype(out.dtype)
    assert got == keras.backend.standardize_dtype(spec.dtype)
    if type(layer).compute_output_spec is keras.layers.Layer.compute_output_spec:
        assert got == "bfloat16"


@pytest.mark.parametrize(
    "kind, kwargs, count",
    [(kind, kwargs, count) for kind in KINDS for kwargs, count in LOSSES.get(kind, [])],
)
def test_losses_after_a_training_call(kind, kwargs, count):
    layer = create_attention(kind, "attn", **kwargs)
    x = inputs()
    for _ in range(2):  # the losses of the last call only, not accumulated
        layer(x, training=True)
        assert len(layer.losses) == count
    for loss in layer.losses:
        assert np.isfinite(float(loss)) and float(loss) > 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_placement(kind):
    assert ATTENTIONS[kind].placement in ("block", "stage")


# ------------------------------------------------------------------ .keras files


CHILD = """
import json, sys
import keras, numpy as np
import nam_keras
x = np.load("x.npy")
classes = {}
for kind in sys.argv[1:]:
    model = keras.models.load_model(f"{kind}.keras")
    np.save(f"{kind}.got.npy", keras.ops.convert_to_numpy(model(x, training=False)))
    classes[kind] = sorted({
        type(layer).__name__ for layer in model.layers if layer.name.endswith("_" + kind)
    })
print(json.dumps(classes))
"""


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every kind's tiny ResNet (BN variables moved off their initial values)
    saved here and loaded by one fresh Python process: `{kind: (predictions
    before, predictions after, attention classes after)}`."""
    root = tmp_path_factory.mktemp("contract")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.save(root / "x.npy", x)
    want = {}
    for kind in KINDS:
        model = build_resnet(depth=18, width=4, input_shape=(16, 16, 3), attention=kind)
        for w in model.weights:
            if w.name in BN_VARIABLES:
                low = 0.5 if w.name in ("gamma", "moving_variance") else -0.5
                w.assign(rng.uniform(low, low + 1.0, w.shape).astype("float32"))
        model.save(root / f"{kind}.keras")
        want[kind] = keras.ops.convert_to_numpy(model(x, training=False))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), *KINDS],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"the loading process failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    classes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: (want[k], np.load(root / f"{k}.got.npy"), classes[k]) for k in KINDS}


# On TensorFlow only: tests/test_backends.py moves .keras files of these modules
# between TensorFlow and JAX processes, which is this round trip on JAX.
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("kind", KINDS)
def test_keras_file_round_trip_in_a_fresh_process(reloaded, kind):
    want, got, classes = reloaded[kind]
    built = BATCH_NORM_FUSIONS.get(kind, ATTENTIONS[kind])  # what build_resnet puts in blocks
    assert classes == [built.__name__]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_package_exports_every_registered_class():
    for cls in ATTENTIONS.values():
        assert getattr(nam_keras, cls.__name__) is cls
