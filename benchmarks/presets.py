"""Named base settings for benchmark grids (``preset:`` in a grid file, or ``--preset``).

Every preset evaluates the same way -- RecBole's sequential protocol (leave-one-out
by time, full ranking over all items), Recall and NDCG at 5/10/20, early stopping
on NDCG@10 -- so the numbers of one preset are comparable across samplers, models
and datasets. A grid's own ``config:`` and each dataset / model / sampler entry
override the preset.

* ``smoke`` -- seconds per cell on a tiny dataset: a 1-layer 16-d model, sequences
  of 10, two epochs. Proves the pipeline, not the methods (used by the tests).
* ``cpu`` -- sized for the project's 2-core CPU (an afternoon for the LastFM grids,
  3 seeds). Chosen: ``MAX_ITEM_LIST_LENGTH: 20`` -- 2.5x fewer positions per
  sequence than RecBole's 50, and the encoder dominates an epoch (a SASRec epoch
  on ml-100k at length 50 took 127-152 s on this shared CPU, see benchmarks/studies/epoch_time.md); 20 still
  holds a LastFM user's recent history and all of most Beauty users' (5-core);
  ``epochs: 30`` with ``stopping_step: 5`` (RecBole: 300 / 10) -- a cap, so a cell's
  cost is bounded, with patience enough to see the validation curve turn;
  ``train_batch_size: 1024`` as in the MDCNS paper; SASRec's / GRU4Rec's default
  sizes (64-d, 2 layers). Absolute numbers sit below a converged GPU run; what
  it compares is the samplers under one fixed budget.
* ``paper`` -- the MDCNS paper's settings for a GPU: Adam, lr 1e-3, 64-d,
  batch 1024, sequences of 50, up to 500 epochs with early-stopping patience 30,
  three seeds (the grid lists them), full ranking, Recall/NDCG@5/10/20.
"""
from __future__ import annotations

import copy

EVALUATION = {
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Recall", "NDCG"],
    "topk": [5, 10, 20],
    "valid_metric": "NDCG@10",
    "valid_metric_bigger": True,
    # the shared atomic datasets have user, item and timestamp; ml-100k's extra columns stay unloaded
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "reproducibility": True,
    "show_progress": False,
}

PRESETS: dict[str, dict] = {
    "smoke": {
        **EVALUATION,
        "epochs": 2,
        "eval_step": 1,
        "stopping_step": 2,
        "train_batch_size": 512,
        "eval_batch_size": 2048,
        "MAX_ITEM_LIST_LENGTH": 10,
        "hidden_size": 16,
        "embedding_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "use_gpu": False,
        "state": "WARNING",
    },
    "cpu": {
        **EVALUATION,
        "epochs": 30,
        "eval_step": 1,
        "stopping_step": 5,
        "train_batch_size": 1024,
        "eval_batch_size": 4096,
        "learning_rate": 0.001,
        "MAX_ITEM_LIST_LENGTH": 20,
        "hidden_size": 64,
        "embedding_size": 64,
        "use_gpu": False,
        "state": "INFO",
    },
    "paper": {
        **EVALUATION,
        "epochs": 500,
        "eval_step": 1,
        "stopping_step": 30,
        "train_batch_size": 1024,
        "eval_batch_size": 4096,
        "learning_rate": 0.001,
        "MAX_ITEM_LIST_LENGTH": 50,
        "hidden_size": 64,
        "embedding_size": 64,
        "use_gpu": True,
        "gpu_id": "0",
        "state": "INFO",
    },
}


def preset(name: str) -> dict:
    """A deep copy of preset ``name``'s settings."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
