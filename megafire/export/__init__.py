"""Hugging Face export and import, and loading checkpoints for evaluation.

* :func:`consolidated_state_dict` -- the one reader of training checkpoints (extend it for
  sharded layouts); :func:`export_checkpoint` / :func:`import_export` -- the two directions;
  :func:`load_checkpoint` -- a megafire model in eval mode, ``model(input_ids) -> logits``.
* CLI: ``megafire export`` (cli.py), ``megafire import`` (import_cli.py).

Imports are lazy so that ``megafire export --help`` does not pull in torch or megatron.
"""
from __future__ import annotations


def consolidated_state_dict(checkpoint_dir):
    from .checkpoint import consolidated_state_dict as f
    return f(checkpoint_dir)


def export_checkpoint(checkpoint, out_dir, **kwargs):
    from .export import export_checkpoint as f
    return f(checkpoint, out_dir, **kwargs)


def import_export(hf_dir, run_dir, **kwargs):
    from .importer import import_export as f
    return f(hf_dir, run_dir, **kwargs)


def load_checkpoint(path, **kwargs):
    from .load import load_checkpoint as f
    return f(path, **kwargs)


__all__ = ["consolidated_state_dict", "export_checkpoint", "import_export", "load_checkpoint"]
