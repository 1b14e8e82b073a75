"""Launch options of the fused kernels: the committed ``CONFIGS`` and the ``MEGAFIRE_FUSED_CONFIGS``
override (tuning, A/B runs on the device machine). A misspelt option must not be ignored: the A/B
would time the committed kernels twice and report no difference."""
from __future__ import annotations

import pytest
import torch

from megafire.attention import kernel_options
from megafire.attention.fused import CONFIGS, _function
from megafire.config import ConfigError, load_config


def test_committed_configs_are_valid():
    """Every committed entry passes the same check as the override (launch tuples, flags, ints)."""
    for key, entry in CONFIGS.items():
        checked = kernel_options.check_config(entry, f"CONFIGS[{key!r}]")
        assert checked.keys() == entry.keys(), key


@pytest.mark.parametrize("env, message", [
    ('{"64": {"rcp_ex": true}}', r"MEGAFIRE_FUSED_CONFIGS\['64'\]: unknown key 'rcp_ex'; allowed: .*rcp_ex2"),
    ('{"64": {"onepass": [64, 64, 4]}}', r"\['onepass'\] = \[64, 64, 4\]: a launch config is \[BM, BN, warps, "
                                         r"stages\].*, or false"),
    ('{"64": {"fwd": [60, 64, 4, 3]}}', r"\['fwd'\] = \[60, 64, 4, 3\]: .*powers of two"),
    ('{"64": {"defer": "yes"}}', r"\['defer'\] = 'yes': true / false"),
    ('{"64": {"onepass_min_n": -1}}', r"\['onepass_min_n'\] = -1: an integer >= 0"),
    ('{"48": {}}', r"head dim '48' is not one of 16, 32, 64, 128"),
    ('{"64": [1, 2]}', r"\['64'\]: expected an object of launch options"),
    ('[64]', r"expected an object of head dims"),
    ("{'64': {}}", r"MEGAFIRE_FUSED_CONFIGS is not JSON"),
])
def test_bad_override_names_the_problem(env, message, monkeypatch):
    monkeypatch.setenv("MEGAFIRE_FUSED_CONFIGS", env)
    monkeypatch.setattr(_function, "_interp", lambda: False)
    monkeypatch.setattr(_function, "_env_cache", {})
    with pytest.raises(ValueError, match=message):
        _function._config(64, "fire")


def test_override_applies_over_the_committed_entry(monkeypatch):
    """Lists become launch tuples, 0 / 1 flags bools, ``onepass: false`` turns the one-pass kernel off;
    keys not given keep the committed (D, encoding) values; ``skip`` sets both mask-skip flags."""
    monkeypatch.setenv("MEGAFIRE_FUSED_CONFIGS", '{"64": {"dq": [32, 64, 4, 2], "onepass": false, "rcp_ex2": 1, '
                                                 '"skip": 0}}')
    monkeypatch.setattr(_function, "_interp", lambda: False)
    monkeypatch.setattr(_function, "_env_cache", {})
    cfg = _function._config(64, "t5")
    committed = _function.committed_config(64, "t5")
    assert cfg["dq"] == (32, 64, 4, 2) and cfg["onepass"] is None and cfg["rcp_ex2"] is True
    assert cfg["skip_fwd"] is False and cfg["skip_bwd"] is False
    assert cfg["fwd"] == committed["fwd"] and cfg["defer"] is committed["defer"] is True
    assert committed["onepass"] == (64, 64, 4, 1)


@pytest.fixture
def run_options():
    """Sets the run's ``attention.fused_kernels`` for one test and restores the committed ones."""
    yield kernel_options.set_run_overrides
    kernel_options.set_run_overrides({})


def test_run_options_sit_between_committed_and_env(run_options, monkeypatch):
    """The run's ``attention.fused_kernels`` (each optimization's off switch in the config) goes over
    the committed (D, encoding) entry, MEGAFIRE_FUSED_CONFIGS over both; other head dims and keys
    keep the committed values; an empty mapping restores them."""
    monkeypatch.setattr(_function, "_interp", lambda: False)
    monkeypatch.setattr(_function, "_env_cache", {})
    monkeypatch.delenv("MEGAFIRE_FUSED_CONFIGS", raising=False)
    committed = _function.committed_config(64, "fire")
    assert committed["split_heavy"] is True and committed["rcp_ex2"] is True   # what the switches turn off
    run_options({64: {"split_heavy": False, "rcp_ex2": 0, "dq": [64, 64, 4, 2], "ku": 1}})
    cfg = _function._config(64, "fire")
    assert cfg["split_heavy"] is False and cfg["rcp_ex2"] is False and cfg["dq"] == (64, 64, 4, 2)
    assert cfg["ku"] == 1 and cfg["fwd"] == committed["fwd"] and cfg["segment_bounds"] is True
    assert _function._config(128, "fire") == _function.committed_config(128, "fire")
    monkeypatch.setenv("MEGAFIRE_FUSED_CONFIGS", '{"64": {"split_heavy": true}}')
    cfg = _function._config(64, "fire")
    assert cfg["split_heavy"] is True and cfg["rcp_ex2"] is False               # env over the run's
    monkeypatch.delenv("MEGAFIRE_FUSED_CONFIGS")
    run_options({})
    assert _function._config(64, "fire") == committed


def test_run_options_under_the_interpreter_keep_its_tiles(run_options, monkeypatch):
    """Under Triton's interpreter the run's switches apply and its GPU tile shapes do not."""
    monkeypatch.setattr(_function, "_interp", lambda: True)
    run_options({"16": {"dq": [64, 64, 4, 1], "t5_diag": True, "ku": 3}})
    cfg = _function._config(16, "t5")
    assert cfg["dq"] == CONFIGS["interp"]["dq"] and cfg["t5_diag"] is True and cfg["ku"] == 3
    assert "t5_diag" not in CONFIGS["interp"]                                   # the entry itself untouched


def test_run_ku_reaches_the_launch(run_options, monkeypatch):
    """``ku`` from the run's options sets the unrolled blocks of T5 / FIRE (KU_DEFAULT otherwise);
    MEGAFIRE_FUSED_KU wins over both."""
    from fused_ref import build
    from megafire.attention.fused import fused_bias_attention
    from megafire.attention.fused import _kernels as K
    seen = []
    real = _function._state
    monkeypatch.setattr(_function, "_state", lambda *a, **kw: (lambda st: (seen.append(st.ku), st)[1])(real(*a, **kw)))
    monkeypatch.delenv("MEGAFIRE_FUSED_KU", raising=False)
    enc = build("fire", 2, 16, init_L=9.0)
    q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
    pos = torch.arange(12)
    for over in ({}, {"16": {"ku": 3}}):
        run_options(over)
        fused_bias_attention(q, k, v, enc, pos, pos)
    monkeypatch.setenv("MEGAFIRE_FUSED_KU", "4")
    fused_bias_attention(q, k, v, enc, pos, pos)
    assert seen == [K.KU_DEFAULT["fire"], 3, 4], seen


@pytest.mark.parametrize("value, message", [
    ({64: {"t5_dia": False}}, r"attention.fused_kernels\['64'\]: unknown key 't5_dia'; allowed: .*t5_diag"),
    ({48: {}}, r"attention.fused_kernels: head dim 48 is not one of 16, 32, 64, 128"),
    ({64: {"ku": 0}}, r"attention.fused_kernels\['64'\]\['ku'\] = 0: an integer >= 1"),
    ([64], r"config key 'attention.fused_kernels' must be a mapping"),
])
def test_bad_run_options_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"attention": {"fused_kernels": value}})


def test_run_options_from_yaml_and_the_command_line(tmp_path):
    """YAML's integer head dims and the dotted command-line override merge into string head dims
    with checked values; the run's saved config.yaml (safe YAML: launch configs as lists) loads
    back to the same options."""
    path = tmp_path / "arm.yaml"
    path.write_text("attention:\n  fused_kernels: {64: {t5_diag: 0, dq: [64, 64, 4, 2]}}\n")
    cfg = load_config(path, ["--attention.fused_kernels.64.split_heavy=false"])
    assert cfg.attention.fused_kernels == {"64": {"t5_diag": False, "dq": [64, 64, 4, 2], "split_heavy": False}}
    cfg.save(tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml").attention.fused_kernels == cfg.attention.fused_kernels
