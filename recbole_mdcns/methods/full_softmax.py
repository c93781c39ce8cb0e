"""``neg_sampler: full_softmax`` -- the cross-entropy of the target over the whole catalogue, no sampling.

RecBole's ``loss_type: CE`` for its sequential models, in this package's loop: every item scored from one
encoder pass (``h @ E.T``, the model's one-pass scorer, :meth:`~recbole_mdcns.scoring.Scorer.score_all`)
and ``-log softmax(s)[v+]``, mean over the rows. The padding id 0 is left out of the softmax: RecBole's
``calculate_loss`` keeps its logit, but its full-sort evaluation scores it ``-inf``, so it is never ranked;
with it masked the loss is RecBole's CE ``calculate_loss`` exactly (``tests/test_full_softmax.py``). Run
here it trains with ``train_positions: all`` (every target of a window from one pass), DDP, resume and
Lightning checkpoints like any sampler.

No candidate pool is drawn (``candidate_num: 0``: the loader attaches an empty ``[B, 0]`` pool and spends
no time drawing). Refused before any data is loaded, each error naming the key: ``candidate_num`` other
than 0, ``top_m`` or ``neg_num`` other than 1, ``candidate_distribution: popularity``, ``candidate_exclude:
row``, ``candidate_distinct: true`` (keys of a pool it does not draw), ``neg_loss`` other than ``softmax`` (its loss *is* the softmax over the catalogue; BPR or
BCE against every item is another loss, not RecBole's CE), and RecBole's general models (their own loss
terms -- LightGCN's regulariser, SGL's and NCL's contrastive terms -- run over (user, positive, negative)
triples, which a softmax over the catalogue does not have). At fit start a model whose scores need
``predict`` per item (no one-pass scorer, e.g. KSR) is refused too: ``n_items`` encoder passes per row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mdcns.config import packaged_yaml, require_one
from recbole_mdcns.diagnostics import negative_stats
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.scoring import PredictScorer

NAME = "full_softmax"
_VERIFY_ITEMS = 4  # catalogue items (spread over its ids) each row's scorer is checked on, beside its positive
_DIVERSITY_DRAWS = 4000  # negatives drawn from the epoch's counts for the mean pairwise cosine distance


class FullSoftmaxModule(NegativeSamplingModule):
    """``full_softmax``: cross-entropy of each row's target over every item but the padding id 0."""

    draws_pool = False
    general_models = False
    general_models_why = ("a general model's own loss terms (regulariser, contrastive terms) run over (user, positive, "
                          "negative) triples, which a softmax over the whole catalogue does not have")

    @staticmethod
    def validate_config(config) -> None:
        if config["candidate_num"] != 0:
            raise ValueError(f"candidate_num must be 0 for neg_sampler={NAME} (every item of the catalogue is in its "
                             f"softmax; no pool is drawn), got {config['candidate_num']!r}")
        why = "every item of the catalogue is in its softmax, none is picked"
        require_one(config, "top_m", NAME, why)
        require_one(config, "neg_num", NAME, why)
        for key, default in (("candidate_distribution", "uniform"), ("candidate_exclude", "user"),
                             ("candidate_distinct", False)):
            if config[key] != default:
                raise ValueError(f"{key} must be {default!r} (the default) for neg_sampler={NAME}: it draws no pool, "
                                 f"got {config[key]!r}")
        if config["neg_loss"] != "softmax":
            raise ValueError(f"neg_loss must be 'softmax' for neg_sampler={NAME} (its loss is the cross-entropy over the "
                             f"whole catalogue, RecBole's loss_type CE), got {config['neg_loss']!r}; for BPR or BCE "
                             "over sampled negatives use neg_sampler=uniform")

    def verification_items(self, model: torch.nn.Module, batch: Interaction) -> torch.Tensor:
        """Each row's positive and :data:`_VERIFY_ITEMS` items spread over the catalogue (there is no pool)."""
        positives = batch[model.POS_ITEM_ID]
        spread = torch.linspace(1, model.n_items - 1, _VERIFY_ITEMS, device=positives.device).long()
        return torch.cat([positives.unsqueeze(1), spread.expand(len(positives), -1)], 1)

    def prepare_scorers(self, probe: Interaction) -> None:
        """Choose and verify the scorer; ``ValueError`` for a model scored by ``predict`` per item."""
        super().prepare_scorers(probe)
        if isinstance(self.scorers["self"], PredictScorer):
            raise ValueError(f"neg_sampler={NAME} scores the whole catalogue in one encoder pass, but "
                             f"{type(self.model).__name__} is scored by predict() per item ({self.model.n_items} "
                             "encoder passes per row); use a sampler (e.g. neg_sampler=uniform) for it")

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        scorer = self.scorer_for("self", self.model, batch)
        positives = batch[self.model.POS_ITEM_ID]
        logits = scorer.score_all(self.model, batch, scorer.encode(self.model, batch))
        self.count_negatives(positives)
        return F.cross_entropy(logits[:, 1:], positives - 1)

    def count_negatives(self, positives: torch.Tensor) -> None:
        """This step's negatives: every item but the padding id and the row's own target, once per row."""
        if self.negative_counts.device != positives.device:
            self.negative_counts, self.ever_used = self.negative_counts.to(positives.device), self.ever_used.to(
                positives.device)
        self.negative_counts[1:] += len(positives)
        self.negative_counts.index_add_(0, positives, torch.full_like(positives, -1))

    def epoch_negative_stats(self, vectors: torch.Tensor, counts: torch.Tensor,
                             generator: torch.Generator) -> dict:
        """:func:`negative_stats` from the counts (rows x catalogue negatives an epoch are too many to list):
        the pairwise distance over :data:`_DIVERSITY_DRAWS` negatives drawn in proportion to the counts."""
        if int(counts.sum()) == 0:
            return super().epoch_negative_stats(vectors, counts, generator)
        drawn = torch.multinomial(counts.double(), _DIVERSITY_DRAWS, replacement=True, generator=generator)
        unique = int((counts[1:] > 0).sum())
        return {**negative_stats(vectors, drawn, generator=generator), "negatives": int(counts.sum()),
                "unique": unique, "catalogue_fraction": unique / max(len(counts) - 1, 1)}


register_sampler(NAME, FullSoftmaxModule, config_file=packaged_yaml(NAME))
