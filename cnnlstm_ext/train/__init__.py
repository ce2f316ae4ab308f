"""Training: configuration, the Trainer, metrics, NaN guard and early stopping, DDP."""
from .config import Config, DataConfig, OptimConfig, TrainConfig
from .distributed import DistContext, init_distributed
from .guards import EarlyStopping, NonFiniteGuard
from .metrics import ClassificationMeter
from .trainer import Trainer, evaluate_model

__all__ = ["Config", "DataConfig", "OptimConfig", "TrainConfig", "Trainer", "evaluate_model",
           "ClassificationMeter", "EarlyStopping", "NonFiniteGuard", "DistContext",
           "init_distributed"]
