"""Large catalogues: the pool sampler's two membership structures (packed bitmap, hash set)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from conftest import tiny_config, write_dataset
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CandidatePoolSampler
from recbole_mdcns.used_pairs import PackedBitmap, PairHashSet


def _train_dataset(data_path: Path, tmp_path: Path, dataset: str = "tiny", **overrides):
    config = create_config("SASRec", dataset, config_dict=tiny_config(data_path, tmp_path, neg_sampler="dns",
                                                                      candidate_num=15, **overrides))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    return train_data._dataset


def _with_user(tmp_path: Path, name: str, items: list[int], n_items: int = 20) -> Path:
    """The tiny dataset (6 users) plus user ``u999`` who interacted with ``items`` in that order."""
    root = write_dataset(tmp_path / "data", name=name, n_users=6, n_items=n_items)
    inter = root / name / f"{name}.inter"
    lines = inter.read_text().splitlines() + [f"u999\ti{item}\t5\t{t}" for t, item in enumerate(items)]
    inter.write_text("\n".join(lines) + "\n")
    return root


def _keys(n_pairs: int, user_num: int, item_num: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, user_num, (n_pairs,), generator=g)
    items = torch.randint(1, item_num, (n_pairs,), generator=g)
    return torch.unique(users * item_num + items)


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_bitmap_and_hash_set_draw_identical_pools(tmp_path, in_tmp, distribution):
    # u999 has seen all 20 items but i19, i20 (its valid / test targets): its rows need the exact
    # complement fallback, the other users' rows plain rejection sampling
    dataset = _train_dataset(_with_user(tmp_path, "dense", list(range(1, 21))), in_tmp, dataset="dense")
    bitmap = CandidatePoolSampler(dataset, distribution)
    hashed = CandidatePoolSampler(dataset, distribution, bitmap_max_bytes=0)
    assert isinstance(bitmap.used_pairs, PackedBitmap) and isinstance(hashed.used_pairs, PairHashSet)
    users = dataset.inter_feat["user_id"].repeat(20)
    dense = dataset.field2token_id["user_id"]["u999"]
    assert (users == dense).any()
    for seed in (0, 1):
        bitmap.reseed(seed)
        hashed.reseed(seed)
        pools = bitmap.sample_pool(users, 15), hashed.sample_pool(users, 15)
        assert torch.equal(*pools)
    allowed = {dataset.field2token_id["item_id"]["i19"], dataset.field2token_id["item_id"]["i20"]}
    assert set(pools[0][users == dense].flatten().tolist()) <= allowed


def test_structure_follows_the_byte_bound(tiny_data, in_tmp):
    dataset = _train_dataset(tiny_data, in_tmp)
    bitmap_bytes = dataset.user_num * ((dataset.item_num + 7) // 8)
    assert isinstance(CandidatePoolSampler(dataset).used_pairs, PackedBitmap)  # the default bound
    assert isinstance(CandidatePoolSampler(dataset, bitmap_max_bytes=bitmap_bytes).used_pairs, PackedBitmap)
    assert isinstance(CandidatePoolSampler(dataset, bitmap_max_bytes=bitmap_bytes - 1).used_pairs, PairHashSet)


@pytest.mark.parametrize("bitmap_max_bytes", [0, None])
def test_user_with_every_training_item_is_an_error(tmp_path, in_tmp, bitmap_max_bytes):
    dataset = _train_dataset(_with_user(tmp_path, "full", [*range(1, 21), 1, 2]), in_tmp, dataset="full")
    kwargs = {} if bitmap_max_bytes is None else {"bitmap_max_bytes": bitmap_max_bytes}
    with pytest.raises(ValueError, match="interacted with every item in training"):
        CandidatePoolSampler(dataset, **kwargs)


@pytest.mark.parametrize(("user_num", "item_num"), [(300, 400), (100_000, 60_000)])  # keys < 2**31; folded
def test_membership_matches_a_python_set(user_num, item_num):
    keys = _keys(30_000, user_num, item_num)
    copy = keys.clone()
    table = PairHashSet(keys, user_num, item_num)
    assert table.fold == (user_num * item_num > 2**31 - 1)
    slots = (table.table >= 0).nonzero().flatten()
    probe = (slots - table._slot(table.table[slots])) & (len(table.table) - 1)
    assert probe.max() >= 2  # some keys sit two or more slots past their own: the binary-search path runs
    queries = torch.cat([keys, keys + 1, keys - 1, _keys(30_000, user_num, item_num, seed=1)])
    queries = queries[(queries >= 0) & (queries < user_num * item_num)]
    users, items = queries // item_num, queries % item_num
    stored = set(keys.tolist())
    expected = torch.tensor([q in stored for q in queries.tolist()])
    assert expected.any() and not expected.all()
    assert torch.equal(table.contains(users, items), expected)
    assert torch.equal(table.contains(users[:1000], items[:1000]), expected[:1000])  # small batches: searched
    assert torch.equal(keys, copy) and table.keys is keys  # the caller's sorted keys: shared, not modified
    if user_num * item_num < 10**6:
        assert torch.equal(PackedBitmap(keys, user_num, item_num).contains(users, items), expected)


def test_hash_set_bytes_grow_with_pairs_not_catalogue():
    sizes = {}
    for n_items in (10_000, 10_000_000):
        for n_pairs in (2_000, 20_000):
            keys = _keys(n_pairs, 50_000, n_items, seed=random.Random(n_items).randrange(100))
            sizes[n_items, n_pairs] = PairHashSet(keys, 50_000, n_items).nbytes
            assert sizes[n_items, n_pairs] <= 64 * len(keys)  # 8-byte slots, load factor > 1/8
    assert sizes[10_000, 2_000] == sizes[10_000_000, 2_000] < sizes[10_000, 20_000] == sizes[10_000_000, 20_000]
    assert 50_000 * 10_000_000 / 8 > 10**5 * sizes[10_000_000, 2_000]  # what the bitmap would take


def test_sampler_memory_on_a_wide_catalogue(tmp_path, in_tmp):
    root = write_dataset(tmp_path / "data", name="wide", n_users=30, n_items=40_000)
    dataset = _train_dataset(root, in_tmp, dataset="wide")
    assert dataset.item_num == 40_001  # every item of the .item file, though few were interacted with
    sampler = CandidatePoolSampler(dataset, bitmap_max_bytes=0)
    pairs = len(sampler.used_ids)
    interactions = len(dataset.inter_feat) + dataset.user_num  # rows, plus each history's first item
    assert pairs <= interactions
    held = sampler.used_ids.numel() * sampler.used_ids.element_size() + sampler.used_pairs.nbytes
    assert held <= 72 * interactions
    assert held < sampler.user_num * sampler.item_num / 8 / 5  # a fifth of the bitmap, already at 30 users
