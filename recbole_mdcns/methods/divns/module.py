"""DivNS's LightningModule (``neg_sampler: divns``): its options, their checks, the training step,
the epoch-end refresh, the checkpoint (the ablations and the negative-diversity
record: :mod:`recbole_mdcns.methods.divns`).

**On sequences** (``shared/design/divns.md``, "What happens on sequences"): ``D_u`` is per user,
but each row of a user has its own representation ``h``. Options, each off by default (the
paper's rule), all reading only row-level fields (``USER_ID``, ``POS_ITEM_ID``, ``CANDIDATES``)
and the scorer, so they hold under ``train_positions: all`` too:

* ``divns_diverse_pick``: ``uniform`` (paper) | ``top`` -- the item of ``D_u`` the row's ``h``
  scores highest | ``score`` -- drawn by ``softmax`` of those scores (:meth:`DivNSModule.pick_diverse`);
* ``divns_pairing``: ``independent`` (paper) | ``distinct`` -- the rows of one user in a batch
  take different items of ``D_u`` where possible (:func:`~.pairing.distinct_slots`);
* ``divns_cache_bound``: ``fixed`` (every user ``divns_cache_size`` / hard bound) | ``rows`` --
  ``|C_u| <= min(r n_u, divns_cache_size)``, ``|H_u| <= min(n_u, hard bound)`` for a user with
  ``n_u`` training rows per epoch, in memory that grows with the interactions
  (:meth:`DivNSModule.bound_by_rows`);
* ``divns_gamma: median`` -- the RBF bandwidth of each user's kernel from the median squared
  pairwise distance of its cached items (:func:`~.refresh.median_bandwidth`).

**Item representation** (kernel, ``q`` and the diversity statistics): the vectors the
scorer scores (``scorer.item_vectors``, e.g. FPMC's ``[IU, IL]``), else the model's
``item_embedding``, else the concatenation of every ``nn.Embedding`` with ``n_items`` rows;
always detached.

**Checkpoint.** The caches and diverse sets (:mod:`.cache`) are saved in the Lightning
checkpoint (``checkpoint["divns"]``) and restored on resume. The refresh draws from a generator
seeded by ``(seed, epoch)``, so a resumed run refreshes exactly as an uninterrupted one.

**DDP.** Ranks see different rows of the same user. Before the refresh every rank
``all_gather``s the caches and merges them per user (union, deduplicated, bounded),
then runs the same refresh with the same seed, so every rank holds the same, global
``D_u`` (and rank 0's checkpoint is complete). Used-negative counts are summed too.
The price is one gather of each cache per epoch and the refresh computed on every
rank rather than split among them.

"""
from __future__ import annotations

from logging import getLogger
from time import perf_counter

import torch
from recbole.config import Config
from recbole.data.interaction import Interaction

from recbole_mdcns.config import check_number, packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.diagnostics import item_representation
from recbole_mdcns.methods.dns import DNSModule
from recbole_mdcns.methods.divns.cache import DiverseSets, RunnerUpCache
from recbole_mdcns.methods.divns.pairing import (
    DIVERSE_PICKS, PAIRINGS, describe_synthesis, hard_and_runner_ups, pick_slots, pool_diverse, synthesize_scores,
)
from recbole_mdcns.methods.divns.refresh import DPP_MODES, KERNELS, refresh_diverse_sets
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.scoring import Scorer

CACHE_BOUNDS = ("fixed", "rows")
ABLATIONS = ("none", "no_cache", "no_dpp", "no_mix")


class DivNSModule(DNSModule):
    """``neg_sampler: divns`` (see :mod:`recbole_mdcns.methods.divns` and this module's docstring)."""

    user_state_why = "keeps a runner-up cache per user, filled from every row's pool"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: Config) -> None:
        super().__init__(model, optimizer, config)
        self.cache_ratio = config["divns_cache_ratio"]
        self.lam = float(config["divns_lambda"])
        self.kernel = config["divns_kernel"]
        self.gamma = config["divns_gamma"] if config["divns_gamma"] == "median" else float(config["divns_gamma"])
        self.alpha = float(config["divns_alpha"])
        self.dpp_mode = config["divns_dpp_mode"]
        self.chunk = config["divns_refresh_chunk"]
        self.refresh_every = config["divns_refresh_every"]
        self.pick = config["divns_diverse_pick"]
        self.pairing = config["divns_pairing"]
        self.cache_bound = config["divns_cache_bound"]
        self.ablation = config["divns_ablation"]
        self.refresh_mode = "uniform" if self.ablation == "no_dpp" else self.dpp_mode
        self.seed = config["seed"] or 0
        cache_size = config["divns_cache_size"]
        hard_size = config["divns_hard_size"] or max(1, cache_size // self.cache_ratio)
        self.cache = RunnerUpCache(cache_size)   # C_u
        self.hard = RunnerUpCache(hard_size)     # H_u
        self.diverse = DiverseSets.empty()       # D_u
        self.synthetic_rows = 0
        self.rows = 0
        self._synthesis_logged = False

    # ---- config

    @staticmethod
    def validate_config(config: Config) -> None:
        require_one(config, "neg_num", "divns",
                    "each row trains on one synthetic negative: DNS's top-1 mixed with a diverse item")
        require_one(config, "top_m", "divns", "its hard negative is the top-1")
        n = config["candidate_num"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"candidate_num must be an integer >= 2 for neg_sampler=divns "
                             f"(top-1 plus runner-ups), got {n!r}")
        check_number(config, "divns_cache_ratio", 1, n - 1, integer=True)
        check_number(config, "divns_lambda", 0.0, 1.0)
        if config["divns_gamma"] != "median":
            if isinstance(config["divns_gamma"], str):
                raise ValueError(f"divns_gamma must be a number > 0 or 'median', got {config['divns_gamma']!r}")
            check_number(config, "divns_gamma", 0.0, low_open=True)
        check_number(config, "divns_alpha", 0.0)
        check_number(config, "divns_cache_size", 1, integer=True)
        if config["divns_hard_size"] is not None:
            check_number(config, "divns_hard_size", 1, integer=True)
        check_number(config, "divns_refresh_chunk", 1, integer=True)
        check_number(config, "divns_refresh_every", 1, integer=True)
        for key, choices in (("divns_kernel", KERNELS), ("divns_dpp_mode", DPP_MODES),
                             ("divns_diverse_pick", DIVERSE_PICKS), ("divns_pairing", PAIRINGS),
                             ("divns_cache_bound", CACHE_BOUNDS), ("divns_ablation", ABLATIONS)):
            if config[key] not in choices:
                raise ValueError(f"{key} must be one of {list(choices)}, got {config[key]!r}")

    # ---- state on the module's device

    def _to_device(self) -> None:
        device = self.device
        if self.cache.device != device:
            self.cache.to(device)
            self.hard.to(device)
        if self.diverse.size.device != device:
            self.diverse = self.diverse.to(device)

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def on_fit_start(self) -> None:
        dataset = getattr(getattr(self.trainer.datamodule, "train_data", None), "_dataset", None)
        n_users = getattr(dataset, "user_num", 0)
        self._to_device()
        self.cache.ensure_users(n_users)
        self.hard.ensure_users(n_users)
        if self.cache_bound == "rows" and dataset is not None:
            self.bound_by_rows(torch.bincount(dataset.inter_feat[dataset.uid_field].long(), minlength=n_users))

    def bound_by_rows(self, rows_per_user: torch.Tensor) -> None:
        """``divns_cache_bound: rows``: user ``u`` with ``n_u`` training rows per epoch (RecBole's rows,
        also the targets of ``train_positions: all``) gets ``|C_u| <= min(r n_u, divns_cache_size)`` and
        ``|H_u| <= min(n_u, hard bound)``: room for every runner-up and hard negative of an epoch up
        to the caps, in memory that grows with the interactions (:class:`RunnerUpCache`)."""
        rows = rows_per_user.to(self.device)
        self.cache.set_capacities((self.cache_ratio * rows).clamp(1, self.cache.capacity))
        self.hard.set_capacities(rows.clamp(1, self.hard.capacity))
        if self._trainer is None or self.trainer.is_global_zero:
            slots = int(self.cache.cap.sum() + self.hard.cap.sum())
            getLogger().info(
                f"divns caches bounded by each user's training rows: C_u <= min({self.cache_ratio} n_u, "
                f"{self.cache.capacity}), H_u <= min(n_u, {self.hard.capacity}); {slots} id slots "
                f"({slots * 8 / 2**20:.1f} MiB; fixed bounds would take "
                f"{len(rows) * (self.cache.capacity + self.hard.capacity) * 8 / 2**20:.1f} MiB)")

    # ---- training

    def pick_diverse(self, users: torch.Tensor, batch: Interaction | None = None, h: torch.Tensor | None = None,
                     scorer: Scorer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A diverse item ``v_D`` of each row's ``D_u`` (``[B]`` ids, ``[B]`` bool has-one).

        ``divns_diverse_pick``: ``uniform`` (the paper's: any item of ``D_u``), ``top`` (the item
        of ``D_u`` the row's own representation ``h`` scores highest), ``score`` (drawn with
        probability ``softmax`` of those scores). ``divns_pairing: distinct`` gives the rows of a
        user in the batch different items of ``D_u`` where possible (:func:`~.pairing.distinct_slots`).
        """
        if not bool(self.diverse.size.any()):
            return torch.zeros_like(users), torch.zeros_like(users, dtype=torch.bool)
        size = self.diverse.sizes_of(users)
        has = size > 0
        if self.pick == "uniform" and self.pairing == "independent":
            pick = (torch.rand(len(users), device=users.device) * size).long().clamp(min=0)
            pick = torch.minimum(pick, (size - 1).clamp_min(0))
            ids, _ = self.diverse.rows(users)
            return ids.gather(1, pick.unsqueeze(1)).squeeze(1), has
        ids, valid = self.diverse.rows(users)
        scores = None
        if self.pick != "uniform":
            with torch.no_grad():
                scores = scorer.score(self.model, batch, h, ids)
        slot = pick_slots(users, valid, scores, self.pick, self.pairing)
        return ids.gather(1, slot.unsqueeze(1)).squeeze(1), has

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        self._to_device()
        model = self.model
        candidates, users = batch[CANDIDATES], batch[model.USER_ID].long()
        scorer = self.scorer_for("self", model, batch)
        if not self._synthesis_logged:
            self._synthesis_logged = True
            getLogger().info(f"divns: {type(model).__name__} via {scorer.path}; synthetic negative's score "
                             f"lam*s(v_H) + (1-lam)*s(v_D) is {describe_synthesis(scorer, 'negatives')}")
        h = scorer.encode(model, batch)
        with torch.no_grad():
            hard_pos, runner_pos = hard_and_runner_ups(scorer.score(model, batch, h, candidates), self.cache_ratio)
        hard = candidates.gather(1, hard_pos.unsqueeze(1)).squeeze(1)
        runners = candidates.gather(1, runner_pos)
        if self.ablation == "no_cache":
            diverse, has = pool_diverse(runners, hard)
        elif self.ablation == "no_mix":
            diverse, has = hard, torch.zeros_like(users, dtype=torch.bool)
        else:
            self.hard.add(users, hard)
            self.cache.add(users.unsqueeze(1).expand_as(runners),
                           torch.where(runners == hard.unsqueeze(1), 0, runners))
            diverse, has = self.pick_diverse(users, batch, h, scorer)
        self.rows += len(users)
        self.record_negatives(hard)
        positives = batch[model.POS_ITEM_ID].unsqueeze(1)
        if not bool(has.any()):  # plain DNS (epoch 0, or no user of this batch has a diverse set)
            scores = scorer.score(model, batch, h, torch.cat([positives, hard.unsqueeze(1)], 1))
            return self.loss_fn(scores[:, 0], scores[:, 1])
        self.synthetic_rows += int(has.sum())
        self.record_negatives(diverse[has])
        items = torch.cat([positives, hard.unsqueeze(1), torch.where(has, diverse, hard).unsqueeze(1)], 1)
        scores = scorer.score(model, batch, h, items)
        return self.loss_fn(scores[:, 0], synthesize_scores(scores[:, 1], scores[:, 2], self.lam, has))

    # ---- epoch end

    def on_train_epoch_end(self) -> None:
        """Refresh ``D_u`` every ``divns_refresh_every`` epochs (the caches keep filling in between, within
        their bounds); the epochs in between, and every epoch of the ablations without a cache
        (``no_cache``, ``no_mix``), only report their negatives."""
        epoch = self.current_epoch
        if self.ablation in ("no_cache", "no_mix"):
            record = self.negative_report(epoch)
            record["synthetic_row_fraction"] = self.synthetic_rows / max(self.rows, 1)
            self.synthetic_rows = self.rows = 0
            self.log_epoch(record, f"divns ({self.ablation}) epoch {epoch}: synthetic rows "
                                   f"{record['synthetic_row_fraction']:.1%}")
        elif (epoch + 1) % self.refresh_every == 0:
            self.refresh(epoch)
        else:
            super().on_train_epoch_end()

    def refresh(self, epoch: int) -> dict:
        """Epoch-end step: report the negatives used (:meth:`negative_report`), gather caches across
        ranks, draw every user's ``D_u``, clear ``C_u`` / ``H_u``. Returns the epoch's record (the
        last entry of ``negative_history``), extended with the refresh's figures."""
        started = perf_counter()
        self._to_device()
        stats = self.negative_report(epoch)
        emb = item_representation(self.model, self.scorers.get("self"))
        local_entries = int(self.cache.size.sum())
        if self._world_size() > 1:
            n_users = int(self.all_gather(torch.tensor(self.cache.n_users, device=self.device)).max())
            for cache in (self.cache, self.hard):
                cache.ensure_users(n_users)
                cache.merge(self.all_gather(cache.data), self.all_gather(cache.count))
        refresh_gen = torch.Generator(device=self.device).manual_seed(self._epoch_seed(epoch))
        self.diverse = refresh_diverse_sets(
            emb, self.cache, self.cache.size, self.hard, self.hard.size, self.kernel, self.gamma,
            self.alpha, self.refresh_mode, refresh_gen, self.chunk)
        sizes = self.diverse.size
        record = stats
        record.update({
            "synthetic_row_fraction": self.synthetic_rows / max(self.rows, 1),
            "cache_entries_local": local_entries,
            "cache_entries": int(self.cache.size.sum()),
            "diverse_users": int((sizes > 0).sum()),
            "diverse_mean_size": float(sizes[sizes > 0].float().mean()) if bool((sizes > 0).any()) else 0.0,
        })
        self.cache.clear()
        self.hard.clear()
        self.synthetic_rows = self.rows = 0
        record["refresh_seconds"] = perf_counter() - started
        self.log_epoch(record, f"divns epoch {epoch}: refresh {record['refresh_seconds']:.2f}s; D_u for "
                               f"{record['diverse_users']} users (mean k {record['diverse_mean_size']:.1f}); synthetic "
                               f"rows {record['synthetic_row_fraction']:.1%}")
        return record

    def _epoch_seed(self, epoch: int) -> int:
        return (int(self.seed) * 1_000_003 + epoch * 7919 + 17) % 2**62

    # ---- checkpoint

    def divns_state(self) -> dict:
        return {
            "cache": self.cache.state_dict(),
            "hard": self.hard.state_dict(),
            "diverse": self.diverse.state_dict(),
            "synthetic_rows": self.synthetic_rows,
            "rows": self.rows,
        }

    def load_divns_state(self, state: dict) -> None:
        self.cache.load_state_dict(state["cache"])
        self.hard.load_state_dict(state["hard"])
        self.diverse = DiverseSets.from_state(state["diverse"], self.cache.device)
        self.synthetic_rows, self.rows = state["synthetic_rows"], state["rows"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["divns"] = self.divns_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "divns" in checkpoint:
            self.load_divns_state(checkpoint["divns"])


register_sampler("divns", DivNSModule, config_file=packaged_yaml("divns"))
