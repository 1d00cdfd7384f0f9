"""sparsezo: zeroth-order (forward-pass-only) sparse fine-tuning of language models over a 4-bit base.

The public API, importable from ``sparsezo`` itself::

    from sparsezo import DEMO, TrainableParams, accuracy, compute_mask, fine_tune, get_task, load_model

- models: :func:`load_model`, :func:`build_model` (base + mask + ``quant``, as every command builds it);
- masks: :func:`compute_mask`, :class:`Mask`, :func:`read_texts`, :func:`default_calibration_file`;
- tasks: :func:`get_task`, :data:`TASKS`;
- training: :func:`fine_tune`, :class:`TrainConfig`, :class:`ZOConfig`, :class:`TrainableParams`, the
  recipes :data:`TRAIN` and :data:`DEMO`, :func:`trajectory_meta`;
- evaluation: :func:`evaluate`, :func:`accuracy`;
- results: :class:`Delta`, :func:`load_delta`, :class:`Trajectory`, :func:`replay` (a delta from its seed
  trajectory), :func:`merge` (base + delta as a Hugging Face folder), :func:`export_gguf`, :func:`export_peft`.
"""

from importlib.metadata import PackageNotFoundError, version

from .assets import default_calibration_file
from .errors import SparseZOError
from .eval.evaluate import evaluate
from .eval.scoring import accuracy
from .export import EXPORTERS, export_gguf, export_peft
from .export.hf import save_merged
from .masks import RULES, Mask, compute_mask
from .masks.sensitive import read_texts
from .model.load import build_model, load_model
from .quant import QUANT_TYPES
from .quant.convert import quantize_model
from .tasks import TASKS, get_task
from .training.checkpoint import Delta, load_delta
from .training.config import TrainConfig, TrainResult
from .training.loop import fine_tune
from .training.recipe import DEMO, TRAIN, Recipe
from .training.replay import replayed_delta
from .training.rundir import trajectory_meta
from .zo import OPTIMIZERS, TrainableParams, Trajectory, ZOConfig

replay = replayed_delta  # the delta a run saved, rebuilt from its trajectory
merge = save_merged  # base + delta as a plain Hugging Face folder

try:
    __version__ = version("sparsezo")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = ["DEMO", "EXPORTERS", "OPTIMIZERS", "QUANT_TYPES", "RULES", "TASKS", "TRAIN", "Delta", "Mask", "Recipe",
           "SparseZOError", "TrainConfig", "TrainResult", "TrainableParams", "Trajectory", "ZOConfig", "__version__",
           "accuracy", "build_model", "compute_mask", "default_calibration_file", "evaluate", "export_gguf",
           "export_peft", "fine_tune", "get_task", "load_delta", "load_model", "merge", "quantize_model", "read_texts",
           "replay", "replayed_delta", "save_merged", "trajectory_meta"]
