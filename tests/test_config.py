"""Config: YAML files, key=value overrides with type checks, and errors that name the fix."""
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed():
    cfg = load_config(ROOT / "experiments/sdpn_tiny.yaml", ["num_proto=32", "lr=1e-2", "resume=true", "exp_dir=x/y"])
    assert (cfg.num_proto, cfg.lr, cfg.resume, cfg.exp_dir) == (32, 0.01, True, "x/y")
    assert isinstance(cfg.lr, float)
    assert load_config(None, ["lr=1"]).lr == 1.0  # ints are accepted for floats


@pytest.mark.parametrize("override, words", [
    ("num_prot=3", ["unknown config key 'num_prot'", "did you mean 'num_proto'"]),
    ("outputdim=3", ["unknown config key 'outputdim'", "'output_dim'"]),
    ("num_proto=abc", ["'num_proto'", "must be int", "'abc'"]),
    ("resume=3", ["'resume'", "must be bool"]),
    ("num_proto=0", ["num_proto must be >= 1", "num_proto="]),
    ("output_dim=-2", ["output_dim must be >= 1"]),
    ("novalue", ["not key=value"]),
])
def test_bad_overrides_name_the_problem(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_yaml_base_and_unknown_key_in_file(tmp_path):
    (tmp_path / "a.yaml").write_text("num_proto: 8\noutput_dim: 4\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noutput_dim: 6\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.num_proto, cfg.output_dim) == (8, 6)
    (tmp_path / "c.yaml").write_text("num_protos: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'num_protos' in .*c.yaml; did you mean 'num_proto'"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


RUN_CONFIGS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "sweeps" not in p.parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=[p.name for p in RUN_CONFIGS])
def test_every_run_config_loads(path):
    assert isinstance(load_config(path), Config)   # sweep files (W&B's format) aside


def test_cli_reports_config_errors_in_one_line(capsys):
    from pipeline.cli import main

    assert main(["train", "--config", str(ROOT / "experiments/sdpn_tiny.yaml"), "num_prot=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'num_proto'" in err
