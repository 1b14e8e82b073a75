"""Launch options of the fused kernels: the committed ``CONFIGS`` and the ``MEGAFIRE_FUSED_CONFIGS``
override (tuning, A/B runs on the device machine). A misspelt option must not be ignored: the A/B
would time the committed kernels twice and report no difference."""
from __future__ import annotations

import pytest

from megafire.attention.fused import CONFIGS, _function


def test_committed_configs_are_valid():
    """Every committed entry passes the same check as the override (launch tuples, flags, ints)."""
    for key, entry in CONFIGS.items():
        checked = _function.check_config(entry, f"CONFIGS[{key!r}]")
        assert checked.keys() == entry.keys(), key


@pytest.mark.parametrize("env, message", [
    ('{"64": {"rcp_ex": true}}', r"MEGAFIRE_FUSED_CONFIGS\['64'\]: unknown key 'rcp_ex'; allowed: .*rcp_ex2"),
    ('{"64": {"onepass": [64, 64, 4]}}', r"\['onepass'\] = \[64, 64, 4\]: a launch config is \[BM, BN, warps, "
                                         r"stages\].*, or false"),
    ('{"64": {"fwd": [60, 64, 4, 3]}}', r"\['fwd'\] = \[60, 64, 4, 3\]: .*powers of two"),
    ('{"64": {"defer": "yes"}}', r"\['defer'\] = 'yes': true / false"),
    ('{"64": {"onepass_min_n": -1}}', r"\['onepass_min_n'\] = -1: a non-negative integer"),
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
