"""The settings tables: validation, the parsers derived from them, config.json, resume keys."""

import dataclasses
import inspect

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
    import evaluate

    help_text = train.build_parser().format_help()
    for field in dataclasses.fields(TrainConfig):
        assert config.flag(field) in help_text
        for option in field.metadata.get("flags") or ():
            assert option in help_text
    eval_help = cli.build_parser(EvalConfig, "evaluate.py", evaluate.__doc__).format_help()
    for field in dataclasses.fields(EvalConfig):
        assert (field.name if field.metadata.get("positional") else config.flag(field)) in eval_help


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


def test_resume_keys_are_the_settings_that_change_the_trained_model():
    """The model, the schedule and the data order must match to resume; where
    files go, verbosity and device options may change."""
    keys = set(TrainConfig().resume_keys())
    assert {"model", "depth", "epochs", "lr", "seed", "augment", "precision", "spatial"} <= keys
    assert not keys & {"run_dir", "output", "verbose", "resume", "val_freq", "jit_compile"}
    rows = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume")}
    assert keys == rows | {"num_classes", "mixing"}


def test_attention_options_are_resume_keys_only_for_their_module():
    se_keys = set(TrainConfig(model="se").resume_keys())
    assert se_keys.isdisjoint({"spatial", "sparsity", "stop_gradient"})
    assert {"model", "depth", "seed"} <= se_keys


@pytest.mark.parametrize(
    "option, value, flag",
    [("spatial", True, "--spatial"), ("sparsity", 0.5, "--sparsity"),
     ("stop_gradient", True, "--stop-gradient")],
)  # fmt: skip
@pytest.mark.parametrize("model", ["se", "cbam", "bam", "baseline"])
def test_attention_options_are_refused_for_other_modules(model, option, value, flag):
    with pytest.raises(ConfigError, match=f"{flag} is an option of --attention nam only") as err:
        TrainConfig(model=model, **{option: value})
    assert f"--attention {model}" in str(err.value)


def test_attention_options_reach_the_module():
    nam = TrainConfig(spatial=True, sparsity=0.0, stop_gradient=True)
    assert nam.attention_kwargs == {"spatial": True, "sparsity": 0.0, "stop_gradient": True}
    assert TrainConfig(model="cbam").attention_kwargs == {}


def test_a_recipe_presets_nam_options_for_nam_only():
    assert TrainConfig.from_recipe("official").stop_gradient is True
    se = TrainConfig.from_recipe("official", model="se")
    assert se.stop_gradient is False and se.attention_kwargs == {}


def test_to_dict_is_json_ready():
    d = config.to_dict(TrainConfig(synthetic_size=(8, 4)))
    assert (
        d["synthetic_size"] == [8, 4]
        and d["model"] == "nam"
        and len(d) == len(dataclasses.fields(TrainConfig))
    )


def test_attention_flag_and_its_shortcuts():
    parse = lambda argv: cli.parse_config(TrainConfig, argv, "train.py", "")
    assert parse(["--attention", "cbam"]).model == "cbam"
    assert parse(["--attention", "cbam"]).resolved_output == "cbam.keras"
    assert parse(["--baseline"]).model == "baseline" and parse(["--nam"]).model == "nam"
    assert parse(["--no-augment"]).augment == "none"
    assert parse(["--augment", "crop-flip"]).augment == "crop-flip"


def test_attention_and_a_shortcut_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_config(TrainConfig, ["--baseline", "--attention", "se"], "train.py", "")
    assert exit_info.value.code == 2
    assert "not allowed with argument --baseline" in capsys.readouterr().err


def test_recipes_resolve_to_their_sources():
    parse = lambda argv: cli.parse_config(TrainConfig, argv, "train.py", "")
    seed = parse(["--recipe", "seed"])
    assert (seed.epochs, seed.batch_size, seed.peak_lr, seed.warmup_steps) == (300, 256, 0.01, 2000)
    assert (seed.schedule, seed.augment, seed.momentum, seed.weight_decay) == (
        "epoch-cosine",
        "reference",
        0.9,
        5e-4,
    )
    official = parse(["--recipe", "official"])
    assert (official.epochs, official.batch_size, official.peak_lr) == (200, 128, 0.1)
    assert (official.schedule, official.milestones, official.lr_decay) == (
        "multistep",
        (60, 120, 160),
        0.2,
    )
    assert (official.warmup_steps, official.augment, official.stop_gradient) == (
        0,
        "crop-flip",
        True,
    )
    assert official.sparsity == 1e-4 and official.recipe == "official"
    assert parse(["--recipe", "default"]) == TrainConfig()


def test_every_flag_given_overrides_the_recipe():
    """Even a flag equal to the table's default: what was typed wins."""
    argv = ["--recipe", "official", "--epochs", "300", "--milestones", "2", "3"]
    c = cli.parse_config(TrainConfig, [*argv, "--augment", "reference"], "train.py", "")
    assert (c.epochs, c.milestones, c.augment, c.batch_size) == (300, (2, 3), "reference", 128)
    assert c == TrainConfig.from_recipe(
        "official", epochs=300, milestones=(2, 3), augment="reference"
    )
    assert config.to_dict(c)["milestones"] == [2, 3] and config.to_dict(c)["recipe"] == "official"


def test_milestones_must_increase():
    with pytest.raises(ConfigError, match=r"--milestones must be strictly increasing"):
        TrainConfig(milestones=(120, 60))


def test_choice_lists_are_the_registries():
    """config.py writes the choices out (parsing imports no Keras); each list is
    its registry's, so a new module, depth, stem, recipe or schedule is offered."""
    from nam_keras.data import pipeline, sources
    from nam_keras.layers.attention import ATTENTIONS
    from nam_keras.models import resnet
    from nam_keras.training import schedules

    assert config.DATASETS == sources.SOURCES
    assert set(config.MODELS) == set(ATTENTIONS) | {"baseline"}
    assert tuple(sorted(resnet.RESNET_CONFIGS)) == config.DEPTHS
    assert config.STEMS == resnet.STEMS
    assert set(config.AUGMENTATIONS) == set(pipeline.AUGMENTATIONS)
    assert set(config.SCHEDULES) == set(schedules.BY_NAME)
    assert set(config.ATTENTION_OPTIONS) <= set(ATTENTIONS)
    for module, options in config.ATTENTION_OPTIONS.items():
        arguments = inspect.signature(ATTENTIONS[module]).parameters
        assert set(options.values()) <= set(arguments), module
        assert set(options) <= {f.name for f in dataclasses.fields(TrainConfig)}


# ------------------------------------------------------------------ red-team bounds


def _cli_error(argv, capsys, config_class=TrainConfig, prog="train.py"):
    """The message of a command line refused with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_config(config_class, argv, prog, "")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_synthetic_sizes_have_an_upper_bound(capsys):
    """10**9 synthetic images (3 TB) failed in NumPy with `_ArrayMemoryError`."""
    err = _cli_error(["--dataset", "synthetic", "--synthetic-size", "1000000000", "64"], capsys)
    assert "--synthetic-size: expected at most 500,000 images per split" in err
    assert "received 1,000,000,000" in err
    with pytest.raises(ConfigError, match=r"--synthetic-size: expected at most 500,000"):
        EvalConfig(model="m.keras", synthetic_size=(8, config.MAX_SYNTHETIC_SIZE + 1))
    assert TrainConfig(synthetic_size=(config.MAX_SYNTHETIC_SIZE, 1)).synthetic_size[0] == 500_000


NOT_UTF8 = b"runs/r\xff".decode("utf-8", "surrogateescape")  # how argv holds a Latin-1 byte


@pytest.mark.parametrize("option", ["--run-dir", "--output"])
def test_output_paths_must_be_utf8(option, capsys):
    """A non-UTF-8 byte in --run-dir failed with a ValueError inside `fit`, after
    config.json was written."""
    err = _cli_error([option, NOT_UTF8], capsys)
    assert f"argument {option}: expected a path encodable as UTF-8" in err
    name = option[2:].replace("-", "_")
    with pytest.raises(ConfigError, match=f"{option}: expected a path encodable as UTF-8"):
        TrainConfig(**{name: NOT_UTF8})
    with pytest.raises(ConfigError, match=f"{option}: expected a path encodable as UTF-8"):
        TrainConfig(**{name: "runs/\ud800"})  # a lone surrogate, not an undecodable byte
    assert getattr(TrainConfig(**{name: "runs/r\u00e9sum\u00e9"}), name) == "runs/r\u00e9sum\u00e9"


@pytest.mark.parametrize("option", ["--json", "--plots", "--export", "--export-tflite"])
def test_evaluation_output_paths_must_be_utf8(option, capsys):
    err = _cli_error(["m.keras", option, NOT_UTF8 + ".tflite"], capsys, EvalConfig, "evaluate.py")
    assert f"argument {option}: expected a path encodable as UTF-8" in err


def test_milestones_beyond_the_epochs_are_refused(capsys):
    argv = ["--schedule", "multistep", "--epochs", "100", "--milestones", "60", "120"]
    err = _cli_error(argv, capsys)
    assert "--milestones 120 not below --epochs 100" in err
    err = _cli_error([*argv[:4], "--milestones", "100000000000000000000000"], capsys)
    assert "--milestones: expected an integer <= 2147483647" in err
    with pytest.raises(ConfigError, match=r"--milestones: expected an integer <= 2147483647"):
        TrainConfig(schedule="multistep", milestones=(1e23,))
    with pytest.raises(ConfigError, match=r"--milestones 3 not below --epochs 3"):
        TrainConfig(schedule="multistep", epochs=3, milestones=(2, 3))  # 3 would never act
    assert TrainConfig(schedule="multistep", epochs=3, milestones=(2,)).milestones == (2,)
    # other schedules do not use the milestones: the defaults stay valid with any --epochs
    assert TrainConfig(epochs=1).milestones == (60, 120, 160)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 1e23}, "--epochs: expected an integer <= 2147483647"),
        ({"epochs": 2**31}, "received 2147483648"),
        ({"warmup_steps": 10**30}, "--warmup-steps: expected an integer <= 2147483647"),
        ({"steps_per_epoch": 2**40}, "--steps-per-epoch: expected an integer <= 2147483647"),
        ({"batch_size": 2**31}, "--batch-size: expected an integer <= 2147483647"),
    ],
)
def test_huge_integers_are_refused(kwargs, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kwargs)
    assert message in str(info.value)


def test_a_recipe_s_milestones_beyond_the_users_epochs_are_refused(capsys):
    """--recipe official presets --milestones 60 120 160 for 200 epochs: with
    --epochs 100 and no --milestones, a message, not a silent drop or rescale."""
    err = _cli_error(["--recipe", "official", "--epochs", "100"], capsys)
    assert "--recipe official presets --milestones 60 120 160 for its --epochs 200" in err
    assert "with --epochs 100, milestone(s) 120 160 would never act" in err
    assert "(e.g. 30 60 80, the recipe's scaled)" in err
    with pytest.raises(ConfigError, match="--recipe official presets --milestones"):
        TrainConfig.from_recipe("official", epochs=100)
    c = TrainConfig.from_recipe("official", epochs=100, milestones=(30, 60, 80))
    assert (c.epochs, c.milestones) == (100, (30, 60, 80))
    c = cli.parse_config(TrainConfig, ["--recipe", "official", "--epochs", "161"], "train.py", "")
    assert c.milestones == (60, 120, 160)
    err = _cli_error(["--recipe", "official", "--epochs", "1"], capsys)
    assert "No milestone can act in one epoch: give another --schedule" in err
    # another schedule: the recipe's milestones are unused
    c = TrainConfig.from_recipe("official", epochs=10, schedule="warmup-cosine")
    assert c.epochs == 10


def test_the_peak_learning_rate_must_be_finite(capsys):
    """--lr 1e308 with batch 256 is inf after the linear scaling: refused at
    validation, not at step 1."""
    err = _cli_error(["--lr", "1e308", "--batch-size", "256"], capsys)
    assert "--lr 1e+308 with --batch-size 256 gives a peak learning rate of inf" in err
    assert "--lr-scaling linear" in err
    assert TrainConfig(lr=1e308, batch_size=256, lr_scaling="none").peak_lr == 1e308
    assert TrainConfig(lr=1e308, batch_size=128).peak_lr == 1e308


def test_a_typed_option_of_another_module_is_refused_even_at_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--attention", "se", "--sparsity", "1e-4"])
    assert info.value.code == 2
    assert "--sparsity is an option of --attention nam only" in capsys.readouterr().err


def test_help_shows_each_default_once_and_library_words_become_flags():
    text = " ".join(cli.build_parser(TrainConfig, "train.py", "").format_help().split())
    assert "(default: None)" not in text and "(default: 300)" in text
    assert text.count("default runs/nam") == 1
    message = "pass `resume=False`, `extend=True`, `epochs=6` or another `run_dir`; `fit`"
    want = "pass --no-resume, --extend, --epochs 6 or another --run-dir; `fit`"
    assert cli.as_flags(message, TrainConfig) == want
    assert cli.as_flags("`model`", TrainConfig) == "--attention"
