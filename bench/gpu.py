"""GPU training throughput on Keras 3 / JAX: each model's jitted step, train.py end to end, PyTorch.

    KERAS_BACKEND=jax python bench/gpu.py --json gpu.json          # on a GPU machine
    KERAS_BACKEND=jax python bench/gpu.py --models nam,se --batches 256 \\
        --precisions mixed_bfloat16 --steps-per-execution 1 --no-torch   # a shorter run
    KERAS_BACKEND=jax python bench/gpu.py --no-end-to-end          # the jitted steps only
    KERAS_BACKEND=jax python bench/gpu.py --smoke --no-torch       # seconds, on a CPU

Needs only Keras, JAX, NumPy (and PyTorch for its rows): no TensorFlow.

Jitted step: `nam_keras.build_resnet` of every model of `--models` (the plain
baseline, always, then NAM, SE, CBAM, BAM) trained by a jitted step written
with Keras' stateless API (`model.stateless_call`, `optimizer.stateless_apply`),
XLA, the synthetic batch already on the device, `--steps-per-execution` steps
per jit call (several: a `fori_loop`), mixed_bfloat16 and mixed_float16 (loss
scaling): the ceiling of training, without input, metrics or callbacks.

End to end: train.py itself, in a child process per model and device count
(one device: the first GPU, by CUDA_VISIBLE_DEVICES; then all local devices
where there are several; on a CPU, `--smoke`'s 2 virtual devices), on
synthetic data of CIFAR's size, uint8 batches augmented on the device
(`--input device`, the reference augmentation), metrics and callbacks on, no
validation, at the largest batch and the first precision: the images/s a user
sees, the last epoch's `train_images_per_s` of its log.csv, and its ratio to
the same model's best jitted step at that batch and precision (the target:
>= 0.9 on one device; on several, against one device's step). These run
first, each child with the accelerator to itself, before this process claims
JAX's memory. A child that fails is a row with its error and last lines.

PyTorch: bench/torch_reference.py's ResNet-50 (baseline and NAM, whatever
`--depth` ours has), channels-last, AMP (bf16 / fp16 with a grad scaler),
eager and `torch.compile`.

Reports images/s, each model's cost against the baseline (the baseline's
images/s over the model's, where the model is fastest) and its fraction of the
measured bf16 matmul peak, NAM against PyTorch, and end to end against the
step. `--smoke`: ResNet-18 of width 2, batch 8, one warm-up call and one timed;
end to end for NAM only, 2 epochs x 2 steps on one CPU device.
"""

import csv
import functools
import itertools
import os
import subprocess
import sys
import tempfile
import time
from operator import itemgetter

os.environ.setdefault("KERAS_BACKEND", "jax")

import harness
import keras
import numpy as np

from nam_keras import TorchSGD, build_resnet
from nam_keras.models.resnet import forward_multiply_adds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the Keras rows' models: the plain ResNet (first and always: costs are against it)
#: and one per attention module
MODELS = ("baseline", "nam", "se", "cbam", "bam")
#: the PyTorch rows' models (bench/torch_reference.py)
TORCH_MODELS = ("baseline", "nam")
PRECISIONS = ("mixed_bfloat16", "mixed_float16", "float32")
#: lines of a failed train.py's output printed and kept in its row
TAIL_LINES = 20

FULL = {
    "depth": 50,
    "width": 64,
    "size": 32,
    "batches": (128, 256, 512),
    "precisions": ("mixed_bfloat16", "mixed_float16"),
    "spe": (1, 8),
    "steps": 20,
    "warmup": 3,
    "matmul": 8192,
    "compile": True,
    "end_to_end": {
        "models": None,  # every model of --models
        "epochs": 2,
        "steps_per_epoch": 100,
        "synthetic_size": (50000, 10000),  # CIFAR-100's
        "cpu_replicas": 0,  # a CPU-only machine: one device
        "timeout_s": 900,
    },
}
SMOKE = {
    "depth": 18,
    "width": 2,  # a call of the 2-step loop at XLA -O0 (the tests'): 0.3 s; at width 4, 1.1-1.7
    "size": 32,  # train.py's synthetic images are CIFAR's
    "batches": (8,),
    "precisions": ("mixed_bfloat16",),
    "spe": (1, 2),  # a step, and steps in a loop
    "steps": 1,
    "warmup": 1,  # compiles; the timed call runs on the state it returned (donated)
    "matmul": 256,
    "compile": False,
    "end_to_end": {
        "models": ("nam",),
        "epochs": 2,
        "steps_per_epoch": 2,
        "synthetic_size": (64, 16),
        "cpu_replicas": 1,  # one row: tests/test_device_input.py trains on 2 CPU devices
        "timeout_s": 300,
    },
}


def keras_train_step(model, optimizer, steps_per_execution):
    """A jitted `(state, x, y) -> (state, loss)` running `steps_per_execution`
    SGD steps on one batch, `state` (a tuple: trainable, non-trainable and
    optimizer values) donated. One step runs as it is; more in a `fori_loop`,
    whose body XLA:CPU compiles less well (2.4x the time of a step without the
    loop, ResNet-18 of width 4 at batch 8 on 2 cores)."""
    import jax

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_and_updates(trainable, non_trainable, x, y):
        logits, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        loss = loss_fn(y, logits) + sum(losses)
        return optimizer.scale_loss(loss), (loss, non_trainable)

    grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)

    def one_step(state, x, y):
        trainable, non_trainable, opt_vars = state
        (_, (loss, non_trainable)), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return (trainable, non_trainable, opt_vars), loss.astype("float32")

    def run(state, x, y):
        if steps_per_execution == 1:
            return one_step(tuple(state), x, y)
        body = lambda _, carry: one_step(carry[0], x, y)
        return jax.lax.fori_loop(0, steps_per_execution, body, (tuple(state), np.float32(0.0)))

    return jax.jit(run, donate_argnums=0)


def build_model(cfg, name, precision=None):
    """A fresh ResNet of `cfg` for `name`, one of MODELS, under `precision`."""
    keras.backend.clear_session()
    size = cfg["size"]
    return build_resnet(
        depth=cfg["depth"],
        width=cfg["width"],
        attention=None if name == "baseline" else name,
        input_shape=(size, size, 3),
        dtype=precision,
    )


def step_optimizer(model, precision):
    """The benchmarks' optimizer of `model`, built: TorchSGD, loss-scaled under
    mixed_float16."""
    optimizer = TorchSGD(learning_rate=0.01)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def keras_images_per_s(cfg, name, batch, precision, spe):
    """Training images/s of our ResNet for `name` (one of MODELS) on JAX by
    `keras_train_step`, data on the device."""
    import jax

    size = cfg["size"]
    model = build_model(cfg, name, precision)
    optimizer = step_optimizer(model, precision)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    y = jax.device_put(rng.integers(0, 100, batch).astype("int32"))
    step = keras_train_step(model, optimizer, spe)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )

    def run():
        nonlocal state
        state, loss = step(state, x, y)
        loss.block_until_ready()

    median, _ = harness.timed(run, cfg["steps"], cfg["warmup"])
    return spe * batch / median


def torch_images_per_s(cfg, name, batch, dtype, compiled):
    """Training images/s of bench/torch_reference.py's network for `name` (one
    of TORCH_MODELS), channels-last + AMP."""
    import torch
    from torch import nn
    from torch_reference import ResNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = ResNet(nam=name == "nam", width=cfg["width"]).to(
        device, memory_format=torch.channels_last
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    amp = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(dtype)
    scaler = torch.amp.GradScaler(device, enabled=amp is torch.float16)
    size = cfg["size"]
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 100, (batch,), device=device)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            loss = nn.functional.cross_entropy(forward(x), y)
        loss = loss.float() + 1e-4 * model.penalty()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    median, _ = harness.timed(step, cfg["steps"], cfg["warmup"])
    return batch / median


def bf16_matmul_peak(n):
    """Best measured bf16 FLOP/s of an n x n x n matmul on JAX's default device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    mm(a, a).block_until_ready()
    best, _ = harness.timed(lambda: mm(a, a).block_until_ready(), 10, 2)
    return 2 * n**3 / best


def measured_row(row, columns, models, measure):
    """Sets `row[name] = measure(name)` (images/s) for the names of `columns`
    in `models`, printing the row as its figures come ("-": not measured)."""
    print(
        f"{row['framework']:<10} {row['config']:<36} {row['precision']:<15} {row['batch']:>5}",
        end="",
        flush=True,
    )
    for name in columns:
        if name in models:
            row[name] = measure(name)
        print(f"{row[name]:>10.1f}" if name in row else f"{'-':>10}", end="", flush=True)
    print(flush=True)
    return row


def print_header(columns):
    """The header of the jitted-step table, one column per model."""
    head = f"{'framework':<10} {'config':<36} {'precision':<15} {'batch':>5}"
    print(head + "".join(f"{name:>10}" for name in columns) + "   (images/s)", flush=True)


def keras_rows(cfg, models):
    """One row per precision, batch and steps per execution: the images/s of
    every model's jitted step."""
    rows = []
    for precision, batch, spe in itertools.product(cfg["precisions"], cfg["batches"], cfg["spe"]):
        row = {"framework": "keras-jax", "precision": precision, "batch": batch}
        row["config"] = f"XLA, steps_per_execution {spe}"
        measure = functools.partial(
            keras_images_per_s, cfg, batch=batch, precision=precision, spe=spe
        )
        rows.append(measured_row(row, models, models, measure))
    return rows


def torch_rows(cfg, models):
    """One row per precision, batch and eager / `torch.compile`: the images/s
    of the TORCH_MODELS among `models`; none without PyTorch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch is not installed: its rows are skipped")
        return []
    rows = []
    configs = [(False, "eager")] + ([(True, "torch.compile")] if cfg["compile"] else [])
    for precision, batch, (compiled, label) in itertools.product(
        cfg["precisions"], cfg["batches"], configs
    ):
        row = {"framework": "pytorch", "precision": precision, "batch": batch}
        row["config"] = f"channels-last, AMP, {label}"
        measure = functools.partial(
            torch_images_per_s, cfg, batch=batch, dtype=precision, compiled=compiled
        )
        rows.append(measured_row(row, models, TORCH_MODELS, measure))
    return rows


def run_child(command, extra_env=None, timeout=None):
    """Runs `command` from the repository root on KERAS_BACKEND=jax, `extra_env`
    added to this process's environment, stdout and stderr merged; returns
    `(output, error)`: `error` is None when it exited with 0."""
    try:
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "KERAS_BACKEND": "jax", **(extra_env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        output = e.output or b""  # bytes, `text` or not
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        return output, f"timed out after {timeout} s"
    return proc.stdout, f"exit status {proc.returncode}" if proc.returncode else None


def local_devices():
    """`(platform, count)` of JAX's local devices, asked of a child process:
    JAX takes most of an accelerator's memory, so this one must not before
    train.py's children have run."""
    code = "import jax; print(jax.default_backend(), jax.local_device_count())"
    output, error = run_child([sys.executable, "-c", code])
    if error:
        raise RuntimeError(f"cannot list JAX's devices ({error}):\n{output}")
    platform, count = output.split()[-2:]
    return platform, int(count)


def device_counts(cfg, platform, count):
    """`[(devices, train.py flags, environment)]` of the end-to-end runs: one
    device (on GPUs, the first by CUDA_VISIBLE_DEVICES), then all local devices
    where there are several (on a CPU, `--cpu-replicas` virtual devices)."""
    if platform == "cpu":
        replicas = cfg["end_to_end"]["cpu_replicas"]
        one, every = (1, [], {}), (replicas, ["--cpu-replicas", str(replicas)], {})
    else:
        first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        one, every = (1, [], {"CUDA_VISIBLE_DEVICES": first_gpu}), (count, [], {})
    return [one, every] if every[0] > 1 else [one]


def train_py_args(cfg, name, batch, precision, folder):
    """train.py's flags for an end-to-end run of `name` writing into `folder`."""
    e2e = cfg["end_to_end"]
    flags = {
        "--attention": name,
        "--depth": cfg["depth"],
        "--width": cfg["width"],
        "--dataset": "synthetic",
        "--input": "device",
        "--augment": "reference",
        "--precision": precision,
        "--batch-size": batch,
        "--epochs": e2e["epochs"],
        "--steps-per-epoch": e2e["steps_per_epoch"],
        "--val-freq": 0,
        "--verbose": 2,
        "--run-dir": os.path.join(folder, "run"),
        "--output": os.path.join(folder, "model.keras"),
    }
    words = [str(word) for flag_and_value in flags.items() for word in flag_and_value]
    return [*words, "--synthetic-size", *map(str, e2e["synthetic_size"])]


def last_epoch_images_per_s(log_csv):
    """`train_images_per_s` of the last epoch of train.py's log.csv; None
    where there is none."""
    try:
        with open(log_csv, newline="") as f:
            return float(list(csv.DictReader(f))[-1]["train_images_per_s"])
    except (OSError, IndexError, KeyError, TypeError, ValueError):
        return None


def train_py_row(cfg, name, batch, precision, devices, flags, env):
    """One end-to-end row: train.py for `name` on `devices` devices in a child
    process; `images_per_s` is None, with an `error` and the `output_tail`,
    when it failed."""
    row = {"model": name, "devices": devices, "precision": precision, "batch": batch}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as folder:
        command = [sys.executable, "train.py", *train_py_args(cfg, name, batch, precision, folder)]
        output, error = run_child(command + flags, env, cfg["end_to_end"]["timeout_s"])
        row["images_per_s"] = last_epoch_images_per_s(os.path.join(folder, "run", "log.csv"))
    row["seconds"] = time.perf_counter() - start
    if not error and row["images_per_s"] is None:
        error = "no train_images_per_s in its log.csv"
    if error:
        row.update(images_per_s=None, error=error, output_tail=output.splitlines()[-TAIL_LINES:])
        print(f"  failed: {error}; its last lines:", *row["output_tail"], sep="\n    ", flush=True)
    else:
        print(f"  {row['images_per_s']:.1f} images/s ({row['seconds']:.0f} s)", flush=True)
    return row


def end_to_end_rows(cfg, models):
    """train.py end to end for each model of `models` that `cfg` runs end to
    end, on each of `device_counts`, at the largest batch and the first
    precision (see the module's docstring)."""
    e2e = cfg["end_to_end"]
    names = [name for name in models if e2e["models"] is None or name in e2e["models"]]
    runs = list(itertools.product(names, device_counts(cfg, *local_devices())))
    batch, precision = max(cfg["batches"]), cfg["precisions"][0]
    rows = []
    for i, (name, (devices, flags, env)) in enumerate(runs, 1):
        print(
            f"[{i}/{len(runs)}] train.py end to end: {name} on {devices} device(s), batch {batch}, "
            f"{precision}, {e2e['epochs']} epochs x {e2e['steps_per_epoch']} steps",
            flush=True,
        )
        rows.append(train_py_row(cfg, name, batch, precision, devices, flags, env))
    return rows


def compare_with_step(e2e_rows, rows):
    """Adds to each end-to-end row the same model's best jitted step at its
    batch and precision (`step_images_per_s`, `step_config`) and `vs_step`,
    the end-to-end images/s over the step's."""
    for row in e2e_rows:
        name = row["model"]
        steps = [
            r
            for r in rows
            if r["framework"] == "keras-jax"
            and (r["batch"], r["precision"]) == (row["batch"], row["precision"])
        ]
        best = max(steps, key=itemgetter(name))
        row.update(step_images_per_s=best[name], step_config=best["config"])
        row["vs_step"] = row["images_per_s"] / best[name] if row["images_per_s"] else None


def summary(rows, peak, macs, e2e_rows):
    """The figures the README quotes: each model where its jitted step is
    fastest, its cost against the baseline there and its fraction of the bf16
    matmul peak (`macs`: multiply-adds per image by model); NAM against
    PyTorch; end to end against the step."""
    ours = [r for r in rows if r["framework"] == "keras-jax"]
    out = {"bf16_matmul_peak_tflops": peak / 1e12, "models": {}}
    for name, per_image in macs.items():
        best = max(ours, key=itemgetter(name))
        out["models"][name] = {
            **{k: best[k] for k in ("config", "precision", "batch")},
            "images_per_s": best[name],
            "cost_vs_baseline": best["baseline"] / best[name],
            "fraction_of_peak": 3 * 2 * per_image * best[name] / peak,
        }
    theirs = [r for r in rows if r["framework"] == "pytorch"]
    if theirs and "nam" in macs:
        best = max(theirs, key=itemgetter("nam"))
        out["pytorch_best_nam"] = {k: best[k] for k in ("config", "precision", "batch", "nam")}
        out["ours_over_pytorch_nam"] = out["models"]["nam"]["images_per_s"] / best["nam"]
    if e2e_rows:
        out["end_to_end_vs_step"] = {
            f"{r['model']} on {r['devices']}": r["vs_step"] for r in e2e_rows
        }
    return out


def print_summary(out, e2e_rows):
    """The summary, then the end-to-end table."""
    print(f"bf16 matmul peak: {out['bf16_matmul_peak_tflops']:.3g} TFLOP/s")
    for name, m in out["models"].items():
        print(
            f"{name:<9} best {m['images_per_s']:>10.1f} images/s ({m['config']}, "
            f"{m['precision']}, batch {m['batch']}): {m['cost_vs_baseline']:.3f}x the "
            f"baseline's time, {100 * m['fraction_of_peak']:.2f}% of the peak"
        )
    if "ours_over_pytorch_nam" in out:
        print(f"pytorch best NAM: {out['pytorch_best_nam']}")
        print(f"ours over PyTorch, NAM: {out['ours_over_pytorch_nam']:.3f}")
    if e2e_rows:
        print(
            f"{'train.py end to end':<20} {'devices':>7} {'precision':<15} {'batch':>5} "
            f"{'images/s':>10} {'step':>10} {'vs step':>8}"
        )
    for r in e2e_rows:
        figures = (
            f"{r['images_per_s']:>10.1f} {r['step_images_per_s']:>10.1f} {r['vs_step']:>8.3f}"
            if r["images_per_s"]
            else f"failed: {r['error']}"
        )
        print(f"{r['model']:<20} {r['devices']:>7} {r['precision']:<15} {r['batch']:>5} {figures}")


def model_list(text):
    """`--models` (a comma list) as a tuple in MODELS' order, the baseline always."""
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; expected some of {list(MODELS)}")
    return tuple(name for name in MODELS if name == "baseline" or name in names)


def settings(args):
    """FULL or SMOKE (`--smoke`), with the options given on the command line."""
    cfg = dict(SMOKE if args.smoke else FULL)
    if not args.smoke:
        cfg.update(steps=args.steps, warmup=args.warmup)
    given = {"batches": args.batches, "precisions": args.precisions, "spe": args.spe}
    cfg.update({key: tuple(value) for key, value in given.items() if value})
    return cfg


def main(argv=None):
    """Runs the benchmark; returns the payload written with `--json`."""
    p = harness.parser(__doc__.split("\n\n")[0], steps=FULL["steps"], warmup=FULL["warmup"])
    p.add_argument("--smoke", action="store_true", help="a seconds-long CPU run of every path")
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma list of {','.join(MODELS)} (the baseline is always measured)",
    )
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 128 256 512)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="Keras dtype policies")
    p.add_argument("--steps-per-execution", dest="spe", type=int, nargs="+", help="(default: 1 8)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the train.py rows")
    args = p.parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit(f"bench/gpu.py runs on KERAS_BACKEND=jax (got {keras.backend.backend()})")
    cfg, models = settings(args), model_list(args.models)
    print(f"machine: {harness.machine()}", flush=True)
    e2e_rows = [] if args.no_end_to_end else end_to_end_rows(cfg, models)
    import jax  # claims the accelerator from here on

    print(f"devices: {jax.devices()}", flush=True)
    print_header(models)
    rows = keras_rows(cfg, models)
    if not args.no_torch:
        rows += torch_rows(cfg, models)
    macs = {name: forward_multiply_adds(build_model(cfg, name)) for name in models}
    peak = bf16_matmul_peak(cfg["matmul"])
    compare_with_step(e2e_rows, rows)
    result = {"devices": [str(d) for d in jax.devices()], "settings": cfg, "rows": rows}
    result["end_to_end"] = e2e_rows
    result["summary"] = summary(rows, peak, macs, e2e_rows)
    print_summary(result["summary"], e2e_rows)
    harness.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
