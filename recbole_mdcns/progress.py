"""RecBole's training progress bar, drawn from Lightning's training loop."""
from __future__ import annotations

import math

import pytorch_lightning as pl
from recbole.utils import set_color
from tqdm import tqdm


class RecBoleProgressBar(pl.Callback):
    """One ``Train     N`` bar per epoch, as RecBole's ``Trainer._train_epoch`` draws it (tqdm, 100 columns,
    stderr), closed before the epoch's log lines; validation and test draw RecBole's own ``Evaluate`` bar.
    Added by :class:`~recbole_mdcns.trainer.NegSamplingTrainer` when ``show_progress`` is on (rank 0 only)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            total = trainer.num_training_batches
            self.bar = tqdm(total=None if math.isinf(total) else int(total), ncols=100,
                            desc=set_color(f"Train {trainer.current_epoch:>5}", "pink"))

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_epoch_end(trainer, module)
