"""AutoDecay for the Transformers Trainer: ``Trainer(..., callbacks=[AutoDecayCallback()])``."""
from .callback import AutoDecayCallback, find_autodecay_callback

__all__ = ["AutoDecayCallback", "find_autodecay_callback"]
