"""megafire: pretraining of length-generalizing language models (FIRE and its baselines)."""
__version__ = "0.1.0"


def load_checkpoint(path, **kwargs):
    """Load a run directory or checkpoint as a model in eval mode: ``model(input_ids) -> logits``."""
    from megafire.export.load import load_checkpoint as _load
    return _load(path, **kwargs)
