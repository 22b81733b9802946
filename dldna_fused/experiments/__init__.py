"""The chapter's optimizer-comparison experiments: datasets, models, the training loop with its
checkpoints, the experiment runners and their plots. ``dldna-fused compare`` runs them from the
command line."""

from dldna_fused.experiments.checkpoints import (CheckpointError, CheckpointFormatError, IncompatibleCheckpointError,
                                                 UnreadableCheckpointError, UnsafeCheckpointError)
from dldna_fused.experiments.data import get_data_loaders, get_dataset, get_device
from dldna_fused.experiments.models import SimpleNetwork, SmallCNN, SmallViT
from dldna_fused.experiments.plots import plot_training_results
from dldna_fused.experiments.runner import OPTIMIZERS, run_advanced_experiment, run_basic_experiment
from dldna_fused.experiments.training import evaluate, load_model, load_models_by_pattern, train_model

__all__ = [
    "CheckpointError", "CheckpointFormatError", "IncompatibleCheckpointError", "UnreadableCheckpointError",
    "UnsafeCheckpointError", "OPTIMIZERS", "SimpleNetwork", "SmallCNN", "SmallViT", "evaluate", "get_data_loaders", "get_dataset",
    "get_device", "load_model", "load_models_by_pattern", "plot_training_results", "run_advanced_experiment",
    "run_basic_experiment", "train_model",
]
