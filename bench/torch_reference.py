"""PyTorch reference: the same CIFAR ResNet + NAM formula, trained step for step.

    .venv/bin/pip install -r bench/requirements.txt     # CPU build of PyTorch, only for this
    python bench/torch_reference.py                    # depth 50, batch 64

Times PyTorch's training step (SGD momentum 0.9, weight decay 5e-4, cross-entropy +
NAM sparsity penalty) in float32, channels-first and channels-last, and bf16
autocast channels-last, eager and (unless --no-compile) under `torch.compile`;
then ours, in this same run, with the precision that `--precision auto` picks
(XLA off on the CPU, as auto does). Reports our images/s divided by PyTorch's
best eager and best overall configuration.
"""

import argparse
import os

import harness

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - optional dependency
    raise SystemExit(
        "PyTorch is not installed: .venv/bin/pip install -r bench/requirements.txt"
    ) from None


class TorchNAM(nn.Module):
    """SPEC section 2, channel attention: sigmoid(w * BN(x)) * x, w = |gamma| / sum |gamma|."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)  # torch momentum 0.1 = Keras 0.9

    def forward(self, x):
        g = self.bn.weight.abs()
        w = (g / g.sum().clamp_min(1e-12)).view(1, -1, 1, 1)
        return torch.sigmoid(w * self.bn(x)) * x

    def penalty(self):
        return self.bn.weight.abs().sum()


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride, nam):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.nam = TorchNAM(cout) if nam else None
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.nam is not None:
            y = self.nam(y)
        return torch.relu(y + (self.proj(x) if self.proj is not None else x))


class ResNet(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), num_classes=100, nam=True, width=64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        widths = (width, 2 * width, 4 * width, 8 * width)
        for n, width, stride in zip(blocks, widths, (1, 2, 2, 2)):
            for b in range(n):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1, nam))
                cin = width * 4
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def penalty(self):
        return sum(m.penalty() for m in self.modules() if isinstance(m, TorchNAM))


def torch_images_per_s(batch, channels_last, bf16, steps, warmup, compiled=False):
    """Training images/s of the reference network; `compiled`: `torch.compile` (inductor)."""
    torch.manual_seed(0)
    model = ResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 100, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(forward(x), y)
        loss = loss.float() + 1e-4 * model.penalty()
        loss.backward()
        opt.step()

    median, _ = harness.timed(step, steps, warmup)
    return batch / median


def main(argv=None):
    p = harness.parser(__doc__, steps=5, warmup=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile (inductor; minutes of compilation)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    n_params = sum(t.numel() for t in ResNet().parameters())
    print(
        f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-50+NAM "
        f"{n_params:,} parameters (gamma/beta included, moving statistics not)"
    )
    configurations = {
        "fp32 channels-first": (False, False, False),
        "fp32 channels-last": (True, False, False),
        "bf16 autocast channels-last": (True, True, False),
    }
    if args.compile:
        configurations["fp32 channels-last, torch.compile"] = (True, False, True)
        configurations["bf16 autocast channels-last, torch.compile"] = (True, True, True)
    results = {}
    for name, (cl, bf16, compiled) in configurations.items():
        results[name] = torch_images_per_s(
            args.batch_size, cl, bf16, args.steps, args.warmup, compiled
        )
        print(f"  torch {name:<44}{results[name]:8.1f} img/s", flush=True)
    eager = {k: v for k, v in results.items() if "compile" not in k}
    best_eager = max(eager, key=eager.get)
    best = max(results, key=results.get)

    from train_step import measure

    from nam_keras.training.distribute import accelerators, resolve_jit, resolve_precision

    gpus = accelerators()
    precision, xla = resolve_precision("auto", gpus), resolve_jit("auto", gpus)
    ours = measure(50, 64, args.batch_size, precision, xla, "nam", args.steps, args.warmup)
    ours = ours["images_per_s"]
    print(f"  ours  {precision}, XLA {'on' if xla else 'off'} (auto){'':<21}{ours:8.1f} img/s")
    print(f"\nmachine: {harness.machine()}; batch {args.batch_size}; median of {args.steps} steps")
    print(f"ours / PyTorch best eager ({best_eager}): {ours / results[best_eager]:.2f}x")
    print(f"ours / PyTorch best overall ({best}): {ours / results[best]:.2f}x")
    harness.write_json(
        args.json,
        {
            "torch": results,
            "torch_best_eager": best_eager,
            "torch_best": best,
            "ours": {"precision": precision, "xla": xla, "images_per_s": ours},
            "ratio_best_eager": ours / results[best_eager],
            "ratio_best": ours / results[best],
            "args": vars(args),
        },
    )


if __name__ == "__main__":
    main()
