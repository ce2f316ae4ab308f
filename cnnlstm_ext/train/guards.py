"""What keeps a run from going quietly wrong: the NaN/Inf guard and early stopping.

The existing run (docs/checkpoint_format.md) overfitted from epoch 33 and trained on NaN from epoch
600 with its weights poisoned, and nothing stopped it. Here:

- `NonFiniteGuard`: a step whose loss or gradient norm is NaN/Inf is skipped (the weights never
  see it) and counted; after `max_bad_steps` skips in a row the trainer rolls back to the last
  good checkpoint and lowers the learning rate; after `max_rollbacks` rollbacks it stops.
- `EarlyStopping`: stops when the monitored metric has not improved for `patience` epochs.
- `nonfinite_tensors`: weights (and optimizer moments) are checked before every save, so a
  checkpoint never holds NaN/Inf.
"""
import math
from typing import Dict, Optional

import torch

from ..checkpoint.verify import nonfinite_tensors  # noqa: F401  (the check, shared with verify)


class RollbackRequired(RuntimeError):
    """Raised inside an epoch when the guard wants the run rolled back to its last good state."""


class NonFiniteGuard:
    def __init__(self, max_bad_steps: int = 5, lr_factor: float = 0.5, max_rollbacks: int = 3):
        if max_bad_steps < 1:
            raise ValueError("max_bad_steps must be >= 1, got %d" % max_bad_steps)
        self.max_bad_steps = max_bad_steps
        self.lr_factor = lr_factor
        self.max_rollbacks = max_rollbacks
        self.consecutive = 0  # bad steps in a row
        self.skipped_total = 0
        self.skipped_epoch = 0
        self.rollbacks = 0

    @staticmethod
    def is_finite(*values) -> bool:
        return all(math.isfinite(float(v)) for v in values)

    def record(self, ok: bool) -> bool:
        """Counts one step; returns True when the run must roll back now."""
        if ok:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped_total += 1
        self.skipped_epoch += 1
        return self.consecutive >= self.max_bad_steps

    def start_epoch(self) -> None:
        self.skipped_epoch = 0

    def on_rollback(self) -> bool:
        """Counts a rollback; returns False when no rollback is left (the run must stop). A
        refused rollback is not counted: `rollbacks` is the number that happened."""
        self.consecutive = 0
        if self.rollbacks >= self.max_rollbacks:
            return False
        self.rollbacks += 1
        return True

    def state_dict(self) -> Dict[str, int]:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self.rollbacks = int(state.get("rollbacks", 0))


class EarlyStopping:
    """Tracks the best value of a metric; `should_stop` after `patience` epochs without improvement.

    mode "max" for accuracies, "min" for losses; an improvement must beat the best by more than
    `min_delta`. patience=None only tracks the best (never stops).
    """

    def __init__(self, monitor: str = "val_acc", patience: Optional[int] = 10,
                 min_delta: float = 0.0, mode: Optional[str] = None):
        self.monitor = monitor
        self.mode = mode or ("min" if monitor.endswith("loss") else "max")
        if self.mode not in ("min", "max"):
            raise ValueError("mode must be min or max, got %r" % self.mode)
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.bad_epochs = 0

    def improves(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Records an epoch's value; returns True when it is a new best."""
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = float(value), int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def reason(self) -> str:
        return ("%s has not improved for %d epochs (best %.4f at epoch %s)"
                % (self.monitor, self.bad_epochs, self.best if self.best is not None else float("nan"),
                   self.best_epoch))

    def state_dict(self) -> Dict[str, object]:
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state.get("monitor", self.monitor) != self.monitor:
            # A different metric now: its best has to be found again.
            return
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.bad_epochs = int(state.get("bad_epochs", 0))


def optimizer_tensors(optimizer: torch.optim.Optimizer):
    """(name, tensor) of every optimizer state tensor (the moments), for nonfinite_tensors."""
    for i, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield "optimizer.state[%d].%s" % (i, key), value
