"""Loss-spike detection by a robust z-score over a moving window of recent step losses.

A loss is a spike when ``(loss - median) / (1.4826 * MAD)`` exceeds the threshold, where median and MAD
(median absolute deviation; 1.4826 makes it a consistent estimator of the standard deviation for normal
data) are taken over the last ``window`` accepted losses. Median and MAD ignore a few outliers that a mean
and standard deviation would chase. Only upward deviations count, and spikes never enter the window.
The trainer answers a spike as PaLM did (Chowdhery et al., 2022): back to the last good checkpoint, and
the batches between it and the spike are skipped.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

MAD_TO_STD = 1.4826


@dataclass
class Verdict:
    spike: bool
    z: float
    median: float | None = None


class SpikeDetector:
    def __init__(self, window: int = 50, min_history: int = 20, z_threshold: float = 6.0) -> None:
        self.window = window
        self.min_history = min_history
        self.z_threshold = z_threshold
        self.history: deque[float] = deque(maxlen=window)

    def robust_z(self, loss: float) -> tuple[float, float]:
        median = statistics.median(self.history)
        mad = statistics.median(abs(x - median) for x in self.history)
        # A floor on the spread: a flat window (MAD 0) must not turn every wiggle into a spike.
        scale = max(MAD_TO_STD * mad, 1e-3 * abs(median), 1e-8)
        return (loss - median) / scale, median

    def check(self, loss: float) -> Verdict:
        """Judge ``loss`` without recording it."""
        if not math.isfinite(loss):
            return Verdict(spike=True, z=math.inf)
        if len(self.history) < self.min_history:
            return Verdict(spike=False, z=0.0)
        z, median = self.robust_z(loss)
        return Verdict(spike=z > self.z_threshold, z=z, median=median)

    def accept(self, loss: float) -> None:
        self.history.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
