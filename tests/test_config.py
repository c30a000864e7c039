"""The settings tables: validation, the parsers derived from them, config.json, resume keys."""

import dataclasses

import pytest

import train
from nam_keras import cli, config
from nam_keras.config import EvalConfig, TrainConfig
from nam_keras.errors import ConfigError


def test_defaults_are_the_reference_recipe():
    c = TrainConfig()
    assert (c.model, c.depth, c.width, c.epochs, c.batch_size) == ("nam", 50, 64, 300, 128)
    assert (c.lr, c.momentum, c.weight_decay, c.warmup_steps) == (0.1, 0.9, 5e-4, 2000)
    assert c.peak_lr == 0.1 and c.resolved_output == "nam.keras"
    assert c.resolved_run_dir == "runs/nam"
    assert TrainConfig(batch_size=256).peak_lr == pytest.approx(0.2)
    assert TrainConfig(batch_size=256, lr_scaling="none").peak_lr == 0.1
    assert TrainConfig(model="baseline").resolved_output == "baseline.keras"


def test_parser_defaults_equal_the_table():
    parsed = cli.parse_config(TrainConfig, [], "train.py", "")
    assert parsed == TrainConfig()
    parsed = cli.parse_config(EvalConfig, ["m.keras"], "evaluate.py", "")
    assert parsed == EvalConfig(model="m.keras")


def test_every_field_has_a_flag_and_help():
    help_text = train.build_parser().format_help()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model":
            assert "--nam" in help_text and "--baseline" in help_text
        else:
            assert config.flag(field) in help_text


def test_flags_reach_the_config():
    argv = "--baseline --depth 18 --synthetic-size 10 5 --no-sync-bn --no-resume".split()
    argv += ["--mixup", "0.2", "--seed", "7"]
    c = cli.parse_config(TrainConfig, argv, "train.py", "")
    assert (c.model, c.depth, c.synthetic_size, c.sync_bn, c.resume) == (
        "baseline",
        18,
        (10, 5),
        False,
        False,
    )
    assert c.mixing and c.seed == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "--epochs: expected a positive integer, received 0"),
        ({"depth": 20}, "--depth: invalid choice 20"),
        ({"momentum": 1.0}, "--momentum: expected a number in [0, 1), received 1.0"),
        ({"mixup": float("inf")}, "--mixup: expected a finite number >= 0, received inf"),
        ({"seed": -1}, "--seed: expected an integer in [0, 4294967295], received -1"),
        ({"seed": 2**32}, "--seed: expected an integer in [0, 4294967295]"),
        ({"synthetic_size": (10, 0)}, "--synthetic-size: expected a positive integer, received 0"),
        ({"warmup_steps": 1.5}, "--warmup-steps: expected an integer >= 0, received 1.5"),
        ({"precision": "fp8"}, "--precision: invalid choice 'fp8'"),
    ],
)
def test_programmatic_configs_are_validated_like_flags(kwargs, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kwargs)
    assert message in str(info.value)


def test_eval_config_checks_near_zero():
    with pytest.raises(ConfigError, match=r"--near-zero must be in \(0, 1\]"):
        EvalConfig(model="m.keras", near_zero=0)


def test_resume_keys_come_from_the_table():
    """The model, the schedule and the data order must match to resume; where
    files go, verbosity and device options may change."""
    assert config.RESUME_KEYS == (
        "model", "depth", "width", "stem", "spatial", "sparsity", "stop_gradient",
        "epochs", "batch_size", "lr", "lr_scaling", "warmup_steps", "momentum",
        "weight_decay", "steps_per_epoch", "no_augment", "randaugment", "mixup", "cutmix",
        "seed", "precision", "num_classes", "mixing",
    )  # fmt: skip


def test_to_dict_is_json_ready():
    d = config.to_dict(TrainConfig(synthetic_size=(8, 4)))
    assert (
        d["synthetic_size"] == [8, 4]
        and d["model"] == "nam"
        and len(d) == len(dataclasses.fields(TrainConfig))
    )
