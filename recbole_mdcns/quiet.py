"""Output that reads like a RecBole run: known-harmless third-party warnings filtered where they arise,
each by its exact message, category and module (any other warning, and every error, still surfaces),
and Lightning's own log lines handed to RecBole's logger.

(ray's ``pkg_resources`` ``UserWarning`` is filtered where ray is imported: :func:`recbole_mdcns.compat._guard_ray`.)
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

# (message regex, category, module regex); the message regex is matched at the start of the message.
DATASET_WARNINGS = (
    # RecBole's ``df[field].fillna(..., inplace=True)`` (dataset.py, _fill_nan): pandas < 3, which compat.py pins,
    # still fills in place; the warning announces pandas 3's copy-on-write, under which it would not.
    (r"A value is trying to be set on a copy of a DataFrame or Series through chained assignment using an "
     r"inplace method", FutureWarning, r"recbole\.data\.dataset\.dataset\Z"),
    # RecBole's token_seq split ``feat[field].agg(len)``: pandas < 3 still applies len element-wise, as RecBole means.
    (r"using <built-in function len> in Series\.agg cannot aggregate", FutureWarning,
     r"recbole\.data\.dataset\.dataset\Z"),
)
LIGHTNING_WARNINGS = (
    # Lightning's own batch-transfer helper builds torch's LeafSpec, deprecated by torch but still working;
    # it concerns Lightning's code, not the run.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"pytorch_lightning\.utilities\._pytree\Z"),
    # Intended: the LightningModule moves RecBole's Interaction batches to the device; the datamodule only batches.
    (r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
     UserWarning, r"pytorch_lightning\.trainer\.connectors\.data_connector\Z"),
    # resume_from: each run writes last.ckpt into its own new folder, so the checkpoint's folder differs; the callback
    # keeps only last.ckpt (filename "last", save_top_k=1) and has no best-k state to reload. Training state is
    # restored in full.
    (r"The dirpath has changed from ", UserWarning, r"pytorch_lightning\.callbacks\.model_checkpoint\Z"),
)
# A module that keeps frozen submodules in eval mode by design declares this in its ``harmless_warnings``.
FROZEN_IN_EVAL_MODE = (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning,
                       r"pytorch_lightning\.loops\.fit_loop\Z")
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")
# Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines advertise its cloud services.
ADVERT_PREFIX = "💡"


@contextlib.contextmanager
def ignoring(harmless) -> Iterator[None]:
    """Within the block, ignore exactly the ``(message, category, module)`` warnings of ``harmless``."""
    with warnings.catch_warnings():
        for message, category, module in harmless:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


def dataset_output():
    """Around RecBole's ``create_dataset`` / ``data_preparation``: pandas' FutureWarnings about RecBole's code."""
    return ignoring(DATASET_WARNINGS)


class _ToRootHandlers(logging.Handler):
    """Hands a record to the root logger's handlers -- RecBole's console and log file, at its ``state`` level
    (``init_logger``) -- instead of Lightning's own stream handler; drops Lightning's adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ADVERT_PREFIX)

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


@contextlib.contextmanager
def lightning_output(harmless=()) -> Iterator[None]:
    """Around building and fitting a ``pytorch_lightning.Trainer``: its log lines ("GPU available", "`Trainer.fit`
    stopped", "Initializing distributed", ...) through RecBole's logger, and its known-harmless warnings -- and
    ``harmless``, those the trained module declares -- ignored."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    handler = _ToRootHandlers()
    for logger in loggers:
        logger.handlers, logger.propagate = [handler], False
    try:
        with ignoring(LIGHTNING_WARNINGS + tuple(harmless)):
            yield
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate
