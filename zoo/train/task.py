"""The task interface of `zoo.train.trainer`: what a task supplies to the one training loop.

A task is one `Task` subclass: its recipe schemas (`data` and `aug` keys and their types), its datasets, its
loss, its sharded evaluation, and optionally model arguments that depend on the data, class names to keep
with the weights, and a report after saving. `zoo.train.trainer.TASKS` maps a recipe's `task` to an instance.
"""
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


class Task:
    """Base class of the trainer's tasks; subclasses override `datasets`, `make_loss` and `evaluate`."""
    data_schema: Dict[str, tuple] = {}  # recipe `data` keys -> accepted types (see zoo.train.trainer.check_section)
    aug_schema: Dict[str, tuple] = {}  # recipe `aug` keys -> accepted types
    named_loss = False  # whether the recipe may choose the loss with a top-level `loss: <name>`
    best_metric: Tuple[str, str] = ('loss', 'min')  # the metric that picks the best checkpoint, and its direction
    separate_eval_split = True  # False when the evaluation set is the training set (a fitted video)

    def model_kwargs(self, recipe: Dict[str, Any], data: Optional[str] = None) -> Dict[str, Any]:
        """The model's constructor arguments: the recipe's, plus what the data decides (frame count...)."""
        return recipe['model_args']

    def datasets(self, recipe: Dict[str, Any], model: torch.nn.Module, data: Optional[str] = None,
                 output_dir: Optional[Path] = None) -> Tuple[Any, Any, Optional[Callable]]:
        """(training set, evaluation set, collate function or None)."""
        raise NotImplementedError

    def make_loss(self, recipe: Dict[str, Any], model: torch.nn.Module) -> Callable:
        """`loss_fn(model, batch) -> scalar tensor`."""
        raise NotImplementedError

    def evaluate(self, recipe: Dict[str, Any], model: torch.nn.Module, eval_set, accelerator) -> Dict[str, float]:
        """Metrics over `eval_set`, each sample evaluated once over all processes (shard, then
        `accelerator.gather_for_metrics`); every process gets the same numbers."""
        raise NotImplementedError

    def label_names(self, train_set) -> Optional[List[str]]:
        """Class names to store with the weights (timm's `label_names`), when the data has them."""
        return None

    def report(self, recipe: Dict[str, Any], folder: Path, eval_set, metrics: Dict[str, Any],
               output_dir: Path) -> Dict[str, Any]:
        """What to show (and write) once the Hub folder is saved; returns the metrics to keep."""
        return metrics


def eval_loader(eval_set, batch_size: int, accelerator, collate_fn: Optional[Callable] = None):
    """The evaluation set in order, sharded over the processes (the last batch padded by Accelerate and the
    padding dropped again by `gather_for_metrics`)."""
    return accelerator.prepare_data_loader(torch.utils.data.DataLoader(
        eval_set, batch_size=batch_size, collate_fn=collate_fn))
