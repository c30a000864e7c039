"""XLA's cost analysis of one training step: FLOPs and bytes accessed per attention module.

    python bench/xla_cost.py --json xla_cost.json       # ResNet-50, batch 64, mixed_bfloat16
    python bench/xla_cost.py --modules baseline,nam --nam-kwargs '{"float32_gate": true}'
    python bench/xla_cost.py --modules nam,nam_unfused   # BatchNormNAM against BN then NAM
    python bench/xla_cost.py --nam-kwargs '{}' --nam-kwargs '{"float32_gate": false}'
    python bench/xla_cost.py --smoke                    # seconds: depth 18, width 4, 16x16
    KERAS_BACKEND=tensorflow python bench/xla_cost.py   # TensorFlow's step, jit_compile=True

Device-independent and quick: nothing is timed and nothing runs, so any
machine gives the same table (needs Keras, JAX and NumPy; no GPU). For every
module, `nam_keras.build_resnet` under `--precision` and the jitted training
step of bench/gpu.py (`keras_train_step`: forward, backward, TorchSGD update;
one step per execution) are lowered with abstract inputs and compiled by XLA
for the CPU, and `compiled.cost_analysis()` gives the step's FLOPs and bytes
accessed (reads plus writes of every HLO instruction after XLA's fusion),
printed absolute and relative to the plain ResNet. Bytes, not FLOPs, track the
cost of the element-wise parts (BN, gates, casts) that make a step
memory-bound. KERAS_BACKEND is jax unless set; under
`KERAS_BACKEND=tensorflow` the step is TensorFlow's own (same model, loss and
optimizer) compiled with `jit_compile=True`, as Keras' "auto" does on a GPU,
and jaxlib's XLA costs TensorFlow's HLO of it (bench/tensorflow_xla.py; needs
TensorFlow too).
`--nam-kwargs` (repeatable) adds one NAM row per JSON dict of `NAMAttention`
arguments, so NAM variants can be compared in one run. A JAX compilation
cache, where one is configured, gives the same figures (only `compile_s`, the
seconds to lower and compile, shrinks).
"""

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import harness
import keras
from gpu import keras_train_step, step_optimizer

from nam_keras import build_resnet

MODULES = ("baseline", "nam", "se", "cbam", "bam")
#: extra rows by name: (attention, build_resnet arguments)
VARIANTS = {"nam_unfused": ("nam", {"fuse_attention": False})}
SMOKE = {"depth": 18, "width": 4, "size": 16, "batch": 4}
#: the keys of `cost_analysis()` reported, and their names in the rows.
COSTS = {"flops": "flops", "bytes accessed": "bytes_accessed", "transcendentals": "transcendentals"}


def cost_figures(analysis):
    """`{"flops": ..., "bytes_accessed": ..., "transcendentals": ...}` from
    `compiled.cost_analysis()`: a dict (recent JAX) or a list of dicts, one
    per program (older JAX), whose figures are summed. Missing keys are 0."""
    if analysis is None:
        raise RuntimeError("XLA gave no cost analysis for this executable")
    programs = [analysis] if isinstance(analysis, dict) else list(analysis)
    return {name: float(sum(p.get(key, 0.0) for p in programs)) for key, name in COSTS.items()}


def abstract(value, device):
    """A `jax.ShapeDtypeStruct` of `value`, placed on `device`."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)


def model_and_optimizer(cfg, attention, kwargs, build_kwargs=None):
    """A fresh, seeded ResNet of `cfg` with `attention` under `cfg["precision"]`,
    and its optimizer as bench/gpu.py builds it (`step_optimizer`)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_resnet(
        depth=cfg["depth"],
        width=cfg["width"],
        attention=attention,
        attention_kwargs=kwargs or None,
        input_shape=(cfg["size"], cfg["size"], 3),
        dtype=cfg["precision"],
        **(build_kwargs or {}),
    )
    return model, step_optimizer(model, cfg["precision"])


def jax_step_analysis(model, optimizer, cfg, device):
    """`cost_analysis()` of bench/gpu.py's jitted step, lowered with abstract inputs on `device`."""
    import jax

    state = [
        [abstract(v.value, device) for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables)
    ] + [[abstract(v.value, device) for v in optimizer.variables]]
    sharding = jax.sharding.SingleDeviceSharding(device)
    size = cfg["size"]
    x = jax.ShapeDtypeStruct((cfg["batch"], size, size, 3), "float32", sharding=sharding)
    y = jax.ShapeDtypeStruct((cfg["batch"],), "int32", sharding=sharding)
    return keras_train_step(model, optimizer, 1).lower(state, x, y).compile().cost_analysis()


def step_costs(cfg, attention, kwargs, device, build_kwargs=None):
    """Cost figures of one compiled training step of the ResNet with `attention`:
    JAX's, or under KERAS_BACKEND=tensorflow TensorFlow's own step compiled with
    XLA (bench/tensorflow_xla.py: the same model, loss and optimizer)."""
    model, optimizer = model_and_optimizer(cfg, attention, kwargs, build_kwargs)
    start = time.perf_counter()
    if keras.backend.backend() == "tensorflow":
        from tensorflow_xla import step_cost_analysis

        analysis = step_cost_analysis(model, optimizer, cfg["batch"], cfg["size"])
    else:
        analysis = jax_step_analysis(model, optimizer, cfg, device)
    row = cost_figures(analysis)
    row["compile_s"] = time.perf_counter() - start
    row["parameters"] = model.count_params()
    return row


def module_list(args):
    """`[(label, attention, kwargs, build_kwargs)]`: the baseline first, one NAM
    row per `--nam-kwargs` (and per `nam_unfused`)."""
    names = [m.strip().lower() for m in args.modules.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODULES) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown modules {unknown}; expected some of {[*MODULES, *VARIANTS]}")
    variants = [json.loads(k) for k in args.nam_kwargs or ["{}"]]
    out = [("baseline", None, {}, {})]
    for name in dict.fromkeys(names):
        attention, build_kwargs = VARIANTS.get(name, (name, {}))
        if attention == "nam":
            for kwargs in variants:
                label = f"{name} {json.dumps(kwargs, sort_keys=True)}" if kwargs else name
                out.append((label, "nam", kwargs, build_kwargs))
        elif name != "baseline":
            out.append((name, name, {}, build_kwargs))
    return out


def print_header(cfg):
    print(
        f"ResNet-{cfg['depth']} width {cfg['width']}, {cfg['size']}x{cfg['size']}, "
        f"batch {cfg['batch']}, {cfg['precision']}, one jitted training step"
    )
    head = ("module", "GFLOPs", "GB accessed", "FLOPs vs", "bytes vs", "compile s")
    print(f"{head[0]:<30}" + "".join(f"{h:>12}" for h in head[1:]))
    print(f"{'':<54}{'baseline':>12}{'baseline':>12}")


def print_row(r):
    print(
        f"{r['module']:<30}{r['flops'] / 1e9:>12.2f}{r['bytes_accessed'] / 1e9:>12.3f}"
        f"{r['flops_ratio']:>12.3f}{r['bytes_ratio']:>12.3f}{r['compile_s']:>12.1f}",
        flush=True,
    )


def main(argv=None):
    """Runs the analysis; returns the rows (one dict per module, the baseline first)."""
    p = harness.parser(__doc__.split("\n\n")[0], steps=0, warmup=0)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="mixed_bfloat16", help="a Keras dtype policy")
    p.add_argument(
        "--modules",
        default=",".join(MODULES),
        help="comma list of " + ",".join([*MODULES, *VARIANTS]),
    )
    p.add_argument(
        "--nam-kwargs",
        action="append",
        help="JSON arguments of NAMAttention, e.g. '{\"float32_gate\": false}' (repeatable)",
    )
    p.add_argument("--smoke", action="store_true", help="depth 18, width 4, 16x16, batch 4")
    args = p.parse_args(argv)
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        raise SystemExit(
            f"bench/xla_cost.py runs on KERAS_BACKEND=jax or tensorflow (got {backend})"
        )
    import jax
    import jaxlib

    cfg = {"depth": args.depth, "width": args.width, "size": args.size, "batch": args.batch}
    cfg.update(SMOKE if args.smoke else {}, precision=args.precision)
    device = jax.devices("cpu")[0]
    software = {"keras": keras.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    if backend == "tensorflow":
        import tensorflow as tf

        software["tensorflow"] = tf.__version__
    print(f"machine: {harness.machine()}; {software}; {backend}'s step compiled for {device}")
    print_header(cfg)
    rows = []
    for label, attention, kwargs, build_kwargs in module_list(args):
        r = {"module": label, "attention": attention, "attention_kwargs": kwargs, **build_kwargs}
        r.update(step_costs(cfg, attention, kwargs, device, build_kwargs))
        base = rows[0] if rows else r
        r["flops_ratio"] = r["flops"] / base["flops"]
        r["bytes_ratio"] = r["bytes_accessed"] / base["bytes_accessed"]
        rows.append(r)
        print_row(r)
    harness.write_json(
        args.json, {"settings": cfg, "backend": backend, "software": software, "rows": rows}
    )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
