"""DivNS: diversity-augmented negative sampling (arXiv 2508.14468) for RecBole's sequential models
and its dot-product general models.

Per training row of user ``u`` (see ``shared/design/divns.md``):

1. the ``candidate_num`` pool is scored with one encoder pass; its top-1 is the
   hard negative ``v_H`` (DNS), recorded by item id in the user's hard set ``H_u``
   (bounded at ``divns_hard_size``, default ``divns_cache_size // r`` so that
   ``|C_u| ~ r |H_u|`` as in the paper even when the bounds bind; set
   ``divns_hard_size`` for a bound, hence a cap on ``k``, that does not move with ``r``);
2. ranks ``2..r+1`` (``r = divns_cache_ratio``) go into the user's runner-up cache
   ``C_u``, by item id, deduplicated, bounded at ``divns_cache_size`` per user;
3. from epoch 1 on, a diverse item ``v_D`` is drawn uniformly from the user's
   diverse set ``D_u`` (built at the previous epoch end) and the row trains on the
   synthetic negative ``e_syn = lam e_H + (1 - lam) e_D`` (``lam = divns_lambda``)
   against its positive under ``neg_loss`` (bpr | bce). Rows of users with an empty ``D_u``
   (all rows of epoch 0) use ``v_H`` alone: plain DNS.

At each epoch end every user's ``D_u`` is redrawn from ``C_u`` by a k-DPP, then ``C_u`` and
``H_u`` are cleared.

**Ablations** (``divns_ablation``, for sequential and general models alike; every other key kept, so an
ablation cell differs from its DivNS cell in this key alone):

* ``none`` -- DivNS;
* ``no_cache`` -- no runner-up cache, hard set, ``D_u`` or refresh: each row's diverse item is drawn
  uniformly from its own pool's ranks 2..r+1 of this step (:func:`.pairing.pool_diverse`), from
  epoch 0 on (the k-DPP, which samples from the cache, goes with it);
* ``no_dpp`` -- ``D_u`` a uniform draw of ``k = min(|H_u|, |C_u|)`` items of the cache instead of the
  k-DPP (:func:`~.refresh.uniform_subsets`; ``divns_dpp_mode`` and the kernel keys are not read);
* ``no_mix`` -- the hard negative alone (DNS(1, N)): no caches, no refresh, no diverse item.
  ``divns_lambda: 1`` gives the same loss but still fills the caches and runs the refresh.

**Negative-diversity evidence.** Every negative id a row trains on (``v_H``, and
``v_D`` where mixed) is counted per epoch (:meth:`.module.DivNSModule.record_negatives`);
at epoch end :func:`~recbole_mdcns.diagnostics.negative_stats` reports the mean pairwise
cosine distance of the used negatives and the fraction of the catalogue used (this epoch and
ever), kept in ``DivNSModule.negative_history`` and logged.

The package, by concern:

* :mod:`.cache` -- the per-user state ``C_u``, ``H_u`` (:class:`RunnerUpCache`) and ``D_u``
  (:class:`DiverseSets`) as flat tensors;
* :mod:`.refresh` -- the epoch-end kernel and k-DPP draw of every ``D_u``
  (:func:`diversity_kernel`, :func:`refresh_diverse_sets`);
* :mod:`.pairing` -- per row: the hard negative and runner-ups, the diverse item's slot, the
  synthetic negative's score (:func:`pick_slots`, :func:`synthesize_scores`);
* :mod:`.module` -- :class:`DivNSModule`, its options (those for sequences included) and their
  checks, checkpoint and DDP; importing it registers ``neg_sampler: divns``.

:mod:`.cache` and :mod:`.refresh` are keyed by user and item ids only, with nothing specific
to sequences.
"""
from recbole_mdcns.methods.divns.cache import DiverseSets, RunnerUpCache, compact_unique
from recbole_mdcns.methods.divns.module import ABLATIONS, CACHE_BOUNDS, DivNSModule
from recbole_mdcns.methods.divns.pairing import (
    DIVERSE_PICKS, PAIRINGS, describe_synthesis, distinct_slots, hard_and_runner_ups, pick_slots,
    pool_diverse, synthesis_is_exact, synthesize_scores,
)
from recbole_mdcns.methods.divns.refresh import (
    DPP_MODES, KERNELS, Q_DENOMINATOR_FLOOR, REFRESH_MODES, diversity_kernel, median_bandwidth, refresh_diverse_sets,
    uniform_subsets,
)

__all__ = [
    "ABLATIONS",
    "CACHE_BOUNDS",
    "DIVERSE_PICKS",
    "DPP_MODES",
    "KERNELS",
    "PAIRINGS",
    "Q_DENOMINATOR_FLOOR",
    "REFRESH_MODES",
    "DiverseSets",
    "DivNSModule",
    "RunnerUpCache",
    "compact_unique",
    "describe_synthesis",
    "distinct_slots",
    "diversity_kernel",
    "hard_and_runner_ups",
    "median_bandwidth",
    "pick_slots",
    "pool_diverse",
    "refresh_diverse_sets",
    "synthesis_is_exact",
    "synthesize_scores",
    "uniform_subsets",
]
