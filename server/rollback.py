"""When training has diverged: the rule that triggers a rollback to the best version.

The rule watches the evaluation loss of each evaluated round (centralized when the
server has data, otherwise federated). It fires at once on a NaN or infinite loss, and
after ``patience`` evaluated rounds in a row whose loss exceeds the best version's by
more than ``tolerance`` (relative: 0.5 means 50% worse). Rounds without an evaluation
neither count nor reset the streak. ``patience = 0`` switches rollback off.

What a rollback does is the loop's business (restore the best version's model, reset the
server optimizer's momentum/moments, record the event); privacy spent is never rolled
back, and version numbers keep growing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class DivergenceRule:
    """The configured rule and its one piece of state, the current streak of bad rounds."""

    patience: int
    tolerance: float
    streak: int = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def observe(self, loss: float, best_loss: float) -> str | None:
        """Feed one evaluated round's loss; return why to roll back, or None."""
        if not self.enabled:
            return None
        if not math.isfinite(loss):
            self.streak = 0
            return f"evaluation loss is {loss}"
        limit = best_loss * (1 + self.tolerance)
        if math.isfinite(best_loss) and loss > limit:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.patience:
            streak, self.streak = self.streak, 0
            return (
                f"evaluation loss {loss:.4g} above {limit:.4g} (best {best_loss:.4g} + {self.tolerance:.0%}) "
                f"for {streak} evaluated round(s)"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state["streak"])
