"""AutoDecay: decay the learning rate when the training loss says a learning stage has ended."""
__all__ = ["AutoDecayLR", "Decision", "StageDetector", "StateError", "register"]
__version__ = "0.2.0"


def __getattr__(name):
    # Lazy: the timm hook imports this package at every interpreter start-up, and torch is imported
    # only when the PyTorch face is asked for (the detector stays framework-free).
    if name in ("Decision", "StageDetector", "StateError"):
        from . import detector

        return getattr(detector, name)
    if name == "AutoDecayLR":
        from .torch_scheduler import AutoDecayLR

        return AutoDecayLR
    if name == "register":  # for programs that build timm's scheduler without the start-up hook
        from .timm_factory import register

        return register
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
