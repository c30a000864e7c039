"""Chaos run: kill train.py at random moments, resume each time, check nothing was lost.

    python bench/chaos.py                          # 12 rounds of kills on a tiny 20 x 20-step run
    python bench/chaos.py --rounds 2 --epochs 2 --steps-per-epoch 3   # seconds, as the tests run it

Every round starts the same tiny `train.py` command on one run directory,
waits a random time, and sends SIGKILL, SIGTERM or SIGINT (Ctrl-C), chosen at
random; then the next round resumes. Every exit must be a success or one of
those signals: any other exit code (a refused resume, a traceback) fails.
A round whose run finishes anyway has its model checked, and the next round
starts a new run. When the rounds are spent the command runs to completion. The final model must
exist, load, and hold exactly the optimizer steps of an uninterrupted run, and
its weights must be those of the same command run once without interruption
(the data order and augmentation are keyed by the seed and the step): bitwise as
a rule on TensorFlow's CPU, to float32 rounding at worst; one more run of the
same command must leave it untouched.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import harness

from nam_keras.training import run_directory as rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
#: exit codes that a signalled run may end with: killed, or our clean stop (128 + signal)
SIGNALLED = {
    -signal.SIGKILL,
    128 + signal.SIGTERM,
    128 + signal.SIGINT,
    -signal.SIGTERM,
    -signal.SIGINT,
}


def command(workdir, epochs, steps):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "64",
        "16",
        "--depth",
        "18",
        "--width",
        "4",
        "--batch-size",
        "8",
        "--precision",
        "float32",
        "--verbose",
        "0",
        "--val-freq",
        "0",
        "--epochs",
        str(epochs),
        "--steps-per-epoch",
        str(steps),
        "--warmup-steps",
        "2",
        "--run-dir",
        os.path.join(workdir, "run"),
        "--output",
        os.path.join(workdir, "m.keras"),
    ]


def run_once(cmd, delay, signum):
    """Starts `cmd`, sends `signum` after `delay` s (if still running); returns (code, output)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a shell's background job inherits SIGINT ignored: give the run Ctrl-C back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    if delay is not None:
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signum)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def check_final_model(workdir, epochs, steps):
    """The final model loads and holds the steps of an uninterrupted run."""
    import keras

    import nam_keras  # noqa: F401  (registers the custom objects)

    model = keras.models.load_model(os.path.join(workdir, "m.keras"))
    got = int(model.optimizer.iterations.numpy())
    if got != epochs * steps:
        raise AssertionError(f"the final model holds {got} steps; expected {epochs * steps}")
    return got


def check_weights_equal(workdir, epochs, steps):
    """Runs the command once without interruption (in `workdir/reference`) and
    checks that the chaos run's final weights equal its: bitwise as a rule, to
    float32 rounding (rtol 1e-5) at worst, the order in which TensorFlow's
    multi-threaded CPU kernels sum changing with the load. Returns
    `{"bitwise": bool, "max_abs_difference": float}`."""
    import keras
    import numpy as np

    reference = os.path.join(workdir, "reference")
    os.makedirs(reference, exist_ok=True)
    code, out = run_once(command(reference, epochs, steps), None, None)
    if code != 0:
        raise AssertionError(f"the uninterrupted run ended with exit {code}:\n{out[-3000:]}")
    paths = [os.path.join(folder, "m.keras") for folder in (workdir, reference)]
    got, want = (keras.models.load_model(p).get_weights() for p in paths)
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} weights, the uninterrupted run has {len(want)}")
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    close = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))
    if not close:
        raise AssertionError(
            f"the final weights differ from the uninterrupted run's (largest difference "
            f"{worst:.3g}): the resumed runs did not see the same batches"
        )
    return {"bitwise": worst == 0.0, "max_abs_difference": worst}


def chaos(rounds, epochs, steps, max_delay, seed, signals, workdir):
    """Runs the rounds; returns a report dict. Raises AssertionError on a lost or bad run."""
    rng = random.Random(seed)
    cmd = command(workdir, epochs, steps)
    report = {"rounds": [], "seed": seed}
    for i in range(rounds):
        delay, name = rng.uniform(0.0, max_delay), rng.choice(signals)
        code, out = run_once(cmd, delay, SIGNALS[name])
        done = max(
            (e for e, _ in rundir.backups(os.path.join(workdir, "run", "backup"))), default=0
        )
        report["rounds"].append(
            {"delay_s": round(delay, 2), "signal": name, "exit": code, "epochs_backed_up": done}
        )
        print(
            f"round {i + 1}: {name} after {delay:5.2f} s -> exit {code}; backup after "
            f"{done} epochs",
            flush=True,
        )
        if code not in SIGNALLED | {0}:
            raise AssertionError(f"round {i + 1} ended with exit {code}:\n{out[-3000:]}")
        if code == 0:  # the run finished before the signal (or ignored it while starting):
            check_final_model(workdir, epochs, steps)  # check it, then start a new one
            shutil.rmtree(os.path.join(workdir, "run"))
            os.remove(os.path.join(workdir, "m.keras"))
            report["completed_in_rounds"] = report.get("completed_in_rounds", 0) + 1
    code, out = run_once(cmd, None, None)
    if code != 0:
        raise AssertionError(f"the final run ended with exit {code}:\n{out[-3000:]}")
    model_path = os.path.join(workdir, "m.keras")
    stamp = os.stat(model_path).st_mtime_ns
    report["optimizer_steps"] = check_final_model(workdir, epochs, steps)
    report["weights_vs_uninterrupted"] = check_weights_equal(workdir, epochs, steps)
    code, out = run_once(cmd, None, None)
    if code != 0 or os.stat(model_path).st_mtime_ns != stamp:
        raise AssertionError(f"re-running a finished run changed its model (exit {code})")
    report["survived"] = rounds
    report["interrupted"] = sum(r["exit"] != 0 for r in report["rounds"])
    return report


def main(argv=None):
    p = harness.parser(__doc__, steps=4, warmup=0)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument(
        "--max-delay",
        type=float,
        default=10.0,
        help="longest wait before a signal (starting train.py takes about 6 s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signals", default="KILL,TERM,INT")
    p.add_argument("--workdir", help="default: a new temporary folder")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nam-chaos-")
    report = chaos(
        args.rounds,
        args.epochs,
        args.steps_per_epoch,
        args.max_delay,
        args.seed,
        args.signals.split(","),
        workdir,
    )
    print(
        f"survived {report['survived']} of {args.rounds} rounds of random signals "
        f"({report['interrupted']} interrupted a run); the final model holds "
        f"{report['optimizer_steps']} steps and the weights of an uninterrupted run "
        f"({report['weights_vs_uninterrupted']}); {workdir}"
    )
    harness.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
