"""Strict loading, validation, round trips, overrides and presets of `ditkit.config`."""

from __future__ import annotations

import dataclasses

import pytest

from ditkit.config import (
    MODEL_PRESETS,
    AutoencoderConfig,
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

# ---------------------------------------------------------------------------------------------
# Defaults and the model <- data resolution


def test_default_config_resolves_model_shape_from_data():
    cfg = Config()
    assert cfg.data.image_size == 28 and cfg.data.channels == 1
    assert cfg.model.input_size == 28
    assert cfg.model.in_channels == 1
    assert cfg.model.out_channels == 2  # learn_sigma doubles the channels
    assert cfg.model.num_tokens == (28 // 2) ** 2


def test_default_sections_construct_with_documented_values():
    assert ModelConfig().hidden_size == 1152 and ModelConfig().depth == 28
    assert DiffusionConfig().num_timesteps == 1000
    assert TrainConfig().betas == (0.9, 0.999)
    assert SampleConfig().sampler == "ddim"
    assert DataConfig().dataset == "mnist"


def test_model_shape_follows_non_default_data():
    cfg = Config(model=ModelConfig(hidden_size=32, depth=1, num_heads=2), data=DataConfig(image_size=16, channels=3))
    assert (cfg.model.input_size, cfg.model.in_channels) == (16, 3)


def test_unresolved_model_config_refuses_shape_queries():
    with pytest.raises(ConfigError, match="model.input_size"):
        ModelConfig().require_resolved()
    with pytest.raises(ConfigError):
        _ = ModelConfig().num_tokens


def test_conflicting_explicit_in_channels_names_both_keys():
    with pytest.raises(ConfigError) as err:
        Config(model=ModelConfig(in_channels=3), data=DataConfig(channels=1))
    assert "model.in_channels" in str(err.value)
    assert "data.channels" in str(err.value)


def test_conflicting_explicit_input_size_names_both_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"input_size": 32}, "data": {"image_size": 28}})
    assert "model.input_size" in str(err.value)
    assert "data.image_size" in str(err.value)


def test_matching_explicit_model_shape_is_accepted():
    cfg = config_from_dict({"model": {"input_size": 16, "in_channels": 3}, "data": {"image_size": 16, "channels": 3}})
    assert (cfg.model.input_size, cfg.model.in_channels) == (16, 3)


def test_patch_size_must_divide_resolved_data_size():
    # The patch check runs again once the input size is taken from the data.
    with pytest.raises(ConfigError, match="patch_size"):
        config_from_dict({"model": {"patch_size": 3}, "data": {"image_size": 28}})


# ---------------------------------------------------------------------------------------------
# Strict loading


def test_unknown_top_level_key_raises_naming_it():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"modle": {}})
    assert "'modle'" in str(err.value)


def test_unknown_nested_key_raises_with_dotted_name():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"depht": 3}})
    assert "model.depht" in str(err.value)
    assert "depth" in str(err.value)  # the valid keys are listed


def test_unknown_nested_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  depht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.depht" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"steps": "ten"}}, "train.steps"),
        ({"train": {"steps": True}}, "train.steps"),  # bool is not an int here
        ({"train": {"lr": False}}, "train.lr"),  # nor a float
        ({"model": {"learn_sigma": 1}}, "model.learn_sigma"),  # nor is 1 a bool
        ({"train": {"precision": 16}}, "train.precision"),  # int for a Literal string
        ({"train": {"precision": "fp8"}}, "train.precision"),  # value outside the Literal
        ({"model": {"attn_impl": "flash"}}, "model.attn_impl"),
        ({"train": {"out_dir": 3}}, "train.out_dir"),
        ({"train": {"betas": [0.9]}}, "train.betas"),  # wrong tuple length
        ({"train": {"betas": [0.9, "x"]}}, "train.betas[1]"),
        ({"train": {"max_minutes": "soon"}}, "train.max_minutes"),  # Optional[float]
        ({"model": {"input_size": 2.5}}, "model.input_size"),  # float for Optional[int]
        ({"train": {"steps": None}}, "train.steps"),  # null for a non-Optional field
        ({"train": 5}, "train"),  # a section that is not a mapping
    ],
)
def test_wrong_type_raises_naming_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert key in str(err.value)


def test_bad_literal_message_lists_choices():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"precision": "fp8"}})
    for choice in ("fp32", "bf16", "fp16"):
        assert choice in str(err.value)


def test_ints_accepted_for_floats():
    cfg = config_from_dict({"train": {"lr": 1, "max_minutes": 3}, "sample": {"cfg_scale": 2}})
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.max_minutes == 3.0 and type(cfg.train.max_minutes) is float
    assert cfg.sample.cfg_scale == 2.0 and type(cfg.sample.cfg_scale) is float


def test_betas_list_becomes_tuple():
    cfg = config_from_dict({"train": {"betas": [0.9, 0.95]}})
    assert cfg.train.betas == (0.9, 0.95)
    assert isinstance(cfg.train.betas, tuple)


def test_null_accepted_for_optional_fields():
    cfg = config_from_dict({"train": {"grad_clip": None, "max_minutes": None}, "data": {"root": None}})
    assert cfg.train.grad_clip is None
    assert cfg.train.max_minutes is None


def test_config_from_dict_builds_a_single_section():
    model = config_from_dict({"input_size": 8, "in_channels": 1, "hidden_size": 32, "num_heads": 2}, ModelConfig)
    assert isinstance(model, ModelConfig)
    assert model.hidden_size == 32 and model.num_tokens == 16


def test_scientific_notation_floats_load_from_yaml(tmp_path):
    # PyYAML's YAML 1.1 resolver reads `1e-4` (no dot) as a string; a learning rate written the
    # way the DiT paper writes it must still load as a number, from a file and from an override.
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 1e-4\n")
    assert load_config(path).train.lr == pytest.approx(1e-4)
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


# ---------------------------------------------------------------------------------------------
# Validation in __post_init__


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"input_size": 30, "patch_size": 4}, "patch_size"),
        ({"hidden_size": 64, "num_heads": 3}, "num_heads"),
        ({"hidden_size": 36, "num_heads": 4}, "hidden_size"),  # odd head dim
        ({"class_dropout_prob": 1.0}, "class_dropout_prob"),
        ({"class_dropout_prob": -0.1}, "class_dropout_prob"),
        ({"depth": 0}, "model.depth"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
    ],
)
def test_invalid_model_values_raise(kwargs, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert key in str(err.value)


def test_invalid_model_value_raises_through_config_from_dict():
    with pytest.raises(ConfigError, match="class_dropout_prob"):
        config_from_dict({"model": {"class_dropout_prob": 1.5}})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.out_dir=", "train.out_dir"),
        ("train.out_dir=  ", "train.out_dir"),
        ("train.init_from=", "train.init_from"),
        ("train.wandb_project=", "train.wandb_project"),
        ("data.root=", "data.root"),
        ("data.cache=", "data.cache"),
    ],
)
def test_empty_path_strings_are_refused_naming_the_key(override, key):
    """An empty path would mean the current folder (out_dir='' wrote a run there); null stays the way to unset."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{key} must not be empty (got {override.split('=', 1)[1]!r})" in str(err.value)
    if key != "train.out_dir":
        section, name = key.split(".")
        assert getattr(getattr(load_config(None, [f"{key}=null"]), section), name) is None
    with pytest.raises(ConfigError, match="data.root must not be empty"):
        DataConfig(dataset="folder", root="")


def test_folder_dataset_requires_root():
    with pytest.raises(ConfigError, match="data.root"):
        DataConfig(dataset="folder")
    assert DataConfig(dataset="folder", root="imgs").root == "imgs"


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (DataConfig, {"channels": 2}, "data.channels"),
        (DataConfig, {"holdout": -1}, "data.holdout"),
        (DiffusionConfig, {"beta_start": 0.1, "beta_end": 0.01}, "beta"),
        (DiffusionConfig, {"num_timesteps": 1}, "diffusion.num_timesteps"),
        (TrainConfig, {"steps": 0}, "train.steps"),
        (TrainConfig, {"lr": 0.0}, "train.lr"),
        (TrainConfig, {"ema_decay": 1.0}, "train.ema_decay"),
        (TrainConfig, {"grad_clip": 0.0}, "train.grad_clip"),
        (TrainConfig, {"weight_decay": -1.0}, "train.weight_decay must be >= 0, got -1.0"),
        (TrainConfig, {"sample_every": -1}, "train.sample_every must be >= 0 (0: off), got -1"),
        (TrainConfig, {"grad_checkpoint_every": -2}, "train.grad_checkpoint_every must be >= 0 (0: off), got -2"),
        (TrainConfig, {"warmup_steps": -5}, "train.warmup_steps must be >= 0, got -5"),
        (TrainConfig, {"num_workers": -1}, "train.num_workers must be >= 0, got -1"),
        (TrainConfig, {"betas": (0.9, 1.0)}, "train.betas must both be in [0, 1), got [0.9, 1.0]"),
        (TrainConfig, {"betas": (-0.1, 0.999)}, "train.betas must both be in [0, 1), got [-0.1, 0.999]"),
        (AutoencoderConfig, {"scale": 0}, "autoencoder.scale must be non-zero, got 0"),
        (AutoencoderConfig, {"scale": [1.0, 0.0]}, "autoencoder.scale must be non-zero, got [1.0, 0.0]"),
        (SampleConfig, {"steps": 0}, "sample.steps"),
        (SampleConfig, {"eta": -0.5}, "sample.eta"),
        (SampleConfig, {"eta": 1.5}, "sample.eta must be in [0, 1]"),
        (SampleConfig, {"guidance_interval": (600.0, 0.0)}, "sample.guidance_interval must be [lo, hi] with lo <= hi"),
    ],
)
def test_invalid_section_values_raise(cls, kwargs, key):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert key in str(err.value)


# NaN passes every `x <= 0` / `x < 0` check and infinity passes the one-sided ones, so each float
# field is checked for finiteness, including those whose range check happens to reject NaN already.
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.grad_clip=.nan", "train.grad_clip must be a finite number, got nan"),
        ("train.max_minutes=.inf", "train.max_minutes must be a finite number, got inf"),
        ("train.weight_decay=.nan", "train.weight_decay must be a finite number, got nan"),
        ("train.ema_decay=.nan", "train.ema_decay must be a finite number, got nan"),
        ("train.betas=[.nan, 0.999]", "train.betas[0] must be a finite number, got nan"),
        ("model.mlp_ratio=.nan", "model.mlp_ratio must be a finite number, got nan"),
        ("model.class_dropout_prob=.nan", "model.class_dropout_prob must be a finite number, got nan"),
        ("sample.cfg_scale=.nan", "sample.cfg_scale must be a finite number, got nan"),
        ("sample.cfg_scale=.inf", "sample.cfg_scale must be a finite number, got inf"),
        ("sample.eta=.nan", "sample.eta must be a finite number, got nan"),
        ("sample.guidance_interval=[0, .inf]", "sample.guidance_interval[1] must be a finite number, got inf"),
        ("diffusion.t_std=.nan", "diffusion.t_std must be a finite number, got nan"),
        ("diffusion.t_mean=-.inf", "diffusion.t_mean must be a finite number, got -inf"),
        ("diffusion.vlb_weight=.nan", "diffusion.vlb_weight must be a finite number, got nan"),
        ("diffusion.beta_start=.nan", "diffusion.beta_start must be a finite number, got nan"),
        ("autoencoder.scale=.nan", "autoencoder.scale must be a finite number, got nan"),
        ("autoencoder.shift=[0, -.inf]", "autoencoder.shift[1] must be a finite number, got -inf"),
    ],
)
def test_non_finite_floats_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ModelConfig, {"mlp_ratio": float("nan")}, "model.mlp_ratio must be a finite number, got nan"),
        (TrainConfig, {"lr": float("inf")}, "train.lr must be a finite number, got inf"),
        (SampleConfig, {"cfg_scale": float("nan")}, "sample.cfg_scale must be a finite number, got nan"),
        (DiffusionConfig, {"vlb_weight": float("inf")}, "diffusion.vlb_weight must be a finite number, got inf"),
        (AutoencoderConfig, {"scale": [1, float("nan")]}, "autoencoder.scale[1] must be a finite number, got nan"),
    ],
)
def test_non_finite_floats_are_rejected_when_constructed_directly(cls, kwargs, message):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------
# Round trips


def _custom_config() -> Config:
    return Config(
        model=ModelConfig(hidden_size=64, depth=2, num_heads=2, patch_size=4, learn_sigma=False, attn_impl="math"),
        diffusion=DiffusionConfig(num_timesteps=100, beta_start=2e-4, beta_end=0.03),
        data=DataConfig(dataset="folder", root="/tmp/imgs", image_size=16, channels=3, hflip=True, skip_bad_files=True),
        train=TrainConfig(steps=7, max_minutes=1.5, lr=3e-4, betas=(0.8, 0.95), grad_clip=None, precision="bf16"),
        sample=SampleConfig(steps=10, eta=0.5, cfg_scale=1.5, seed=3),
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_then_load_gives_equal_config(tmp_path, suffix):
    cfg = _custom_config()
    path = tmp_path / f"config{suffix}"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert isinstance(loaded.train.betas, tuple)


def test_saved_yaml_and_json_hold_the_same_data(tmp_path):
    import json

    import yaml

    cfg = _custom_config()
    save_config(cfg, tmp_path / "c.json")
    save_config(cfg, tmp_path / "c.yaml")
    from_json = json.loads((tmp_path / "c.json").read_text())
    from_yaml = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert from_json == from_yaml == config_to_dict(cfg)


@pytest.mark.parametrize(
    "text",
    ["1e3", "2e-5", "1_0e4", "+1E5", ".5e3", ".inf", "-.inf", ".nan", "1.0", "1.", "12", "0x1F", "true", "null", "~"],
)
def test_yaml_round_trip_keeps_strings_that_look_like_numbers(tmp_path, text):
    # ditkit's loader reads `1e3` as a float (YAML 1.2); PyYAML's safe_dump follows YAML 1.1, where it
    # is a string, and would write it bare. The file must read back, through ditkit's own loader, as
    # the same strings.
    cfg = Config(train=TrainConfig(out_dir=text, wandb_project=text))
    save_config(cfg, tmp_path / "c.yaml")
    loaded = load_config(tmp_path / "c.yaml")
    assert (loaded.train.out_dir, loaded.train.wandb_project) == (text, text)
    assert loaded == cfg


def test_default_config_round_trips_through_file(tmp_path):
    save_config(Config(), tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == Config()


def test_config_to_dict_inverts_config_from_dict_for_a_full_dict():
    d = {
        "model": {
            "input_size": 4,
            "in_channels": 4,
            "patch_size": 2,
            "hidden_size": 64,
            "depth": 2,
            "num_heads": 2,
            "mlp_ratio": 2.0,
            "num_classes": 5,
            "class_dropout_prob": 0.2,
            "learn_sigma": False,
            "block_type": "adaLN",
            "pos_embed": "learned",
            "mlp_act": "gelu",
            "qk_norm": True,
            "mlp_type": "dwconv",
            "attn_impl": "sdpa",
            "unpatchify": "deconv",
            "inpaint": True,
            "text_dim": 0,
            "text_mode": "tokens",
            "caption_dropout_prob": 0.3,
        },
        "diffusion": {
            "schedule": "cosine",
            "num_timesteps": 50,
            "beta_start": 0.001,
            "beta_end": 0.05,
            "prediction": "x0",
            "process": "vp",
            "t_sampling": "logit_normal",
            "t_mean": -0.5,
            "t_std": 1.5,
            "vlb_weight": 0.01,
        },
        "data": {
            "dataset": "folder",
            "root": "data/x",
            "image_size": 16,
            "channels": 3,
            "hflip": True,
            "holdout": 10,
            "split_seed": 4,
            "skip_bad_files": True,
            "cache": "cache/x",
        },
        "train": {
            "out_dir": "runs/a",
            "steps": 9,
            "init_from": "runs/old",
            "max_minutes": 2.5,
            "batch_size": 4,
            "lr": 0.0003,
            "warmup_steps": 2,
            "weight_decay": 0.01,
            "betas": [0.8, 0.9],
            "grad_clip": None,
            "ema_decay": 0.99,
            "precision": "bf16",
            "seed": 7,
            "log_every": 3,
            "ckpt_every": 4,
            "keep_last": 1,
            "num_workers": 1,
            "device": "cpu",
            "eval_every": 3,
            "eval_num": 16,
            "parallel": "fsdp",
            "grad_accum_steps": 2,
            "grad_checkpoint_every": 2,
            "compile": True,
            "tf32": True,
            "fused_adamw": True,
            "tensorboard": True,
            "wandb_project": "p",
            "sample_every": 5,
        },
        "sample": {
            "sampler": "ddim",
            "steps": 5,
            "eta": 1.0,
            "cfg_scale": 1.0,
            "seed": 2,
            "guidance_interval": [0.0, 600.0],
            "spacing": "logsnr",
            "clip_denoised": False,
            "cuda_graph": False,
        },
        "autoencoder": {
            "kind": "kl",
            "path": "vae/folder",
            "subfolder": "vae",
            "scale": [0.5, 0.25, 1.0, 2.0],
            "shift": 0.1,
            "stats": "data",
            "latent_channels": 4,
            "downsample": 4,
        },
        "text": {"encoder": "text/folder", "max_length": 8, "pooling": "mean", "cache": "text.safetensors"},
    }
    assert config_to_dict(config_from_dict(d)) == d


def test_full_dict_covers_every_field():
    # Guards the round-trip test above: a field added later must appear in config_to_dict.
    d = config_to_dict(Config())
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    for section in dataclasses.fields(Config):
        assert set(d[section.name]) == {f.name for f in dataclasses.fields(getattr(Config(), section.name))}


# ---------------------------------------------------------------------------------------------
# Overrides


def test_train_compile_takes_true_false_or_blocks():
    assert config_from_dict({"train": {"compile": "blocks"}}).train.compile == "blocks"
    assert config_from_dict({"train": {"compile": True}}).train.compile is True
    with pytest.raises(ConfigError, match="train.compile: 'block' does not match true/false or one of 'blocks'"):
        config_from_dict({"train": {"compile": "block"}})


def test_apply_overrides_parses_values_as_yaml():
    out = apply_overrides(
        {"train": {"steps": 100}},
        ["train.steps=5", "train.betas=[0.9,0.95]", "model.learn_sigma=false", "train.grad_clip=null"],
    )
    assert out == {"train": {"steps": 5, "betas": [0.9, 0.95], "grad_clip": None}, "model": {"learn_sigma": False}}


def test_apply_overrides_does_not_mutate_its_input():
    data = {"train": {"steps": 100}}
    apply_overrides(data, ["train.steps=5"])
    assert data == {"train": {"steps": 100}}


def test_override_value_may_contain_equals_sign():
    assert apply_overrides({}, ["train.out_dir=runs/a=b"]) == {"train": {"out_dir": "runs/a=b"}}


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("data.root=/data/set #7", ("data", "root"), "/data/set #7"),  # YAML would cut at the comment
        ("train.out_dir=runs/exp #2", ("train", "out_dir"), "runs/exp #2"),
        ("data.root=&x mydata", ("data", "root"), "&x mydata"),  # YAML would read an anchor
        ("data.root=2024", ("data", "root"), "2024"),  # a folder named like a number
        ("data.root=yes", ("data", "root"), "yes"),
        ("data.root='quoted #x'", ("data", "root"), "quoted #x"),  # quotes still unquote
        ("text.encoder=null", ("text", "encoder"), None),  # an optional string: null is None
        ("text.encoder=~", ("text", "encoder"), None),
        ("train.steps=5", ("train", "steps"), 5),  # other settings: YAML as before
    ],
)
def test_string_overrides_keep_their_text_as_written(override, key, value):
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, key[0]), key[1]) == value


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, suffix):
    # The last one used to win, silently returning every field of the first section to its default.
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".yaml":
        path.write_text("model:\n  depth: 2\ntrain:\n  steps: 3\nmodel:\n  hidden_size: 64\n")
        match = r"the key 'model' appears twice in one mapping \(first on line 1\)"
    else:
        path.write_text('{"model": {"depth": 2}, "train": {"steps": 3}, "model": {"hidden_size": 64}}')
        match = "gives the key 'model' twice"
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_load_config_applies_overrides_over_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  steps: 100\n  grad_clip: 2.0\nmodel:\n  learn_sigma: true\n")
    cfg = load_config(
        path, overrides=["train.steps=5", "train.betas=[0.9,0.95]", "model.learn_sigma=false", "train.grad_clip=null"]
    )
    assert cfg.train.steps == 5
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.model.learn_sigma is False
    assert cfg.train.grad_clip is None


def test_overrides_without_a_file():
    cfg = load_config(None, ["data.image_size=16", "model.patch_size=4"])
    assert cfg.model.input_size == 16 and cfg.model.patch_size == 4


def test_malformed_override_raises():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no-equals-sign"])


def test_override_with_unknown_key_raises_naming_it():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.stepz=5"])
    assert "train.stepz" in str(err.value)


def test_an_unknown_override_key_is_blamed_on_the_overrides_not_the_file(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("train:\n  steps: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.steps=5", "train.stepz=5"])
    message = str(err.value)
    assert message.startswith("command-line overrides: unknown config key 'train.stepz'"), message
    assert str(path) not in message and "steps" in message.split("valid keys here:")[1]
    with pytest.raises(ConfigError, match="^command-line overrides: unknown config key 'modle'"):
        load_config(path, ["modle.depth=3"])
    # An unknown key in the file itself is still the file's.
    path.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=f"^{path}: unknown config key 'train.stepz'"):
        load_config(path, ["train.steps=5", "preset=DiT-S/2"])
    # So is a bad value: the override that gave it, else the file.
    path.write_text("train:\n  steps: 10\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"^command-line override train\.steps=abc: train\.steps: expected an int"):
        load_config(path, ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"^command-line override model\.depth=-1: model\.depth must be >= 1"):
        load_config(path, ["model.depth=-1", "train.batch_size=4"])
    with pytest.raises(ConfigError, match=f"^{path}: train\\.batch_size must be >= 1"):
        load_config(path, ["train.steps=5"])
    # The override that took effect (the last), and only one the message is about: a key named in the
    # advice of another key's error is not blamed.
    with pytest.raises(ConfigError, match=r"^command-line override train\.steps=abc: "):
        load_config(path, ["train.steps=5", "train.steps=abc", "train.batch_size=4"])
    path.write_text("model:\n  patch_size: 3\n")
    with pytest.raises(ConfigError, match=f"^{path}: model\\.patch_size=3 must divide"):
        load_config(path, ["model.input_size=32"])


def test_override_with_wrong_type_raises_naming_key():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many"])


def test_override_through_a_scalar_raises():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


# ---------------------------------------------------------------------------------------------
# Presets


def test_preset_in_yaml_fills_model_fields(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: DiT-S/2\n")
    cfg = load_config(path)
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.patch_size) == (12, 384, 6, 2)


def test_file_model_fields_win_over_preset(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: DiT-S/2\nmodel:\n  depth: 2\n")
    cfg = load_config(path)
    assert cfg.model.depth == 2
    assert cfg.model.hidden_size == 384


def test_preset_given_as_override():
    cfg = load_config(None, ["preset=DiT-B/4", "data.image_size=32"])
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.patch_size) == (12, 768, 12, 4)


@pytest.mark.parametrize("value", ["[1, 2]", "{a: 1}", "2", "true"])
def test_non_string_preset_raises_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"preset={value}"])
    assert str(err.value).startswith("preset: unknown preset")


def test_preset_with_a_non_mapping_model_section_raises_naming_it():
    with pytest.raises(ConfigError, match="model: expected a mapping, got \\[1\\]"):
        load_config(None, ["preset=DiT-S/2", "model=[1]"])


def test_unknown_preset_raises(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: DiT-XXL/2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "DiT-XXL/2" in str(err.value)


def test_presets_cover_the_paper_grid():
    paper = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert set(MODEL_PRESETS) == paper | {"DiT-2B/2"}
    assert MODEL_PRESETS["DiT-2B/2"] == {"depth": 30, "hidden_size": 2048, "num_heads": 16, "patch_size": 2}
    assert MODEL_PRESETS["DiT-XL/2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}
    assert MODEL_PRESETS["DiT-L/4"] == {"depth": 24, "hidden_size": 1024, "num_heads": 16, "patch_size": 4}
    assert MODEL_PRESETS["DiT-B/8"] == {"depth": 12, "hidden_size": 768, "num_heads": 12, "patch_size": 8}


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_builds_a_valid_model_config(name):
    cfg = ModelConfig(input_size=32, in_channels=4, **MODEL_PRESETS[name])
    assert cfg.resolved()
    assert cfg.num_tokens == (32 // MODEL_PRESETS[name]["patch_size"]) ** 2
    assert cfg.out_channels == 8


# ---------------------------------------------------------------------------------------------
# Bad files


def test_yaml_file_that_is_not_a_mapping_raises_naming_path(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_file_raises_naming_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("name", "text"), [("bad.yaml", "model: [1, 2\n"), ("bad.json", '{"model": ')])
def test_invalid_file_syntax_raises_naming_path(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()
