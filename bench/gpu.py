"""GPU training throughput: Keras 3 on JAX (ours) against PyTorch, ResNet-50 +- NAM.

    KERAS_BACKEND=jax python bench/gpu.py --json gpu.json          # on a GPU machine
    KERAS_BACKEND=jax python bench/gpu.py --smoke                  # seconds, on a CPU

Needs only Keras, JAX, NumPy (and PyTorch for its rows): no TensorFlow. Keras
side: `nam_keras.build_resnet` trained by a jitted step written with Keras'
stateless API (`model.stateless_call`, `optimizer.stateless_apply`), XLA, the
synthetic batch already on the device, `--steps-per-execution` steps per jit
call (a `fori_loop`), mixed_bfloat16 and mixed_float16 (loss scaling). PyTorch
side: bench/torch_reference.py's network, channels-last, AMP (bf16 / fp16 with a
grad scaler), eager and `torch.compile`. Reports images/s, NAM's overhead, ours
against PyTorch, and the fraction of the measured bf16 matmul peak.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import harness
import keras
import numpy as np

from nam_keras import TorchSGD, build_resnet
from nam_keras.models.resnet import forward_multiply_adds

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
}
SMOKE = {
    "depth": 50,
    "width": 4,
    "size": 16,
    "batches": (8,),
    "precisions": ("mixed_bfloat16",),
    "spe": (2,),
    "steps": 3,
    "warmup": 2,  # the second call may compile again (donated state's layouts)
    "matmul": 256,
    "compile": False,
}


def keras_train_step(model, optimizer, steps_per_execution):
    """A jitted function running `steps_per_execution` SGD steps on one batch."""
    import jax

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_and_updates(trainable, non_trainable, x, y):
        logits, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        loss = loss_fn(y, logits) + sum(losses)
        return optimizer.scale_loss(loss), (loss, non_trainable)

    grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)

    def one_step(_, carry):
        trainable, non_trainable, opt_vars, _, x, y = carry
        (_, (loss, non_trainable)), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars, loss.astype("float32"), x, y

    def run(state, x, y):
        carry = (*state, np.float32(0.0), x, y)
        trainable, non_trainable, opt_vars, loss, _, _ = jax.lax.fori_loop(
            0, steps_per_execution, one_step, carry
        )
        return (trainable, non_trainable, opt_vars), loss

    return jax.jit(run, donate_argnums=0)


def keras_images_per_s(cfg, attention, batch, precision, spe):
    """Training images/s of our ResNet on JAX, data on the device."""
    import jax

    size = cfg["size"]
    model = build_resnet(
        depth=cfg["depth"],
        width=cfg["width"],
        attention=attention,
        input_shape=(size, size, 3),
        dtype=precision,
    )
    optimizer = TorchSGD(learning_rate=0.01)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    y = jax.device_put(rng.integers(0, 100, batch).astype("int32"))
    step = keras_train_step(model, optimizer, spe)
    state = [
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    ]

    def run():
        nonlocal state
        state, loss = step(state, x, y)
        loss.block_until_ready()

    median, _ = harness.timed(run, cfg["steps"], cfg["warmup"])
    return spe * batch / median, forward_multiply_adds(model)


def torch_images_per_s(cfg, nam, batch, dtype, compiled):
    """Training images/s of bench/torch_reference.py's network, channels-last + AMP."""
    import torch
    from torch import nn
    from torch_reference import ResNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = ResNet(nam=nam, width=cfg["width"]).to(device, memory_format=torch.channels_last)
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


def keras_rows(cfg):
    rows = []
    for precision in cfg["precisions"]:
        for batch in cfg["batches"]:
            for spe in cfg["spe"]:
                row = {"framework": "keras-jax", "precision": precision, "batch": batch}
                row["config"] = f"XLA, steps_per_execution {spe}"
                for attention in (None, "nam"):
                    ips, macs = keras_images_per_s(cfg, attention, batch, precision, spe)
                    row["nam" if attention else "baseline"] = ips
                    row["macs"] = macs
                rows.append(row)
                print_row(row)
    return rows


def torch_rows(cfg):
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch is not installed: its rows are skipped")
        return []
    rows = []
    configs = [(False, "eager")] + ([(True, "torch.compile")] if cfg["compile"] else [])
    for precision in cfg["precisions"]:
        for batch in cfg["batches"]:
            for compiled, name in configs:
                row = {"framework": "pytorch", "precision": precision, "batch": batch}
                row["config"] = f"channels-last, AMP, {name}"
                for nam in (False, True):
                    ips = torch_images_per_s(cfg, nam, batch, precision, compiled)
                    row["nam" if nam else "baseline"] = ips
                rows.append(row)
                print_row(row)
    return rows


def print_row(row):
    overhead = row["baseline"] / row["nam"]
    print(
        f"{row['framework']:<10} {row['config']:<36} {row['precision']:<15} {row['batch']:>5} "
        f"{row['baseline']:>10.1f} {row['nam']:>10.1f} {overhead:>8.2f}x",
        flush=True,
    )


def summary(rows, peak, macs):
    """The figures the README quotes, from the rows."""

    def best(framework, key):
        return max((r for r in rows if r["framework"] == framework), key=lambda r: r[key])

    out = {"bf16_matmul_peak_tflops": peak / 1e12}
    ours = best("keras-jax", "nam")
    out["ours_best_nam"] = {k: ours[k] for k in ("config", "precision", "batch", "nam")}
    base = best("keras-jax", "baseline")
    out["ours_best_baseline"] = {k: base[k] for k in ("config", "precision", "batch", "baseline")}
    out["nam_overhead_at_best"] = ours["baseline"] / ours["nam"]
    out["nam_fraction_of_peak"] = 3 * 2 * macs * ours["nam"] / peak
    out["baseline_fraction_of_peak"] = 3 * 2 * macs * base["baseline"] / peak
    if any(r["framework"] == "pytorch" for r in rows):
        torch_best = best("pytorch", "nam")
        out["pytorch_best_nam"] = {
            k: torch_best[k] for k in ("config", "precision", "batch", "nam")
        }
        out["ours_over_pytorch_nam"] = ours["nam"] / torch_best["nam"]
    return out


def main(argv=None):
    """Runs the benchmark; returns the payload written with `--json`."""
    p = harness.parser(__doc__.split("\n\n")[0], steps=FULL["steps"], warmup=FULL["warmup"])
    p.add_argument("--smoke", action="store_true", help="a seconds-long CPU run of every path")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    args = p.parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit(f"bench/gpu.py runs on KERAS_BACKEND=jax (got {keras.backend.backend()})")
    import jax

    cfg = dict(SMOKE if args.smoke else FULL)
    if not args.smoke:
        cfg.update(steps=args.steps, warmup=args.warmup)
    print(f"devices: {jax.devices()}; machine: {harness.machine()}")
    print(f"{'framework':<10} {'config':<36} {'precision':<15} {'batch':>5} "
          f"{'baseline':>10} {'NAM':>10} {'overhead':>9}   (images/s)")  # fmt: skip
    rows = keras_rows(cfg)
    macs = rows[0]["macs"]
    if not args.no_torch:
        rows += torch_rows(cfg)
    peak = bf16_matmul_peak(cfg["matmul"])
    result = {"devices": [str(d) for d in jax.devices()], "settings": cfg, "rows": rows}
    result["summary"] = summary(rows, peak, macs)
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    harness.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
