"""RecBole Trainer subclass whose ``fit`` hands the loop to a PyTorch Lightning Trainer."""
from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections import OrderedDict
from time import time

import pytorch_lightning as pl
import recbole.trainer.trainer as recbole_trainer
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from recbole.evaluator import Collector
from recbole.trainer import Trainer
from recbole.utils import dict2str, early_stopping, set_color
from torch.utils.data import DataLoader, DistributedSampler

from recbole_mdcns.full_sequence import (
    WindowBatchSampler,
    WindowCollate,
    Windows,
    plan_positions,
    trim_batch,
    user_sequences,
)
from recbole_mdcns import eval_prefixes
from recbole_mdcns.general import epoch_start, graphs_kept, is_general
from recbole_mdcns.history_mask import HistoryScore
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.progress import RecBoleProgressBar
from recbole_mdcns.quiet import lightning_output
from recbole_mdcns.registry import get_sampler


def _unused_name(path: str) -> str:
    """``path``, or ``<stem>~N<ext>`` when a run of that name (file or Lightning folder) exists."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 1
    while os.path.exists(candidate) or os.path.exists(os.path.splitext(candidate)[0] + "-lightning"):
        candidate, n = f"{stem}~{n}{ext}", n + 1
    return candidate


class _NullWriter:
    """TensorBoard writer and W&B logger for ranks other than 0, which write and log nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _writers_on_rank_zero():
    """RecBole's trainer opens a TensorBoard writer and a W&B run (``log_wandb``) in ``__init__``:
    only on rank 0."""
    originals = recbole_trainer.get_tensorboard, recbole_trainer.WandbLogger
    if rank_zero_only.rank != 0:
        recbole_trainer.get_tensorboard = lambda logger: _NullWriter()
        recbole_trainer.WandbLogger = lambda config: _NullWriter()
    try:
        yield
    finally:
        recbole_trainer.get_tensorboard, recbole_trainer.WandbLogger = originals


class _Keys(torch.utils.data.Dataset):
    """A map-style dataset whose items are the sampler's keys (the collate function does the work)."""

    def __getitem__(self, key):
        return key


class RecBoleTrainData(pl.LightningDataModule):
    """RecBole's training data, batched per rank for Lightning.

    Prefix rows (``train_positions: last``): RecBole's loader re-batched by a Lightning-aware index
    sampler; batches still come from RecBole's ``collate_fn`` (dataset rows, transforms, candidate
    pools), trimmed to their longest sequence when that changes no model's output.
    All positions (``train_positions: all``): user windows packed up to ``train_batch_size``
    targets (:mod:`recbole_mdcns.full_sequence`). Which one runs is measured before the first
    batch, on a real prefix-row batch, for every model the module scores with.
    """

    def __init__(self, train_data, seed: int) -> None:
        super().__init__()
        self.train_data = train_data
        self.seed = seed
        self.index_sampler: DistributedSampler | WindowBatchSampler | None = None
        self.full_sequence = False
        self.targets_per_epoch = train_data.sample_size

    def train_dataloader(self) -> DataLoader:
        data, config = self.train_data, self.train_data.config
        world, rank = self.trainer.world_size, self.trainer.global_rank
        module = self.trainer.lightning_module
        probe = data.probe_batch()
        module.prepare_scorers(probe)
        if is_general(module.model):  # (user, item) rows: no sequence to lay out or trim
            self.full_sequence, trim = False, False
        else:
            self.full_sequence, trim = plan_positions(module, probe, config["train_positions"])
        if self.full_sequence:
            dataset = data._dataset
            seqs = user_sequences(dataset.inter_feat[dataset.uid_field], dataset.inter_feat[dataset.iid_field],
                                  dataset.inter_feat[module.model.ITEM_SEQ], dataset.inter_feat[module.model.ITEM_SEQ_LEN])
            L = config["MAX_ITEM_LIST_LENGTH"]
            windows = Windows.build(seqs, L, config["train_window_stride"] or max(1, L // 2))
            self.targets_per_epoch = int(windows.targets.sum())
            self.index_sampler = WindowBatchSampler(windows.targets, config["train_batch_size"], data.shuffle,
                                                    self.seed, world, rank)
            return DataLoader(_Keys(), sampler=self.index_sampler, batch_size=None,
                              collate_fn=WindowCollate(windows, data, world), num_workers=config["worker"])
        indices = range(data.sample_size)
        self.index_sampler = DistributedSampler(indices, num_replicas=world, rank=rank, shuffle=data.shuffle,
                                                seed=self.seed)
        collate = data.collate_fn
        if trim:
            seq_field, len_field = module.model.ITEM_SEQ, module.model.ITEM_SEQ_LEN
            collate = functools.partial(_trimmed, data.collate_fn, seq_field, len_field)
        return DataLoader(indices, batch_size=max(1, data.step // world), sampler=self.index_sampler,
                          collate_fn=collate, num_workers=config["worker"])


def _trimmed(collate, seq_field: str, len_field: str, index):
    return trim_batch(collate(index), seq_field, len_field)


class RecBoleEpochEnd(pl.Callback):
    """RecBole's per-epoch bookkeeping as Lightning hooks: per-epoch reseeding, RecBole's
    log lines, TensorBoard scalars and W&B curves (``log_wandb``: ``train/train_loss`` per
    epoch, ``valid/<metric>`` per validation), full-sort validation every ``eval_step``
    epochs, RecBole's early stopping on ``valid_metric`` / ``stopping_step``, and the best
    model saved in RecBole's format."""

    def __init__(self, trainer: "NegSamplingTrainer", train_data, valid_data, verbose: bool,
                 saved: bool, callback_fn=None, show_progress: bool = False) -> None:
        self.rb = trainer
        self.train_data, self.valid_data = train_data, valid_data
        self.verbose, self.saved, self.callback_fn = verbose, saved, callback_fn
        self.show_progress = show_progress
        self.started = 0.0

    def _epoch_seed(self, trainer: pl.Trainer) -> int:
        return (self.rb.config["seed"] * 1_000_003 + trainer.current_epoch * 1009 + trainer.global_rank) % 2**62

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Each epoch's randomness depends on (seed, epoch, rank) only, so a resumed run draws
        # the same batches, candidates, negatives and dropout masks as an uninterrupted one.
        self.train_data._sampler.reseed(self._epoch_seed(trainer) + 1)
        trainer.datamodule.index_sampler.set_epoch(trainer.current_epoch)  # also right after a resume
        for model in module.scored_models().values():
            if is_general(model) and any(p.requires_grad for p in model.parameters()):
                epoch_start(model, trainer.current_epoch, self._epoch_seed(trainer) + 2, self.rb.config["m_step"])
        self.started = time()

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 0:  # after Lightning has built this epoch's iterator, which draws from the global RNG
            torch.manual_seed(self._epoch_seed(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, module: NegativeSamplingModule) -> None:
        rb, epoch = self.rb, trainer.current_epoch
        loss = module.pop_epoch_loss()
        rb.train_loss_dict[epoch] = loss
        rb.epoch_seconds[epoch] = time() - self.started
        if self.verbose:
            rb.logger.info(rb._generate_train_loss_output(epoch, self.started, time(), loss))
        rb._add_train_loss_to_tensorboard(epoch, loss)
        parts = {f"train_loss{i + 1}": part for i, part in enumerate(loss)} if isinstance(loss, tuple) else {}
        total = sum(loss) if isinstance(loss, tuple) else loss
        rb.wandblogger.log_metrics({"epoch": epoch, "train_loss": total, **parts, "train_step": epoch}, head="train")
        if rb.eval_step <= 0 or not self.valid_data:
            if self.saved and trainer.is_global_zero:
                rb._save_checkpoint(epoch, verbose=self.verbose)
            return
        if (epoch + 1) % rb.eval_step:
            return
        valid_start = time()
        score, result = rb._valid_epoch(self.valid_data, show_progress=self.show_progress)
        rb.valid_scores[epoch] = (float(score), time() - valid_start)
        rb.best_valid_score, rb.cur_step, stop, update = early_stopping(
            score, rb.best_valid_score, rb.cur_step, max_step=rb.stopping_step, bigger=rb.valid_metric_bigger
        )
        if self.verbose:
            rb.logger.info(
                (set_color("epoch %d evaluating", "green") + " [" + set_color("time", "blue") + ": %.2fs, "
                 + set_color("valid_score", "blue") + ": %f]") % (epoch, time() - valid_start, score)
            )
            rb.logger.info(set_color("valid result", "blue") + ": \n" + dict2str(result))
        rb.tensorboard.add_scalar("Vaild_score", score, epoch)
        rb.wandblogger.log_metrics({**result, "valid_step": (epoch + 1) // rb.eval_step - 1}, head="valid")
        module.log("valid_score", score, prog_bar=True)
        module.after_validation(rb, self.valid_data)
        with graphs_kept(module):  # back to train mode; SGL redraws its graphs at the next epoch's start
            module.train()
        if update:
            if self.saved and trainer.is_global_zero:
                rb._save_checkpoint(epoch, verbose=self.verbose)
            rb.best_valid_result = result
            rb.best_epoch = epoch
        if self.callback_fn:
            self.callback_fn(epoch, score)
        if stop:
            if self.verbose:
                rb.logger.info("Finished training, best eval result in epoch %d" % (epoch - rb.cur_step * rb.eval_step))
            trainer.should_stop = True

    def state_dict(self) -> dict:
        """Plain Python values only, so the checkpoint loads with ``weights_only=True``."""
        rb = self.rb
        result = None if rb.best_valid_result is None else {k: float(v) for k, v in rb.best_valid_result.items()}
        return {"best_valid_score": float(rb.best_valid_score), "cur_step": rb.cur_step,
                "best_valid_result": result, "train_loss_dict": dict(rb.train_loss_dict),
                "saved_model_file": rb.saved_model_file, "epoch_seconds": dict(rb.epoch_seconds),
                "valid_scores": dict(rb.valid_scores), "best_epoch": rb.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self.rb, key, value)
        resumed = self.rb.config["resume_from"]
        if not os.path.exists(self.rb.saved_model_file) and resumed:
            # the run's folder was moved (e.g. parked and restored on another machine): its best model is still
            # the file of that name beside the checkpoint's folder
            self.rb.saved_model_file = best_model_beside(os.path.dirname(os.path.abspath(resumed)),
                                                         self.rb.saved_model_file)
        if self.rb.best_valid_result is not None:
            self.rb.best_valid_result = OrderedDict(self.rb.best_valid_result)


def best_model_beside(lightning_dir: str, saved_model_file: str) -> str:
    """The best-model file of the run whose ``last.ckpt`` folder is ``lightning_dir``, wherever the run's folders
    were moved: the file the run named ``saved_model_file`` (as its checkpoint records it), in the folder above
    ``lightning_dir``. A run names ``lightning_dir`` after its best-model file, but a resumed run writes its
    ``last.ckpt`` into a folder named after its own start while it goes on saving the first attempt's file."""
    return os.path.join(os.path.dirname(lightning_dir), os.path.basename(saved_model_file))


def best_model_of(checkpoint: str) -> str:
    """:func:`best_model_beside` for a ``last.ckpt``, from the best-model file its epoch-end state records."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    recorded = state.get("callbacks", {}).get(RecBoleEpochEnd.__name__, {}).get("saved_model_file")
    if recorded is None:
        raise ValueError(f"{checkpoint}: records no best-model file (not a checkpoint of this package's trainer)")
    return best_model_beside(os.path.dirname(os.path.abspath(checkpoint)), recorded)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GatheringCollector(Collector):
    """RecBole's ``Collector``; while :attr:`sharded`, each process holds the per-row results (top-k
    positions, ranks, scores) of its contiguous block of RecBole's evaluation batches, and
    :meth:`get_data_struct` concatenates every process's rows in process order -- RecBole's batch,
    i.e. user, order -- so RecBole's evaluator computes the metrics of the whole set on every process."""

    ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label")  # reset by RecBole per evaluation

    def __init__(self, config) -> None:
        super().__init__(config)
        self.sharded = False

    def get_data_struct(self):
        struct = super().get_data_struct()
        if self.sharded:
            parts: list[dict | None] = [None] * _world_size()
            dist.all_gather_object(parts, {key: struct[key] for key in self.ROW_KEYS if key in struct})
            for key in dict.fromkeys(key for part in parts for key in part):
                struct[key] = torch.cat([part[key] for part in parts if key in part])
        return struct


class NegSamplingTrainer(HistoryScore, Trainer):
    """RecBole's ``Trainer`` for ``neg_sampler`` runs: ``fit`` runs on Lightning,
    ``evaluate`` is RecBole's full-sort evaluation of the (self) model, sharded across DDP processes."""

    def __init__(self, config, model) -> None:
        # RecBole's ensure_dir checks, then creates: two DDP processes racing there fail
        os.makedirs(config["checkpoint_dir"], exist_ok=True)
        with _writers_on_rank_zero():
            super().__init__(config, model)
        self.eval_collector = GatheringCollector(config)
        self.saved_model_file = _unused_name(self.saved_model_file)
        self.lightning_dir = os.path.splitext(self.saved_model_file)[0] + "-lightning"
        self.lightning_trainer: pl.Trainer | None = None
        self.module: NegativeSamplingModule | None = None
        self.epoch_seconds: dict[int, float] = {}
        self.valid_scores: dict[int, tuple[float, float]] = {}  # epoch -> (validation score, seconds)
        self.best_epoch: int | None = None
        self.datamodule: RecBoleTrainData | None = None
        self.shared_prefixes = eval_prefixes.SharedPrefixes() if config[eval_prefixes.KEY] else None

    def build_module(self) -> NegativeSamplingModule:
        return get_sampler(self.config["neg_sampler"]).cls(self.model, self.optimizer, self.config)

    def _lightning_trainer(self, callbacks: list[pl.Callback]) -> pl.Trainer:
        config = self.config
        clip = config["clip_grad_norm"] or {}
        return pl.Trainer(
            max_epochs=self.epochs,
            accelerator=config["accelerator"],
            devices=config["devices"],
            strategy=config["strategy"],
            num_nodes=config["num_nodes"],
            precision=config["precision"],
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=False,  # RecBoleProgressBar draws RecBole's bar
            enable_model_summary=False,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            gradient_clip_val=clip.get("max_norm"),
            default_root_dir=self.checkpoint_dir,
        )

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.eval_collector.data_collect(train_data)
        module = self.module = self.build_module()
        callbacks: list[pl.Callback] = [RecBoleProgressBar()] if show_progress else []  # closed before the log lines
        callbacks.append(RecBoleEpochEnd(self, train_data, valid_data, verbose, saved, callback_fn, show_progress))
        if saved:
            # last.ckpt rewritten at every epoch's end, for ``resume_from`` after a killed run. (save_last=True with
            # save_top_k=0 writes it only when training ends: Lightning copies "last" only after a top-k save.)
            callbacks.append(ModelCheckpoint(dirpath=self.lightning_dir, filename="last", save_top_k=1))
        self.datamodule = RecBoleTrainData(train_data, self.config["seed"])
        with lightning_output(module.harmless_warnings):  # log lines through RecBole's logger, harmless warnings ignored
            lit = self.lightning_trainer = self._lightning_trainer(callbacks)
            lit.fit(module, datamodule=self.datamodule, ckpt_path=self.config["resume_from"])
        module.to(self.device)  # Lightning's teardown leaves the model on the CPU; evaluate where we trained
        self.saved_model_file = lit.strategy.broadcast(self.saved_model_file, src=0)
        if lit.is_global_zero:
            self._add_hparam_to_tensorboard(self.best_valid_score)
        return self.best_valid_score, self.best_valid_result

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's ``evaluate``. Under DDP (a process group with more processes than 1 and at least as many
        batches as processes) each process scores a contiguous block of RecBole's own evaluation batches,
        the per-user results are gathered in user order (no padding, no user twice) and RecBole's evaluator
        runs on all of them in every process: the metrics equal one process's, and every process gets them
        (validation, early stopping and MDCNS's peer / ensemble validation stay in step)."""
        shared = self.shared_prefixes.applied(self.model) if self.shared_prefixes else contextlib.nullcontext()
        with shared:
            return self._evaluate(eval_data, load_best_model, model_file, show_progress)

    def _evaluate(self, eval_data, load_best_model, model_file, show_progress):
        world = _world_size()
        if world == 1 or not eval_data or len(eval_data) < world:
            return super().evaluate(eval_data, load_best_model, model_file, show_progress)
        batches, rank = list(eval_data.batch_sampler), dist.get_rank()
        mine = batches[len(batches) * rank // world:len(batches) * (rank + 1) // world]
        shard = copy.copy(eval_data)  # RecBole's loader over this process's batches only
        object.__setattr__(shard, "batch_sampler", mine)  # DataLoader refuses a plain assignment after __init__
        self.eval_collector.sharded = True
        try:
            return super().evaluate(shard, load_best_model, model_file, show_progress)
        finally:
            self.eval_collector.sharded = False

    def train_info(self, train_data) -> dict:
        """What a run cost and what it trained on, beyond RecBole's result dict (for benchmarks)."""
        return {
            "epochs": len(self.epoch_seconds),
            "best_epoch": self.best_epoch,
            "epoch_seconds": [self.epoch_seconds[e] for e in sorted(self.epoch_seconds)],
            # every validation of the run, those before a resume included: [epoch, score], and their seconds
            "valid_scores": [[e, self.valid_scores[e][0]] for e in sorted(self.valid_scores)],
            "valid_seconds": sum(seconds for _, seconds in self.valid_scores.values()),
            "sampling_seconds": train_data.sampling_seconds,
            "negative_history": list(self.module.negative_history) if self.module else [],
            # MDCNS: the peer's and the self+peer ensemble's validation results, per validated epoch
            "extra_valid_results": list(getattr(self.module, "extra_valid_results", [])),
            "device": str(self.device),
            "train_positions": "all" if self.datamodule and self.datamodule.full_sequence else "last",
            "targets_per_epoch": self.datamodule.targets_per_epoch if self.datamodule else None,
        }
