"""Diagnostics of the negatives a run trained on (the DivNS paper's diversity measure)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recbole_mdcns.scoring import DotScorer, Scorer


def item_representation(model: torch.nn.Module, scorer: Scorer | None = None) -> torch.Tensor:
    """``[n_items, d]`` detached item vectors for the kernel and statistics: the vectors ``scorer``
    scores (a :class:`DotScorer`'s ``item_vectors``), else ``model.item_embedding`` (if an
    ``nn.Embedding``), else every ``nn.Embedding`` table with ``n_items`` rows, concatenated."""
    n_items = getattr(model, "n_items", None)
    with torch.no_grad():
        if isinstance(scorer, DotScorer) and n_items is not None:
            device = next(model.parameters()).device
            return scorer.item_vectors(model, torch.arange(n_items, device=device)).detach()
        table = getattr(model, "item_embedding", None)
        if isinstance(table, torch.nn.Embedding):
            return table.weight[:n_items].detach()
        tables = [mod.weight for mod in model.modules()
                  if isinstance(mod, torch.nn.Embedding) and mod.num_embeddings == n_items]
        if not tables:
            raise TypeError(f"divns needs item embeddings: {type(model).__name__} has no nn.Embedding "
                            f"with n_items={n_items} rows")
        return torch.cat(tables, 1).detach()


def negative_stats(item_embedding: torch.Tensor, used_ids: torch.Tensor, n_pairs: int = 2000,
                   generator: torch.Generator | None = None) -> dict:
    """Diversity of the negatives a model trained on.

    ``used_ids``: ids of the negatives used (any shape, with repetition; ids <= 0 ignored).
    ``mean_pairwise_cosine_distance`` is ``1 - cos`` averaged over ``n_pairs`` pairs drawn
    with replacement from that multiset (so a negative reused often counts as often);
    ``catalogue_fraction`` is the number of distinct ids over the catalogue
    (``item_embedding`` rows minus the padding id 0).
    """
    ids = used_ids.reshape(-1).long()
    ids = ids[ids > 0]
    catalogue = max(item_embedding.shape[0] - 1, 1)
    if len(ids) == 0:
        return {"negatives": 0, "unique": 0, "catalogue_fraction": 0.0, "mean_pairwise_cosine_distance": math.nan}
    device = generator.device if generator is not None else ids.device
    draw = torch.randint(len(ids), (2, n_pairs), generator=generator, device=device).to(ids.device)
    unit = F.normalize(item_embedding.detach().float(), dim=-1)
    a, b = unit[ids[draw[0]].to(unit.device)], unit[ids[draw[1]].to(unit.device)]
    unique = int(ids.unique().numel())
    return {"negatives": int(len(ids)), "unique": unique, "catalogue_fraction": unique / catalogue,
            "mean_pairwise_cosine_distance": float((1.0 - (a * b).sum(-1)).mean())}
