"""Optional TensorBoard logging of a training run (``--tensorboard DIR``; needs ``pip install tensorboard``).

Scalars per optimizer step: ``train/loss``, ``train/lr``, ``train/examples_per_s``; per evaluation: ``eval/<metric>``
(accuracy, macro_f1, ...) at the step it happened. A resumed run drops the events its previous attempt wrote
after the checkpoint it resumes from (``purge_step``), so the curves do not double back.
"""

from __future__ import annotations

import importlib.util

from oztune.errors import OztuneError
from oztune.train.metrics import metric_values

INSTALL = "pip install tensorboard (or pip install 'oztune[tensorboard]')"


def check_available(option: str = "--tensorboard") -> None:
    """Raise a one-line OztuneError when the tensorboard package is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise OztuneError(f"{option} writes TensorBoard logs, which needs the tensorboard package: {INSTALL}")


class Board:
    """A TensorBoard event writer for one run.

    Args:
        log_dir: folder for the event files (created if missing).
        resume_step: for a resumed run (``--resume``), the optimizer steps already taken (0: none, the run
            starts over): events of earlier attempts after that step are dropped. None: a fresh run.
    """

    def __init__(self, log_dir: str, resume_step: int | None = None):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        try:
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir, purge_step=purge, flush_secs=10)
        except OSError as e:
            raise OztuneError(f"--tensorboard {log_dir}: cannot write there: {e}") from None

    def step(self, row: dict) -> None:
        """Log one optimizer step's row of the training log."""
        for key in ("loss", "lr", "examples_per_s"):
            self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def evaluation(self, entry: dict) -> None:
        """Log an evaluation's metrics (a history entry) at its step."""
        for key, value in metric_values(entry).items():
            if key != "train_loss":
                self.writer.add_scalar(f"eval/{key}", value, entry["step"])

    def close(self) -> None:
        self.writer.close()
