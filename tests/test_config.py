import dataclasses

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from ptmrec_dist.cli import main
from ptmrec_dist.config import Config, all_keys, load_config, save_config, to_dict
from ptmrec_dist.errors import ConfigError


def test_defaults_are_valid_and_cover_every_section():
    cfg = load_config()
    assert isinstance(cfg, Config)
    sections = {k.split(".")[0] for k in all_keys() if "." in k}
    assert sections == {"data", "synthetic", "backbone", "demo_backbone", "extract",
                        "recommender", "peft", "stage1", "eval", "log",
                        "stage2", "dist", "tune"}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("stage2:\n  kt_weight: 0.25\n  prompt_len: 8\ndata:\n  split: random\n")
    cfg = load_config(path, ["stage2.kt_weight=0.5", "peft.method=lora",
                             "peft.target_modules=[q_proj, k_proj]"])
    assert cfg.stage2.kt_weight == 0.5          # override beats the file
    assert cfg.stage2.prompt_len == 8           # file beats the default
    assert cfg.stage2.prompt_depth == Config().stage2.prompt_depth
    assert cfg.data.split == "random"
    assert cfg.peft.target_modules == ["q_proj", "k_proj"]


def test_int_is_accepted_for_float_and_numbers_for_strings():
    cfg = load_config(None, ["stage2.kt_weight=1", "data.path=2024", "backbone.name_or_path=x=y"])
    assert cfg.stage2.kt_weight == 1.0 and isinstance(cfg.stage2.kt_weight, float)
    assert cfg.data.path == "2024"
    assert cfg.backbone.name_or_path == "x=y"


@pytest.mark.parametrize("override, needle", [
    ("stage2.kt_weigth=1", "unknown config key 'stage2.kt_weigth' (did you mean 'stage2.kt_weight'?)"),
    ("nosuch.key=1", "unknown config key 'nosuch.key'"),
    ("stage2.kt_weight=abc", "config key 'stage2.kt_weight': expected float"),
    ("stage1.epochs=1.5", "config key 'stage1.epochs': expected int"),
    ("stage2.kt_weight=.nan", "config key 'stage2.kt_weight': expected float"),
    ("stage1.epochs=true", "config key 'stage1.epochs': expected int"),
    ("peft.coupled=1", "config key 'peft.coupled': expected bool"),
    ("data.split=sometimes", "config key 'data.split': expected one of"),
    ("data=1", "config key 'data' is a section"),
    ("synthetic.n_items=3", "config key 'synthetic.n_items' must be >= 10"),
    ("noequals", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_bad_yaml_keys_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage2:\n  kt_wieght: 0.5\n")
    with pytest.raises(ConfigError, match="unknown config key 'stage2.kt_wieght'"):
        load_config(path)
    path.write_text("stage2: 3\n")
    with pytest.raises(ConfigError, match="'stage2': expected a mapping"):
        load_config(path)
    path.write_text("stage2: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["stage2.kt_weight=0.3", "data.split=loo", "seed=7"])
    path = save_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml"
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(path.read_text())["stage2"]["kt_weight"] == 0.3


def test_cli_exits_2_naming_the_key(capsys):
    assert main(["config", "stage2.kt_weigth=0.5"]) == 2
    err = capsys.readouterr().err
    assert "stage2.kt_weigth" in err and err.startswith("error:")
    assert main(["config", "stage2.kt_weight=0.5"]) == 0
    assert "kt_weight: 0.5" in capsys.readouterr().out


keys = st.sampled_from(all_keys() + ["data", "x.y", "stage2.", ".a", ""])
values = st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str),
                   st.sampled_from(["true", "[1, 2]", "{a: 1}", "null", "~", "'q'"]))


@settings(max_examples=300, deadline=None)
@given(keys, values)
def test_fuzz_overrides_raise_only_config_errors(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError:
        return
    assert dataclasses.is_dataclass(cfg)
