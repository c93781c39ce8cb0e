"""The benchmark files of ``python -m recbole_mdcns.user_split`` as RecBole loads them: their field names,
and the checks of a run on them (the RecBole settings they need, users never trained on)."""
from __future__ import annotations

from logging import getLogger

import numpy as np
from recbole.utils import ModelType

SPLITS = ("train", "valid", "test")
# the files' fields: RecBole's default names, whatever the input's columns are called
USER, ITEM, ITEM_LIST, TIME = "user_id", "item_id", "item_id_list", "timestamp"
# ``NAME.history``, a RecBole additional feature file: per held-out user whose first row was cut, the
# items before that row's item_id_list (read by recbole_mdcns.history_mask)
HISTORY_SUFFIX = "history"
HISTORY_USER, HISTORY_ITEMS = "history_user_id", "history_item_id_list"
# RecBole's sequential models that score with a learned per-user embedding: a user never trained on
# (a validation or test user of a user split) is scored from an untrained, random vector
USER_EMBEDDING_MODELS = ("Caser", "FPMC", "FOSSIL", "HGN", "HRM", "NPE", "SHAN", "TransRec")


def check_benchmark_config(config) -> None:
    """With ``benchmark_filename``, a sequential model's ``load_col`` must keep each row's item sequence;
    ``ValueError`` naming ``load_col`` otherwise (RecBole would fail later, on a missing attribute). A general
    model's benchmark rows are (user, item) pairs, with no sequence."""
    load_col = config["load_col"]
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL or not config["benchmark_filename"] or \
            not isinstance(load_col, dict):
        return
    field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
    inter = load_col.get("inter", [])
    if inter != "*" and field not in inter:
        raise ValueError(f"load_col: with benchmark_filename each row's sequence is the column {field}, so "
                         f"load_col['inter'] must include it, got {inter}")


def check_benchmark_ids(dataset) -> None:
    """With benchmark files, ``item_id_list`` (and the history file's fields) must share ``item_id``'s (and
    ``user_id``'s) ids: ``ValueError`` naming ``alias_of_item_id`` / ``alias_of_user_id`` otherwise."""
    config = dataset.config
    if not config["benchmark_filename"]:
        return
    pairs = [(dataset.iid_field + config["LIST_SUFFIX"], dataset.iid_field, "alias_of_item_id"),
             (HISTORY_ITEMS, dataset.iid_field, "alias_of_item_id"), (HISTORY_USER, dataset.uid_field, "alias_of_user_id")]
    for field, base, key in pairs:
        if field in dataset.field2id_token and not np.array_equal(dataset.field2id_token[field],
                                                                  dataset.field2id_token[base]):
            raise ValueError(f"{key} must list {field}: RecBole gave {field} ids of its own, so they do not name the "
                             f"same {base}s (the YAML python -m recbole_mdcns.user_split writes sets it)")


def warn_unseen_users(config, train_dataset, valid_dataset, test_dataset) -> None:
    """Log a warning when a model that scores with a learned user embedding (:data:`USER_EMBEDDING_MODELS`)
    runs on data whose validation or test users have no training row (a user split)."""
    models = [m for m in (config["model"], config["mdcns_peer_model"]) if m in USER_EMBEDDING_MODELS]
    if not models:
        return
    uid = train_dataset.uid_field
    trained = np.unique(train_dataset.inter_feat[uid].numpy())
    held = np.unique(np.concatenate([d.inter_feat[uid].numpy() for d in (valid_dataset, test_dataset)]))
    unseen = np.setdiff1d(held, trained)
    if len(unseen):
        getLogger().warning(
            f"{' and '.join(models)} score{'s' if len(models) == 1 else ''} with a learned user embedding, but "
            f"{len(unseen)} of the {len(held)} validation / test users have no training row (a user split): their "
            "embeddings are never trained, so they are scored from random vectors; use a model that scores from "
            "the sequence alone (e.g. SASRec, GRU4Rec) on such data (docs/authors_protocol.md)")
