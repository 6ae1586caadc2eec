"""What a run leaves in its log folder: the loss CSV, TensorBoard events and the settings JSON.

Layout (A1111's): ``<log_directory>/<YYYY-MM-DD>/<name>/`` with ``hypernetwork_loss.csv``,
``tensorboard/``, ``settings-<date>-<time>.json``, ``hypernetworks/`` (copies) and ``images/``
(previews).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import time

from ..atomic import atomic_write_bytes
from ..errors import InvalidConfigError

CSV_NAME = "hypernetwork_loss.csv"
CSV_COLUMNS = ("step", "epoch", "epoch_step", "loss", "learn_rate", "validation_loss")


def log_folder(log_directory: str, name: str, when: datetime.date | None = None) -> str:
    when = when or datetime.date.today()
    return os.path.join(log_directory, when.strftime("%Y-%m-%d"), name)


class LossCsv:
    def __init__(self, folder: str, every: int):
        self.path = os.path.join(folder, CSV_NAME)
        self.every = every

    def write(self, step: int, epoch: int, epoch_step: int, loss: float, learn_rate: float, validation=None) -> None:
        if self.every <= 0 or step % self.every:
            return
        new = not os.path.exists(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(CSV_COLUMNS)
            writer.writerow(
                [step, epoch, epoch_step, f"{loss:.7f}", learn_rate, "" if validation is None else f"{validation:.7f}"]
            )


def tensorboard_writer_class():
    """torch's SummaryWriter, or a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:
        raise InvalidConfigError(
            f"TensorBoard logging needs the tensorboard package, which is not installed here ({exc}); "
            "install it (pip install tensorboard) or turn TensorBoard logging off"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, folder: str, *, flush_every: int, save_images: bool):
        writer_class = tensorboard_writer_class()
        self.writer = writer_class(log_dir=os.path.join(folder, "tensorboard"), flush_secs=max(1, flush_every))
        self.save_images = save_images

    def scalars(self, step: int, loss: float, learn_rate: float, validation: float | None) -> None:
        self.writer.add_scalar("Loss/train", loss, step)
        self.writer.add_scalar("Learn rate/train", learn_rate, step)
        if validation is not None:
            self.writer.add_scalar("Loss/validation", validation, step)

    def image(self, step: int, image) -> None:
        if not self.save_images or image is None:
            return
        import numpy as np

        array = np.asarray(image.convert("RGB"))
        self.writer.add_image(f"Preview at step {step}", array, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def write_settings(folder: str, settings: dict) -> str:
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
    path = os.path.join(folder, f"settings-{stamp}.json")
    atomic_write_bytes(path, json.dumps(settings, indent=2, default=str).encode(), overwrite=True)
    return path
