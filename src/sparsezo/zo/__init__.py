"""Zeroth-order optimisation: noise, the trainable set, optimisers and the SPSA step."""

from .noise import sample, step_seed
from .registry import OPTIMIZERS
from .schedule import lr_at
from .spsa import StepRecord, ZOConfig, ZOEngine
from .trainable import TrainableParams
from .trajectory import Trajectory

__all__ = ["OPTIMIZERS", "StepRecord", "TrainableParams", "Trajectory", "ZOConfig", "ZOEngine", "lr_at", "sample", "step_seed"]
