"""Training: the loop, optimizers and schedules, checkpoints, metrics, data parallelism, the recipe."""

from qlorakit.train.loop import LoopResult, LoopState, TrainingDivergedError, train_loop
from qlorakit.train.recipe import TrainOutcome, run_training

__all__ = ["LoopResult", "LoopState", "TrainOutcome", "TrainingDivergedError", "run_training", "train_loop"]
