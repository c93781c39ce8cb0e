"""``neg_sampler: gnno`` -- GNNO: graph-based negatives from neighbourhood overlap, with a curriculum.

Fan, Pu, Zhang and Wu, "Neighborhood-based Hard Negative Mining for Sequential Recommendation"
(SIGIR 2023; code github.com/floatSDSDS/GNNO, model ``TopoCuri``). One named function per step:

==========================  ======================================================================
WITG                        :func:`transition_edges` -- the global item transition graph of the
                            training sequences: an edge between every item and the items 1, 2 and
                            3 steps after it (GCL4SR's WITG; the edges' 1/k weights matter only for
                            the authors' weighted variant, their default uses neighbour sets)
overlap (Eq. ``jaccard``)   :func:`neighbourhood_jaccard` -- ``J(i, j) = |N(i) & N(j)| /
                            |N(i) | N(j)|`` on the WITG, kept sparse: per item the ``gnno_top_k``
                            largest ``0 < J <= gnno_max_hardness`` (items above the cap are never
                            drawn, so they are not stored)
curriculum                  :func:`hardness_threshold` -- from epoch ``gnno_start_epoch`` on, the
                            threshold ``theta_e = min(gnno_pace * (e - start), gnno_max_hardness)``
                            grows from 0: easy (low-overlap) negatives first, harder ones later
false negatives             items with ``J(i, j) > theta_e`` are excluded from the distribution of
                            target ``i`` (high overlap = likely a positive); so is any item the
                            user interacted with in training (the plug-in's pool rule)
hard negatives              :func:`hard_negatives` -- ``gnno_num_hard`` draws per row from the
                            positive's admissible neighbours, ``p(j | i) ~ exp(J(i, j) / tau)``
loss                        ``neg_loss`` over the row's uniform negatives and its hard negatives
                            (the authors' code: ``num_neg`` uniform + ``n_hn`` hard, one BPR)
==========================  ======================================================================

**Candidate pool.** ``candidate_num`` = N items are drawn per row as for every sampler
(``candidate_distribution``, outside the user's training items). The first ``N - gnno_num_hard``
are the row's uniform negatives; each of the last ``gnno_num_hard`` stands in for one hard draw
where none is admissible: before ``gnno_start_epoch``, when the positive has no neighbour with
``J <= theta_e`` (e.g. at ``theta = 0``), or when the drawn item is in the user's training items.
A row therefore always trains on N negatives.

**Adaptation of the distribution.** The authors' code draws from ``softmax(J(i, .))`` over the
whole catalogue, masked to ``J <= theta``. With ``J`` in ``[0, 1]`` that softmax is nearly flat,
and the items with ``J = 0`` hold ``>= (n - k) / n`` of its mass, so its "hard" draws are almost
always uniform items (the defect noted for the MDCNS authors' copy of it). Here a hard draw comes
from the admissible overlap neighbourhood itself (``exp(J / tau)``, ``gnno_tau`` as the authors'
temperature 1 by default), and the zero-overlap mass is the uniform stand-in above.

**Memory.** The graph is built once per fit from RecBole's training rows (each row's last three
prefix items -> its target: every transition of the training sequences exactly once), as sparse
matrices; the overlap is computed in chunks of rows (at most ``_CHUNK_ENTRIES`` dense entries at a
time) and only ``[n_items, gnno_top_k]`` ids and overlaps are kept: memory grows with interactions
+ items x k, never items x items. The sampler keeps no state that spans batches or epochs beyond
the curriculum, which is a function of the epoch, so resuming needs nothing from the checkpoint.
"""
from __future__ import annotations

from logging import getLogger
from time import perf_counter

import numpy as np
import scipy.sparse as sp
import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.config import check_number, packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.registry import register_sampler

HOPS = 3  # WITG: edges to the items 1..3 steps later (GCL4SR, GNNO)
_CHUNK_ENTRIES = 4_000_000  # dense overlap entries computed at a time while building the graph


# --------------------------------------------------------------------------- the method's steps


def transition_edges(prefix: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                     hops: int = HOPS) -> tuple[torch.Tensor, torch.Tensor]:
    """WITG edges from RecBole's training rows: ``(prefix[len - k], target)`` for ``k = 1..hops``.

    ``prefix`` ``[R, L]`` holds each row's items left-aligned (0-padded), ``lengths`` ``[R]``
    their counts, ``targets`` ``[R]`` the next items. RecBole makes one row per target of a
    training sequence, so every pair of items ``k <= hops`` steps apart appears exactly once.
    Returns ``(src, dst)`` item ids, the earlier item first.
    """
    src, dst = [], []
    for k in range(1, hops + 1):
        has = lengths >= k
        src.append(prefix[has].gather(1, (lengths[has] - k).unsqueeze(1)).squeeze(1))
        dst.append(targets[has])
    return torch.cat(src), torch.cat(dst)


def neighbourhood_jaccard(src: torch.Tensor, dst: torch.Tensor, n_items: int, top_k: int,
                          max_overlap: float = 1.0,
                          chunk_entries: int = _CHUNK_ENTRIES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item ``i``, the ``top_k`` items ``j != i`` with the largest ``0 < J(i, j) <= max_overlap``.

    ``N(i)`` is ``i``'s neighbour set in the undirected graph of the edges ``(src, dst)``
    (self-loops dropped) and ``J(i, j) = |N(i) & N(j)| / |N(i) | N(j)|``. The common-neighbour
    counts ``A A^T`` are computed for ``chunk_entries / n_items`` rows at a time.

    Returns ``([n_items, top_k]`` neighbour ids, 0-padded, ``[n_items, top_k]`` their overlaps,
    0 where padded), each row sorted by decreasing overlap.
    """
    s, d = src.cpu().numpy(), dst.cpu().numpy()
    keep = s != d
    rows, cols = np.concatenate([s[keep], d[keep]]), np.concatenate([d[keep], s[keep]])
    adjacency = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_items, n_items))
    adjacency.data[:] = 1.0  # duplicate edges were summed: back to a 0/1 neighbour set
    degree = torch.from_numpy(np.asarray(adjacency.sum(1)).ravel())
    k = min(top_k, n_items)
    ids = torch.zeros(n_items, k, dtype=torch.long)
    overlaps = torch.zeros(n_items, k)
    step = max(1, chunk_entries // n_items)
    for start in range(0, n_items, step):
        stop = min(n_items, start + step)
        common = torch.from_numpy((adjacency[start:stop] @ adjacency.T).toarray())
        union = degree[start:stop].unsqueeze(1) + degree.unsqueeze(0) - common
        jaccard = common / union.clamp_min(1.0)
        jaccard[torch.arange(stop - start), torch.arange(start, stop)] = 0.0  # not its own neighbour
        jaccard[:, 0] = 0.0  # padding id
        jaccard[jaccard > max_overlap] = 0.0
        value, index = jaccard.topk(k, dim=1)
        overlaps[start:stop] = value
        ids[start:stop] = torch.where(value > 0, index, 0)
    return ids, overlaps


def hardness_threshold(epoch: int, start: int, pace: float, max_hardness: float) -> float | None:
    """The curriculum's overlap threshold ``theta_e = min(pace * (epoch - start), max_hardness)`` from
    epoch ``start`` on; ``None`` before it (no hard negatives yet)."""
    if epoch < start:
        return None
    return min(pace * (epoch - start), max_hardness)


def hard_negatives(neighbours: torch.Tensor, overlaps: torch.Tensor, threshold: float, tau: float,
                   num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` draws per row from the admissible neighbours of its positive.

    ``neighbours`` / ``overlaps`` are the positive's ``[R, k]`` list (0 = padding). A neighbour is
    admissible when ``0 < J <= threshold``; it is drawn with probability ``~ exp(J / tau)``.
    Returns ``([R, num]`` items, ``[R, num]`` bool: drawn, False for rows without an admissible
    neighbour, whose items are 0).
    """
    admissible = (neighbours > 0) & (overlaps > 0) & (overlaps <= threshold)
    has = admissible.any(1)
    weights = torch.where(admissible, (overlaps / tau).exp(), torch.zeros_like(overlaps))
    weights[~has, 0] = 1.0  # placeholder so that every row can be drawn from; masked below
    pick = torch.multinomial(weights, num, replacement=True)
    found = has.unsqueeze(1).expand_as(pick)
    return torch.where(found, neighbours.gather(1, pick), 0), found.clone()


# --------------------------------------------------------------------------- Lightning module


class GNNOModule(NegativeSamplingModule):
    """``neg_sampler: gnno`` (see the module docstring)."""

    general_models = False
    general_models_why = "it mines hard negatives from the item-transition graph of the training sequences"

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.num_hard = config["gnno_num_hard"]
        self.top_k = config["gnno_top_k"]
        self.start = config["gnno_start_epoch"]
        self.pace = float(config["gnno_pace"])
        self.max_hardness = float(config["gnno_max_hardness"])
        self.tau = float(config["gnno_tau"])
        self.neighbours: torch.Tensor | None = None  # [n_items, k] ids, built by prepare()
        self.overlaps: torch.Tensor | None = None
        self.interacted = None  # (users, items) -> bool: in the user's training items (the pool's rule)
        self.hard_slots = self.graph_slots = 0  # this epoch: hard slots, of which filled from the graph

    @staticmethod
    def validate_config(config) -> None:
        require_one(config, "top_m", "gnno", "it draws from the graph, it takes no top-M")
        hard = check_number(config, "gnno_num_hard", 1, integer=True)
        n = config["candidate_num"]
        if isinstance(n, bool) or not isinstance(n, int) or n <= hard:
            raise ValueError(f"candidate_num must be an integer > gnno_num_hard ({hard}) for neg_sampler=gnno "
                             f"(the uniform negatives plus one stand-in per hard negative), got {n!r}")
        if config["neg_num"] != n:
            raise ValueError(f"neg_num must equal candidate_num for neg_sampler=gnno (every row trains on its whole "
                             f"pool: candidate_num - gnno_num_hard uniform negatives and gnno_num_hard hard ones), "
                             f"got neg_num={config['neg_num']}, candidate_num={n}")
        check_number(config, "gnno_top_k", 1, integer=True)
        check_number(config, "gnno_start_epoch", 0, integer=True)
        check_number(config, "gnno_pace", 0.0, low_open=True)
        check_number(config, "gnno_max_hardness", 0.0, 1.0, low_open=True)
        check_number(config, "gnno_tau", 0.0, low_open=True)

    def prepare(self, train_data) -> None:
        """Build the overlap lists from the training rows of ``train_data`` (a candidate loader) and
        take its sampler's record of each user's training items."""
        dataset = train_data._dataset
        self.interacted = train_data._sampler.is_used
        if self.neighbours is not None:
            return
        started = perf_counter()
        inter = dataset.inter_feat
        src, dst = transition_edges(inter[dataset.iid_field + dataset.config["LIST_SUFFIX"]].long(),
                                    inter[dataset.item_list_length_field].long(), inter[dataset.iid_field].long())
        ids, overlaps = neighbourhood_jaccard(src, dst, dataset.item_num, self.top_k, self.max_hardness)
        self.neighbours, self.overlaps = ids.to(self.device), overlaps.to(self.device)
        listed = (ids > 0).sum(1).float()
        getLogger().info(f"gnno: item transition graph of {len(src)} transitions; {float(listed.mean()):.1f} "
                         f"overlap neighbours per item (cap {self.top_k}, J <= {self.max_hardness}), "
                         f"built in {perf_counter() - started:.2f}s")

    def on_fit_start(self) -> None:
        self.prepare(self.trainer.datamodule.train_data)

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        model = self.model
        pool, positives = batch[CANDIDATES], batch[model.POS_ITEM_ID]
        negatives = pool
        threshold = hardness_threshold(self.current_epoch, self.start, self.pace, self.max_hardness)
        if threshold is not None:
            uniform = pool.shape[1] - self.num_hard
            if self.neighbours.device != pool.device:
                self.neighbours, self.overlaps = self.neighbours.to(pool.device), self.overlaps.to(pool.device)
            hard, found = hard_negatives(self.neighbours[positives], self.overlaps[positives], threshold, self.tau,
                                         self.num_hard)
            users = batch[model.USER_ID].long().unsqueeze(1).expand_as(hard)
            found &= ~self.interacted(users.cpu(), hard.cpu()).to(found.device)
            negatives = torch.cat([pool[:, :uniform], torch.where(found, hard, pool[:, uniform:])], 1)
            self.hard_slots += found.numel()
            self.graph_slots += int(found.sum())
        self.record_negatives(negatives)
        scorer = self.scorer_for("self", model, batch)
        h = scorer.encode(model, batch)
        scores = scorer.score(model, batch, h, torch.cat([positives.unsqueeze(1), negatives], 1))
        return self.loss_fn(scores[:, 0], scores[:, 1:])

    def on_train_epoch_end(self) -> None:
        record = self.negative_report(self.current_epoch)
        slots = torch.tensor([self.hard_slots, self.graph_slots], dtype=torch.float64, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            slots = self.all_gather(slots).reshape(-1, 2).sum(0)
        threshold = hardness_threshold(self.current_epoch, self.start, self.pace, self.max_hardness)
        record.update({"hardness_threshold": threshold,
                       "graph_negative_fraction": float(slots[1] / slots[0]) if slots[0] > 0 else 0.0})
        self.hard_slots = self.graph_slots = 0
        self.log_epoch(record, f"gnno epoch {record['epoch']}: hardness threshold {threshold}; hard slots filled "
                               f"from the graph {record['graph_negative_fraction']:.1%}")


register_sampler("gnno", GNNOModule, config_file=packaged_yaml("gnno"))
