"""What ``run_recbole`` does not return, read off RecBole's own trainer hooks while a cell runs.

``recbole_mdcns.run_recbole`` returns RecBole's result dict only. Until it also
returns training information (see ``benchmarks/HARNESS.md``, "result keys"), the
harness wraps, for the duration of one cell and at class level:

* ``recbole.trainer.Trainer.__init__`` -- the final config (every default resolved) and the trainer;
* ``Trainer._generate_train_loss_output(epoch, start, end, loss)`` -- called once per
  training epoch by RecBole's ``fit`` and by recbole-mdcns' Lightning loop alike:
  epochs run and training seconds per epoch (validation excluded);
* ``Trainer._valid_epoch`` -- validation score per evaluated epoch (the self model
  only: calls made while ``trainer.model`` is another model, e.g. MDCNS' peer, are
  not counted) -> epoch of the best validation score, replayed through RecBole's
  ``early_stopping``;
* ``_neg_sampling`` of RecBole's training loaders and of recbole-mdcns'
  candidate loader -- seconds spent drawing negatives / candidate pools in the
  loader (RecBole's dynamic DNS also scores its candidates there; recbole-mdcns
  scores its pool in the training step, which this does not see);
* ``recbole.evaluator.Evaluator.evaluate`` -- each user's rank of the held-out item (1..max topk,
  0 below it) from RecBole's own ``rec.topk``: the self model's validation at its best epoch and
  the test, so claims can be bootstrapped over users (with one held-out item per user only);
* ``NegSamplingTrainer.build_module`` -- the LightningModule, whose
  ``negative_history`` (DivNS' negative-diversity records) and
  ``extra_valid_results`` (MDCNS' peer / ensemble validation) are copied if present.

Every field is ``None`` when its hook did not fire (a model with its own trainer,
a future refactor), so the harness never fails for want of it.
"""
from __future__ import annotations

from time import perf_counter


class TrainingProbe:
    def __init__(self) -> None:
        self.config = None
        self.trainer = None
        self.self_model = None
        self.module = None
        self.epochs: list[tuple[int, float]] = []        # (epoch, training seconds)
        self.valid: list[tuple[int, float, float]] = []  # (epoch, score, seconds)
        self.loader_sampling_s = 0.0
        self.loader_sampling_calls = 0
        self._sampling_depth = 0
        self._last_ranks: list[int] | None = None            # the latest evaluation's per-user ranks
        self._valid_depth = 0
        self._best_valid: tuple[float, int, list[int] | None] | None = None  # (score, epoch, ranks)
        self.test_ranks: list[int] | None = None
        self.row_users: dict[str, list[int]] = {}              # split -> each evaluated row's user, in rank order
        self._patches: list[tuple[type, str, object]] = []

    # -- patching ---------------------------------------------------------------------------
    def _patch(self, cls: type, name: str, make) -> None:
        if name not in cls.__dict__:
            return
        original = cls.__dict__[name]
        self._patches.append((cls, name, original))
        setattr(cls, name, make(original))

    def __enter__(self) -> "TrainingProbe":
        from recbole.data.dataloader import abstract_dataloader, general_dataloader
        from recbole.evaluator import Evaluator
        from recbole.trainer import Trainer

        probe = self

        def init(original):
            def wrapper(trainer, config, model, *args, **kwargs):
                original(trainer, config, model, *args, **kwargs)
                if probe.trainer is None:
                    probe.trainer, probe.config, probe.self_model = trainer, config, model
            return wrapper

        def train_output(original):
            def wrapper(trainer, epoch_idx, s_time, e_time, *args, **kwargs):
                if trainer is probe.trainer:
                    probe.epochs.append((int(epoch_idx), float(e_time - s_time)))
                return original(trainer, epoch_idx, s_time, e_time, *args, **kwargs)
            return wrapper

        def valid_epoch(original):
            def wrapper(trainer, *args, **kwargs):
                start = perf_counter()
                probe._valid_depth += 1
                try:
                    out = original(trainer, *args, **kwargs)
                finally:
                    probe._valid_depth -= 1
                if trainer is probe.trainer and trainer.model is probe.self_model:
                    epoch = probe.epochs[-1][0] if probe.epochs else len(probe.valid)
                    probe.valid.append((epoch, float(out[0]), perf_counter() - start))
                    probe._keep_if_best(epoch, float(out[0]))
                return out
            return wrapper

        def trainer_evaluate(original):
            def wrapper(trainer, *args, **kwargs):
                probe._last_ranks = None
                out = original(trainer, *args, **kwargs)
                if trainer is probe.trainer and trainer.model is probe.self_model:
                    split = "valid" if probe._valid_depth else "test"
                    probe._keep_row_users(split, args[0] if args else kwargs.get("eval_data"))
                    if split == "test":
                        probe.test_ranks = probe._last_ranks  # the run's last such call is its test
                return out
            return wrapper

        def evaluator_evaluate(original):
            def wrapper(evaluator, struct, *args, **kwargs):
                probe._last_ranks = held_out_ranks(struct)
                return original(evaluator, struct, *args, **kwargs)
            return wrapper

        def neg_sampling(original):
            def wrapper(loader, *args, **kwargs):
                if probe._sampling_depth:  # a subclass calling its parent's: count once
                    return original(loader, *args, **kwargs)
                probe._sampling_depth += 1
                start = perf_counter()
                try:
                    out = original(loader, *args, **kwargs)
                finally:
                    probe._sampling_depth -= 1
                if isinstance(loader, general_dataloader.TrainDataLoader):
                    probe.loader_sampling_s += perf_counter() - start
                    probe.loader_sampling_calls += 1
                return out
            return wrapper

        self._patch(Trainer, "__init__", init)
        self._patch(Trainer, "_generate_train_loss_output", train_output)
        self._patch(Trainer, "_valid_epoch", valid_epoch)
        self._patch(Trainer, "evaluate", trainer_evaluate)
        self._patch(Evaluator, "evaluate", evaluator_evaluate)
        loaders = [abstract_dataloader.NegSampleDataLoader, general_dataloader.TrainDataLoader]
        try:
            from recbole_mdcns import data as mdcns_data
            from recbole_mdcns import trainer as mdcns_trainer

            loaders.append(mdcns_data.CandidateTrainDataLoader)

            def build_module(original):
                def wrapper(trainer, *args, **kwargs):
                    module = original(trainer, *args, **kwargs)
                    if trainer is probe.trainer:
                        probe.module = module
                    return module
                return wrapper

            self._patch(mdcns_trainer.NegSamplingTrainer, "build_module", build_module)
        except (ImportError, AttributeError):
            pass
        for cls in loaders:
            self._patch(cls, "_neg_sampling", neg_sampling)
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, original in reversed(self._patches):
            setattr(cls, name, original)
        self._patches.clear()

    def _keep_if_best(self, epoch: int, score: float) -> None:
        """Keep this validation's per-user ranks while it is the best, by RecBole's ``early_stopping`` rule
        (ties go to the later), as :meth:`best_epoch` replays it."""
        from recbole.utils import early_stopping

        bigger = self._bigger()
        best = self._best_valid[0] if self._best_valid else (-float("inf") if bigger else float("inf"))
        if early_stopping(score, best, 0, max_step=10**9, bigger=bigger)[3]:
            self._best_valid = (score, epoch, self._last_ranks)

    def _bigger(self) -> bool:
        return bool(self.config["valid_metric_bigger"]) if self.config is not None else True

    def _keep_row_users(self, split: str, eval_data) -> None:
        """Each evaluated row's user, where a user has several rows (the authors' prefix rows): the
        bootstrap over users then resamples users with all their rows. Sequential full-sort loaders
        score the dataset's rows in order; other loaders (one row per user) need no grouping."""
        if split in self.row_users or self._last_ranks is None:
            return
        dataset = getattr(eval_data, "_dataset", None)
        if dataset is None or getattr(eval_data, "is_sequential", False) is False:
            return
        users = dataset.inter_feat[dataset.uid_field].tolist()
        if len(users) == len(self._last_ranks) and len(set(users)) < len(users):
            self.row_users[split] = users

    def user_ranks(self, best_epoch: int | None) -> dict | None:
        """Per-user ranks of the held-out item (RecBole's user order): the test, and the validation
        at ``best_epoch`` (``None`` when this process did not see that epoch, e.g. a resumed run)."""
        if self.test_ranks is None:
            return None
        best = self._best_valid
        valid = best[2] if best is not None and best[1] == best_epoch else None
        return {"top": max(self.config["topk"]) if self.config is not None else None,
                "valid": valid, "test": self.test_ranks,
                **{f"{split}_users": users for split, users in self.row_users.items()}}

    # -- results ----------------------------------------------------------------------------
    def best_epoch(self) -> int | None:
        """Epoch whose validation RecBole kept as best (its ``early_stopping`` rule, ties to the later)."""
        if not self.valid:
            return None
        from recbole.utils import early_stopping

        bigger = self._bigger()
        best, step, best_epoch = (-float("inf") if bigger else float("inf")), 0, None
        for epoch, score, _ in self.valid:
            best, step, _, update = early_stopping(score, best, step, max_step=10**9, bigger=bigger)
            if update:
                best_epoch = epoch
        return best_epoch

    def summary(self) -> dict:
        epoch_seconds = [seconds for _, seconds in self.epochs]
        train_s = sum(epoch_seconds) if epoch_seconds else None
        module = self.module
        return {
            "epochs": len(self.epochs) or None,
            "best_epoch": self.best_epoch(),
            "epoch_seconds": epoch_seconds or None,
            "train_seconds": train_s,
            "seconds_per_epoch": train_s / len(epoch_seconds) if epoch_seconds else None,
            "valid_seconds": sum(v[2] for v in self.valid) if self.valid else None,
            "valid_scores": [[e, s] for e, s, _ in self.valid] or None,
            "loader_sampling_seconds": self.loader_sampling_s if self.loader_sampling_calls else None,
            "loader_sampling_share": (self.loader_sampling_s / train_s
                                      if self.loader_sampling_calls and train_s else None),
            "negative_history": list(getattr(module, "negative_history", None) or []) or None,
            "extra_valid_results": list(getattr(module, "extra_valid_results", None) or []) or None,
            "device": str(self.config["device"]) if self.config is not None else None,
        }

    def final_config(self) -> dict | None:
        """Every key of the run's resolved RecBole config (JSON-safe)."""
        if self.config is None:
            return None
        from benchmarks.common import to_jsonable

        return to_jsonable(dict(self.config.final_config_dict))


def held_out_ranks(struct) -> list[int] | None:
    """Each user's rank (1-based) of its held-out item within the top ``max(topk)``, 0 below it, from
    RecBole's ``rec.topk`` (hit flags per position, then the user's number of held-out items);
    ``None`` unless every user has exactly one held-out item (then NDCG@k and Recall@k follow from it)."""
    if "rec.topk" not in struct:
        return None
    topk = struct.get("rec.topk")
    hits, positives = topk[:, :-1].bool(), topk[:, -1]
    if not bool((positives == 1).all()):
        return None
    first = hits.float().argmax(dim=1) + 1
    return (first * hits.any(dim=1)).tolist()
