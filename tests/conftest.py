"""Tiny atomic datasets written by the tests themselves, and a fast RecBole config."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

N_USERS, N_ITEMS = 40, 60


def write_dataset(root: Path, name: str = "tiny", n_users: int = N_USERS, n_items: int = N_ITEMS,
                  min_len: int = 6, max_len: int = 14, seed: int = 0, kg_dim: int = 0) -> Path:
    """``root/name/name.inter`` (+ ``.item`` with token, token_seq and float features).

    With ``kg_dim > 0`` also a small knowledge graph for KSR / GRU4RecKG: ``.kg``
    (head, relation, tail), ``.link`` (item -> entity) and ``kg_dim``-dimensional
    pre-trained entity / relation vectors in ``.ent`` / ``.rel`` (see :data:`KG_CONFIG`).
    """
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(1, n_users + 1):
        items = rng.sample(range(1, n_items + 1), rng.randint(min_len, max_len))
        lines += [f"u{user}\ti{item}\t{rng.randint(1, 5)}\t{t}" for t, item in enumerate(items)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    item_lines = ["item_id:token\tcategories:token_seq\tbrand:token\tprice:float"]
    for item in range(1, n_items + 1):
        cats = " ".join(f"c{c}" for c in rng.sample(range(8), rng.randint(1, 3)))
        item_lines.append(f"i{item}\t{cats}\tb{item % 5}\t{rng.uniform(1, 100):.2f}")
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n")
    if kg_dim > 0:
        _write_kg(folder, name, n_items, kg_dim, rng)
    return root


def _write_kg(folder: Path, name: str, n_items: int, dim: int, rng: random.Random, n_relations: int = 3) -> None:
    entities = [f"e{item}" for item in range(1, n_items + 1)] + [f"x{e}" for e in range(n_items // 2)]
    relations = [f"r{r}" for r in range(n_relations)]
    link = ["item_id:token\tentity_id:token"] + [f"i{item}\te{item}" for item in range(1, n_items + 1)]
    kg = ["head_id:token\trelation_id:token\ttail_id:token"]
    kg += [f"e{item}\t{rng.choice(relations)}\t{rng.choice(entities)}" for item in range(1, n_items + 1) for _ in range(2)]

    def vectors(ids: list, header: str) -> str:
        rows = [" ".join(f"{rng.gauss(0, 0.1):.4f}" for _ in range(dim)) for _ in ids]
        return "\n".join([header] + [f"{i}\t{row}" for i, row in zip(ids, rows)]) + "\n"

    (folder / f"{name}.link").write_text("\n".join(link) + "\n")
    (folder / f"{name}.kg").write_text("\n".join(kg) + "\n")
    (folder / f"{name}.ent").write_text(vectors(entities, "ent_id:token\tent_emb:float_seq"))
    (folder / f"{name}.rel").write_text(vectors(relations, "rel_id:token\trel_emb:float_seq"))


# RecBole config that loads the files written with ``kg_dim`` (merge into ``load_col`` / the config).
KG_CONFIG = {
    "load_col": {"kg": ["head_id", "relation_id", "tail_id"], "link": ["item_id", "entity_id"],
                 "ent": ["ent_id", "ent_emb"], "rel": ["rel_id", "rel_emb"]},
    "additional_feat_suffix": ["ent", "rel"],
    "alias_of_entity_id": ["ent_id"],
    "alias_of_relation_id": ["rel_id"],
    "preload_weight": {"ent_id": "ent_emb", "rel_id": "rel_emb"},
}


def tiny_config(data_path: Path, tmp_path: Path, **overrides) -> dict:
    """A RecBole config that trains any sequential model on the tiny dataset in seconds."""
    config = {
        "data_path": str(data_path),
        "checkpoint_dir": str(tmp_path / "saved"),
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 256,
        "MAX_ITEM_LIST_LENGTH": 8,
        "hidden_size": 16,
        "embedding_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "show_progress": False,
        "seed": 2020,
        "reproducibility": True,
        "state": "WARNING",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                     "item": ["item_id", "categories", "brand", "price"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Recall", "NDCG"],
        "topk": [10],
        "valid_metric": "NDCG@10",
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_kg_data(tmp_path_factory) -> Path:
    """The tiny dataset plus a knowledge graph and 16-d entity vectors (load them with :data:`KG_CONFIG`)."""
    return write_dataset(tmp_path_factory.mktemp("kgdata"), kg_dim=16)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder: RecBole writes log/ and log_tensorboard/ into the cwd."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _fast_runs():
    """Tiny tensors: one intra-op thread (no thread hand-offs or oversubscription on CI's two
    cores), and no 1 s CPU sampling in RecBole's end-of-run environment table."""
    import psutil  # what recbole.utils.get_environment samples
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psutil, "cpu_percent", lambda *args, **kwargs: 0.0)
        yield
    torch.set_num_threads(threads)
