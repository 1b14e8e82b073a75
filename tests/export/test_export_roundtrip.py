"""export -> import is bit-exact; the CLIs; loading exports; imports from config.json alone."""
from __future__ import annotations

import json

import pytest
import torch

from export_testlib import EVAL_LENGTH, relative_diff, tiny_config, write_checkpoint


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case,dtype", [("fire", torch.float32), ("fire", torch.bfloat16), ("t5", torch.bfloat16),
                                        ("rope_yarn", torch.float32), ("learned", torch.float32),
                                        ("fire_untied_bias_mha", torch.float32)])
def test_export_import_is_bit_exact(case, dtype, tmp_path, tokenizer_dir):
    from megafire.cli import main
    from megafire.export import consolidated_state_dict
    run = write_checkpoint(tiny_config(case, tmp_path / "run", tokenizer_dir), dtype=dtype, step=5)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    cfg_a, a = consolidated_state_dict(run)
    cfg_b, b = consolidated_state_dict(tmp_path / "back")
    assert_same_state(a, b)
    assert cfg_a.model == cfg_b.model and cfg_b.run.dir == str(tmp_path / "back")
    ckpt = tmp_path / "back" / "checkpoints" / "step_00000005"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["precision"] == ("bf16" if dtype == torch.bfloat16 else "fp32") and meta["step"] == 5
    assert (ckpt / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    # exporting the import again gives the same files' content
    assert main(["export", "--checkpoint", str(tmp_path / "back"), "--out", str(tmp_path / "hf2")]) == 0
    from safetensors.torch import load_file
    assert_same_state(load_file(str(tmp_path / "hf" / "model.safetensors")),
                      load_file(str(tmp_path / "hf2" / "model.safetensors")))
    assert (tmp_path / "hf" / "config.json").read_text() == (tmp_path / "hf2" / "config.json").read_text()


@torch.no_grad()
def test_load_checkpoint_reads_run_step_dir_and_export(tmp_path, tokenizer_dir):
    import megafire
    from megafire.export import export_checkpoint
    run = write_checkpoint(tiny_config("kerple_log", tmp_path / "run", tokenizer_dir))
    hf_dir = export_checkpoint(run, tmp_path / "hf")
    x = torch.randint(4, 300, (3, EVAL_LENGTH))
    models = [megafire.load_checkpoint(p) for p in (run, run / "checkpoints" / "step_00000003", hf_dir)]
    for model in models:
        assert not model.training and model.tokenizer is not None
        logits = model(x)
        assert logits.shape == (3, EVAL_LENGTH, 384)
        assert torch.equal(logits, models[0](x))
    # explicit positions: the default is arange(T)
    assert torch.equal(models[0](x, torch.arange(EVAL_LENGTH)), models[0](x))


def test_llama_export_without_megafire_files_imports_from_config_json(tmp_path, tokenizer_dir):
    """A plain Llama directory (no megafire_config.yaml / megafire_export.json) still imports."""
    import megafire
    from megafire.export import consolidated_state_dict, export_checkpoint, import_export
    run = write_checkpoint(tiny_config("rope_dynamic", tmp_path / "run", tokenizer_dir))
    hf_dir = export_checkpoint(run, tmp_path / "hf")
    (hf_dir / "megafire_config.yaml").unlink()
    (hf_dir / "megafire_export.json").unlink()
    import_export(hf_dir, tmp_path / "back")
    cfg_a, a = consolidated_state_dict(run)
    cfg_b, b = consolidated_state_dict(tmp_path / "back")
    assert_same_state(a, b)
    assert cfg_b.model.position.options == {"base": 10000.0, "scaling": "dynamic", "factor": 2.0,
                                            "original_max_positions": 16}
    x = torch.randint(4, 300, (1, EVAL_LENGTH))
    assert relative_diff(megafire.load_checkpoint(tmp_path / "back")(x), megafire.load_checkpoint(run)(x)) == 0


def test_llama_config_for_both_transformers_generations(tmp_path, tokenizer_dir):
    """rope_parameters for transformers 5, rope_scaling + rope_theta for 4.x readers."""
    from megafire.export import export_checkpoint
    from transformers import AutoConfig
    run = write_checkpoint(tiny_config("rope_yarn", tmp_path / "run", tokenizer_dir))
    cfg = json.loads((export_checkpoint(run, tmp_path / "hf") / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / "hf" / "modeling_megafire.py").exists()
    assert cfg["rope_scaling"]["type"] == cfg["rope_scaling"]["rope_type"] == "yarn"
    assert cfg["rope_scaling"]["factor"] == 4.0 and cfg["rope_scaling"]["original_max_position_embeddings"] == 16
    assert cfg["rope_theta"] == 10000.0 and cfg["max_position_embeddings"] == 64
    loaded = AutoConfig.from_pretrained(tmp_path / "hf")
    assert loaded.rope_parameters["rope_type"] == "yarn" and loaded.rope_parameters["rope_theta"] == 10000.0


def test_import_refuses_to_overwrite(tmp_path, tokenizer_dir):
    from megafire.cli import main
    from megafire.export import export_checkpoint
    run = write_checkpoint(tiny_config("nope", tmp_path / "run", tokenizer_dir))
    export_checkpoint(run, tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(run)]) == 2
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 2   # non-empty out
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--overwrite"]) == 0
