"""What every face (PyTorch, timm, Transformers) shows of the detector it follows."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

class FollowsDetector:
    """What every adapter shows of its ``self.detector``: the stage, whether the run is over, and
    the transitions so far."""

    detector: Any  # a StageDetector

    @property
    def stage(self) -> int:
        return self.detector.stage

    @property
    def finished(self) -> bool:
        """True once the last learning stage (and its cooldown) has ended: training should stop."""
        return self.detector.finished

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.detector.history

    @property
    def best_eval(self) -> Optional[Dict[str, float]]:
        """The run's best evaluation result so far, ``{"value", "update"}`` (None before the first): the model
        to keep when the metric falls late in the run, as ``load_best_model_at_end`` keeps it."""
        return self.detector.best_eval
