"""Config files, dotted overrides and their validation."""

import dataclasses
import re
from pathlib import Path

import pytest

from jitrope.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    model_fields,
    parse_hw,
    parse_overrides,
)
from jitrope.model import JiTConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_config_library_has_tiny_cpu_and_gpu_configs():
    names = [p.stem for p in CONFIGS]
    assert any("tiny" in n for n in names) and "emoji32_cpu" in names
    assert any(n.startswith("emoji64") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds_its_model_config(path):
    cfg = load_config(path)
    mc = cfg.model_config()
    assert isinstance(mc, JiTConfig)
    assert mc.img_size == cfg.data.img_size
    assert (mc.cond_img_size is None) == (cfg.data.cond == "none")
    if path.stem.startswith("emoji64"):  # the problem statement's geometry: 256 + 64 tokens
        assert mc.grid == (16, 16) and mc.cond_grid == (8, 8)


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(
        "configs/tiny_cpu.yaml",
        [
            "model.pos_embed=factorized2d",
            "train.steps=7",
            "train.blr=5e-5",
            "train.ema_decays=[0.9,0.8]",
            "sample.cfg_interval=[0.2,0.9]",
            "model.pos_max_grid=[8,8]",
            "data.root=null",
            "train.lr=0.001",
        ],
    )
    assert cfg.model["pos_embed"] == "factorized2d" and cfg.model_config().pos_embed == "factorized2d"
    assert cfg.train.steps == 7 and cfg.train.blr == 5e-5 and cfg.train.lr == 0.001
    assert cfg.train.ema_decays == (0.9, 0.8) and cfg.sample.cfg_interval == (0.2, 0.9)
    assert cfg.model_config().pos_max_grid == (8, 8) and cfg.data.root is None


def test_unknown_keys_are_rejected_by_name_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"train\.stpes \(did you mean train\.steps\?\)"):
        load_config("configs/tiny_cpu.yaml", ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"model\.pos_embd \(did you mean model\.pos_embed\?\)"):
        load_config(None, ["model.pos_embd=rope2d"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): optim"):
        config_from_dict({"optim": {"lr": 1}})
    # every bad key of a file is named at once
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"foo": 1, "bar": 2}})
    assert "train.foo" in str(e.value) and "train.bar" in str(e.value)


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.steps=ten", "config key train.steps: Value 'ten' of type 'str' could not be converted to Integer"),
        ("train.steps=null", "config key train.steps: Incompatible value 'None' for field of type 'int'"),
        ("train.tensorboard=maybe", "config key train.tensorboard: Value 'maybe' is not a valid bool"),
        (
            "train.ema_decays=[0.9,x]",
            "config key train.ema_decays: a value could not be converted to Float (got [0.9, 'x'])",
        ),
        (
            "sample.cfg_interval=[0.1]",
            "config key sample.cfg_interval: TupleConfig length 1 does not match type hint length 2",
        ),
        ("train.ema_decays=[1.5]", "train.ema_decays"),
        ("data.cond=sideways", "data.cond"),
        ("sample.sampler=rk4", "sample.sampler"),
        ("sample.cfg_interval=[0.9,0.1]", "cfg_interval"),
        ("sample.ema=5", "sample.ema"),
        ("model.depth=2.5", "config key model.depth: Value '2.5' of type 'float' could not be converted to Integer"),
        ("model.preset=[1]", "config key model.preset: expected a preset name"),
        ("steps=3", "section.key"),
        # numbers that make no sense; 0 never means "the default"
        ("train.steps=0", "train.steps must be >= 1, got 0"),
        ("train.ckpt_every=0", "train.ckpt_every must be >= 1, got 0"),
        ("train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("train.sample_steps=0", "train.sample_steps must be >= 1"),
        ("train.num_threads=0", "train.num_threads must be >= 1, got 0"),
        ("train.keep_last=-1", "train.keep_last must be >= 0"),
        ("train.lr=-1e-3", "train.lr must be a positive number"),
        ("train.blr=.nan", "train.blr must be a positive number"),
        ("data.img_size=0", "data.img_size must be >= 1, got 0"),
        ("data.img_size=-4", "data.img_size must be >= 1, got -4"),
        ("data.vendors=[]", "data.vendors is empty"),
        ("sample.steps=0", "sample.steps must be >= 1"),
        ("sample.cfg=-3", "sample.cfg (guidance scale) must be a finite number >= 0, got -3.0"),
        ("sample.cfg=.nan", "sample.cfg (guidance scale) must be a finite number >= 0, got nan"),
        ("train.compile_mode=fast", "train.compile_mode: 'fast' is not one of ['none', 'default', 'reduce-overhead'"),
        ("model.pos_embed=rope3d", "model config: pos_embed must be one of"),
        ("train.steps", "section.key=value"),
        # a held-out fraction that leaves no training data, or none at all
        ("data.holdout=1.0", "data.holdout (the fraction of images held out) must be in [0, 1), got 1.0"),
        ("data.holdout=-0.5", "data.holdout (the fraction of images held out) must be in [0, 1), got -0.5"),
        ("data.holdout=nan", "data.holdout (the fraction of images held out) must be in [0, 1), got nan"),
        # every diffusion number finite (nan failed at step 5, inf trained on garbage)
        ("diffusion.P_std=nan", "diffusion.P_std must be a finite number, got nan"),
        ("diffusion.t_eps=nan", "diffusion.t_eps must be a finite number, got nan"),
        ("diffusion.P_mean=inf", "diffusion.P_mean must be a finite number, got inf"),
        ("diffusion.P_mean=-inf", "diffusion.P_mean must be a finite number, got -inf"),
        ("diffusion.noise_scale=inf", "diffusion.noise_scale must be a finite number, got inf"),
        ("diffusion.P_std=0", "diffusion.P_std must be > 0, got 0.0"),
        ("diffusion.noise_scale=-1", "diffusion.noise_scale must be > 0, got -1.0"),
        ("diffusion.t_eps=0", "diffusion.t_eps must be in (0, 1], got 0.0"),
        ("diffusion.t_eps=1.5", "diffusion.t_eps must be in (0, 1], got 1.5"),
        # the settings of jitrope.sample / jitrope.evaluate
        ("sample.n=0", "config key sample.n must be >= 1, got 0"),
        ("sample.batch_size=-1", "config key sample.batch_size must be >= 1, got -1"),
        ("sample.scale=0", "config key sample.scale must be >= 1, got 0"),
        ("sample.device=gpu0", "config key sample.device: 'gpu0' is not a device (auto | cpu | cuda | cuda:N)"),
        ("train.device=gpu0", "config key train.device: 'gpu0' is not a device (auto | cpu | cuda | cuda:N)"),
        ("sample.out=''", "config key sample.out is empty"),
        ("sample.singles=perhaps", "config key sample.singles: Value 'perhaps' is not a valid bool"),
        ("eval.split=test", "config key eval.split: 'test' is not one of ['val', 'train', 'all']"),
        ("eval.metrics=[vloss,fid]", "config key eval.metrics wants a subset of ['vloss', 'class', 'cond', 'res']"),
        ("eval.metrics=[vloss,vloss]", "config key eval.metrics wants a subset"),
        ("eval.metrics=[]", "config key eval.metrics wants a subset"),
        ("eval.t_grid=[0.5,1.0]", "config key eval.t_grid wants values in [0, 1), got [0.5, 1.0]"),
        ("eval.t_grid=[]", "config key eval.t_grid wants values in [0, 1), got []"),
        ("eval.n_per_class=0", "config key eval.n_per_class must be >= 1, got 0"),
        ("eval.num_threads=0", "config key eval.num_threads must be >= 1, got 0"),
        ("eval.res_px=[16,0]", "config key eval.res_px wants positive image sizes, got [16, 0]"),
        ("eval.res_px=[x]", "config key eval.res_px: a value could not be converted to Integer"),
        (
            "eval.res_hw=[32x48,32x]",
            "config key eval.res_hw wants sizes HxW of positive integers (e.g. 32x48), got '32x'",
        ),
        ("eval.res_hw=[-8x8]", "config key eval.res_hw wants sizes HxW"),
        (
            "eval.res_scalings=[ntk,rope]",
            "config key eval.res_scalings wants a subset of ['extrapolate', "
            "'interpolate', 'ntk', 'yarn'], got ['ntk', 'rope']",
        ),
        ("eval.res_scalings=[]", "config key eval.res_scalings wants a subset"),
        ("model.pos_scaling=ntk-by-parts", "pos_scaling must be one of ['extrapolate', 'interpolate', 'ntk', 'yarn']"),
        ("eval.device=cuda:x", "config key eval.device: 'cuda:x' is not a device"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config("configs/tiny_cpu.yaml", [override])


def test_absent_null_condition_is_refused_for_packed_batches():
    cond = ["model.cond_img_size=16", "data.cond=downsample"]
    load_config("configs/emoji_multires_cpu.yaml", [*cond, "model.null_cond=learned"])
    load_config("configs/emoji_multires_cpu.yaml", ["model.null_cond=absent"])  # no condition image: nothing to drop
    with pytest.raises(ConfigError, match=r"model\.null_cond=absent does not train packed batches \(data\.sizes\)"):
        load_config("configs/emoji_multires_cpu.yaml", [*cond, "model.null_cond=absent"])


def test_model_keys_are_exactly_the_jitconfig_fields():
    assert set(model_fields()) == {f.name for f in dataclasses.fields(JiTConfig)}
    cfg = load_config(None, ["model.preset=tiny", "model.depth=3"])
    mc = cfg.model_config()
    assert mc.depth == 3 and mc.hidden_size == JiTConfig.preset("tiny").hidden_size


def test_base_files_yaml_round_trip_and_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 5\n  batch_size: 8\nmodel:\n  preset: tiny\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.steps == 9 and cfg.train.batch_size == 8 and cfg.model == {"preset": "tiny"}
    cfg.save(tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


def test_parse_overrides_nests_and_parses_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=x y", "d.e=[1, 2]", "--f.g=true"]) == {
        "a": {"b": 1, "c": "x y"},
        "d": {"e": [1, 2]},
        "f": {"g": True},
    }
    assert isinstance(Config().train.ema_decays, tuple)


def test_parse_hw_reads_sizes_as_the_data_sizes_do_plus_a_bare_square():
    from jitrope.data import parse_size

    for text in ("32x48", "48X32", " 8x16 ", "16x16"):
        assert parse_hw(text, "k") == parse_size(text, "k")
    assert parse_hw("32", "k") == (32, 32) and parse_hw(24, "k") == (24, 24)
    for bad in ("32x", "x32", "0x8", "-8x8", "+8x8", "8x8x8", "", "0"):
        with pytest.raises(ConfigError, match=f"config key k wants sizes HxW .*got {re.escape(repr(bad))}"):
            parse_hw(bad, "k")


def test_sample_and_eval_sections_layer_over_a_stored_config():
    stored = load_config("configs/tiny_cpu.yaml", ["sample.steps=9", "sample.cfg=3.0"]).to_dict()
    stored["train"]["compile"] = True  # an older version's key, translated in the stored layer
    del stored["train"]["compile_mode"], stored["eval"]  # a run of a version before eval.*
    cfg = load_config(
        None,
        ["sample.cfg=1.5", "eval.metrics=[vloss]"],
        base=stored,
        flags={"sample": {"classes": "null", "n": 3}, "eval": {"t_grid": [0.25]}},
    )
    assert cfg.sample.steps == 9 and cfg.sample.cfg == 1.5 and cfg.sample.n == 3
    assert cfg.sample.classes == "null"  # a flag's value is never parsed as YAML
    assert cfg.train.compile_mode == "default" and cfg.data.name == "synthetic"
    assert cfg.eval.metrics == ("vloss",) and cfg.eval.t_grid == (0.25,) and cfg.eval.max_images == 512
    with pytest.raises(ConfigError, match=r"sample\.stpes \(did you mean sample\.steps\?\)"):
        load_config(None, base=stored, flags={"sample": {"stpes": 1}})
    assert load_config(None, ["sample.classes=null"]).sample.classes is None  # an override is YAML


def test_legacy_keys_of_stored_configs_still_load():
    d = {"train": {"compile": True, "num_threads": 0}}
    cfg = config_from_dict(d, stored=True)
    assert cfg.train.compile_mode == "default" and cfg.train.num_threads is None
    assert config_from_dict({"train": {"compile": False}}).train.compile_mode == "none"
    with pytest.raises(ConfigError, match="train.num_threads must be >= 1"):
        config_from_dict({"train": {"num_threads": 0}})  # typed by a user, 0 is refused


def test_interpolation_resolves_and_print_config_shows_the_resolved_values(tmp_path, capsys):
    from jitrope import train as T

    (tmp_path / "c.yaml").write_text(
        "base: %s\nmodel:\n  img_size: ${data.img_size}\ndata:\n  img_size: 16\n"
        % (Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
    )
    cfg = load_config(tmp_path / "c.yaml", ["train.out_dir=runs/${model.pos_embed}"])
    assert cfg.model["img_size"] == 16 and cfg.train.out_dir == "runs/rope2d"
    args = ["--config", str(tmp_path / "c.yaml"), "--print-config", "data.img_size=32", "model.cond_img_size=16"]
    assert T.main(args) == 0
    out = capsys.readouterr().out
    assert "img_size: 32" in out and "${" not in out
    with pytest.raises(ConfigError, match="config key model.img_size: .*nope"):
        load_config(tmp_path / "c.yaml", ["model.img_size=${data.nope}"])


def test_nonsense_data_and_diffusion_numbers_are_one_line_before_training(tmp_path, capsys):
    from jitrope import train as T

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
    for override in ("data.holdout=1.0", "diffusion.P_std=nan", "diffusion.P_mean=inf"):
        assert T.main(["--config", tiny, override, f"train.out_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: config key {override.split('=')[0]} ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_a_tilde_in_folders_is_expanded_once_when_the_config_is_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("configs/tiny_cpu.yaml", ["train.out_dir=~/runs/a", "data.root=~/data"])
    assert cfg.train.out_dir == str(tmp_path / "runs" / "a") and cfg.data.root == str(tmp_path / "data")
    assert load_config("configs/tiny_cpu.yaml", ["train.out_dir=runs/~x"]).train.out_dir == "runs/~x"


@pytest.mark.parametrize(
    "overrides,match",
    [
        # the budget is checked when the config is read, before a data set is built at the largest size
        (
            ["data.sizes=[16x16,100000x100000]", "train.tokens_per_batch=256"],
            "config key data.sizes: 100000x100000 takes 625000000 image tokens at patch 4, over the budget "
            "train.tokens_per_batch=256",
        ),
        (
            ["sample.sizes=16x16,100000x100000"],
            "config key sample.sizes: 100000x100000 takes 625000000 image tokens at patch 4, over the sampler's "
            "limit sample.max_tokens=262144",
        ),
        (["sample.max_tokens=0"], "config key sample.max_tokens must be >= 1, got 0"),
        # 0x8 is a size (with no rows), not YAML's hex number 8
        (["data.sizes=[0x8,16x16]", "train.tokens_per_batch=256"], "config key data.sizes: '0x8' must have a positive"),
        (["sample.sizes=0x8"], "config key sample.sizes: '0x8' must have a positive height and width"),
        (["eval.res_hw=[0x16]"], "config key eval.res_hw wants sizes HxW of positive integers (e.g. 32x48), got '0x16"),
        (["sample.sizes=16x16,8x8,16X16"], "config key sample.sizes gives 16x16 2 times; give each size once"),
    ],
)
def test_sizes_are_checked_as_text_against_their_budget_when_the_config_is_read(overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config("configs/tiny_cpu.yaml", overrides)


def test_a_size_spelt_like_a_hex_number_stays_text_in_files_too(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("base: " + str(Path("configs/tiny_cpu.yaml").resolve()) + "\ndata:\n  sizes: [0x8, 16x16]\n")
    with pytest.raises(ConfigError, match=re.escape("config key data.sizes: '0x8' must have a positive")):
        load_config(f, ["train.tokens_per_batch=256"])
    f.write_text("sample:\n  sizes: 0x8  # one size\n")
    with pytest.raises(ConfigError, match="config key sample.sizes: '0x8' must have a positive"):
        load_config(f)
    f.write_text("train:\n  seed: 0x10\n")  # any value so spelt is text: a number wants decimal digits
    with pytest.raises(ConfigError, match="config key train.seed: Value '0x10' of type 'str' could not be converted"):
        load_config(f)
    assert parse_overrides(["a.b=0x8", "a.c=[0x8, 8x8]", "a.d=0x8,8x8", "a.e='0x8'"]) == {
        "a": {"b": "0x8", "c": ["0x8", "8x8"], "d": "0x8,8x8", "e": "0x8"}
    }
    # a size given twice in training is warned about, not refused: a stored run config may hold it
    cfg = load_config("configs/tiny_cpu.yaml", ["data.sizes=[16x16,8x8,16x16]", "train.tokens_per_batch=64"])
    assert cfg.data.sizes == ("16x16", "8x8", "16x16")
    assert capsys.readouterr().err == (
        "warning: config key data.sizes gives 16x16 2 times: packed batches draw a size once per time it is "
        "given, so more often than the others; give each size once for equal shares\n"
    )
