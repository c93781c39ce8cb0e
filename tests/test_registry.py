"""The sampler registry (``register_sampler``, entry points) and the model hook (``register_model``)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import recbole.quick_start
import recbole.utils
import torch
from conftest import tiny_config
from recbole.model.sequential_recommender.sasrec import SASRec

import recbole_mdcns
from recbole_mdcns import NegativeSamplingModule, register_model, register_sampler, registry
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES

PACKAGE = Path(recbole_mdcns.__file__).parent
CORE = ("config", "data", "scoring", "trainer", "compat", "quick_start", "losses", "registry",
        "lightning_module", "strategies", "diagnostics", "evaluation", "companion_models")


class EasiestNegative(NegativeSamplingModule):
    """A user's sampler, as in docs/extending.md: train on the lowest-scored candidate of the pool."""

    @staticmethod
    def validate_config(config) -> None:
        if config["candidate_num"] < 2:
            raise ValueError(f"candidate_num must be >= 2 for neg_sampler=easiest, got {config['candidate_num']}")

    def training_loss(self, batch):
        scorer = self.scorer_for("self", self.model, batch)
        h = scorer.encode(self.model, batch)
        pool = batch[CANDIDATES]
        with torch.no_grad():
            pick = scorer.score(self.model, batch, h, pool).argmin(1, keepdim=True)
        self.record_negatives(pool.gather(1, pick))
        items = torch.cat([batch[self.model.POS_ITEM_ID].unsqueeze(1), pool.gather(1, pick)], 1)
        scores = scorer.score(self.model, batch, h, items)
        return self.loss_fn(scores[:, 0], scores[:, 1])


@pytest.fixture(scope="module")
def easiest(tmp_path_factory) -> str:
    defaults = tmp_path_factory.mktemp("yaml") / "easiest.yaml"
    defaults.write_text("candidate_num: 7\neasiest_note: from-the-yaml\n")
    register_sampler("easiest", EasiestNegative, config_file=str(defaults))
    return "easiest"


def test_user_sampler_trains_with_its_yaml_defaults(easiest, tiny_data, in_tmp):
    config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler=easiest))
    assert config["candidate_num"] == 7 and config["easiest_note"] == "from-the-yaml"  # merged like ours
    assert config["neg_loss"] == "bpr"  # base.yaml under it
    user = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler=easiest,
                                                                   candidate_num=5))
    assert user["candidate_num"] == 5  # the user's value wins
    result = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler=easiest, epochs=2))
    assert result["test_result"]["ndcg@10"] >= 0
    assert result["train_info"]["epochs"] == 2
    assert result["train_info"]["negative_history"][0]["negatives"] > 0


def test_user_sampler_config_checks_run_before_data(easiest, tiny_data, in_tmp):
    with pytest.raises(ValueError, match="candidate_num must be >= 2 for neg_sampler=easiest"):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler=easiest,
                                                                candidate_num=1))


def test_register_sampler_errors(easiest):
    assert register_sampler(easiest, EasiestNegative, config_file=registry.get_sampler(easiest).config_file) \
        is EasiestNegative  # same class again: a no-op
    with pytest.raises(ValueError, match="'dns' is already taken by recbole_mdcns.methods.dns.DNSModule"):
        register_sampler("dns", EasiestNegative)
    with pytest.raises(TypeError, match="is not a sampler"):
        register_sampler("not_a_sampler", torch.nn.Linear)
    with pytest.raises(TypeError, match="does not implement training_loss"):
        register_sampler("no_loss", type("NoLoss", (NegativeSamplingModule,), {}))
    with pytest.raises(ValueError, match="other than \\['recbole'\\]"):
        register_sampler("recbole", EasiestNegative)
    with pytest.raises(ValueError, match="does not exist"):
        register_sampler("missing_yaml", EasiestNegative, config_file="/no/such.yaml")
    with pytest.raises(ValueError, match=r"neg_sampler must be one of \['recbole', .*'easiest'.*\], got 'nope'"):
        registry.get_sampler("nope")


def test_decorator_form():
    @register_sampler("easiest_decorated")
    class Decorated(EasiestNegative):
        pass

    assert registry.get_sampler("easiest_decorated").cls is Decorated
    assert "easiest_decorated" in recbole_mdcns.available_samplers()


def test_installed_package_registers_through_entry_points(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "plugin_sampler").mkdir(parents=True)
    (site / "plugin_sampler" / "__init__.py").write_text(
        "import os\n"
        "from recbole_mdcns.methods.dns import DNSModule\n"
        "class PluginSampler(DNSModule):\n"
        "    config_file = os.path.join(os.path.dirname(__file__), 'plugin.yaml')\n")
    (site / "plugin_sampler" / "plugin.yaml").write_text("candidate_num: 3\n")
    info = site / "plugin_sampler-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-sampler\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nplugged = plugin_sampler:PluginSampler\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    entry = registry.get_sampler("plugged")
    assert entry.cls.__name__ == "PluginSampler" and entry.config_file.endswith("plugin.yaml")


def test_core_imports_no_method():
    """The core knows samplers only by name, through the registry."""
    for name in CORE:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [m for m in imported if m.startswith("recbole_mdcns.methods")], name


# ------------------------------------------------------------------------------------------- models
class SASRecTwin(SASRec):
    """A model 'this package or a user provides': SASRec under another name, with SASRec's YAML."""


@pytest.fixture(scope="module")
def twin() -> str:
    yaml = os.path.join(os.path.dirname(recbole.quick_start.__file__), "..", "properties", "model", "SASRec.yaml")
    register_model("SASRecTwin", SASRecTwin, config_file=yaml)
    return "SASRecTwin"


def test_registered_model_runs_by_name_with_its_defaults(twin, tiny_data, in_tmp):
    config = create_config(twin, "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                 candidate_num=5))
    assert config["inner_size"] == 32 and config["hidden_act"] == "gelu"  # user's value; the model YAML's
    assert recbole.utils.get_model(twin) is SASRecTwin  # RecBole's own lookup finds it
    result = recbole_mdcns.run_recbole(twin, "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                             candidate_num=5))
    assert result["test_result"]["ndcg@10"] >= 0


def test_registered_model_loads_with_recbole_load_data_and_model(twin, tiny_data, in_tmp):
    recbole_mdcns.run_recbole(twin, "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="uniform"))
    saved = next((in_tmp / "saved").glob("SASRecTwin-*.pth"))
    config, model, *_ = recbole.quick_start.load_data_and_model(str(saved))
    assert type(model) is SASRecTwin and config["model"] == twin


def test_registered_model_as_mdcns_peer_and_in_plain_recbole(twin, tiny_data, in_tmp):
    result = recbole_mdcns.run_recbole("GRU4Rec", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="mdcns", candidate_num=5, mdcns_peer_model=twin))
    assert result["train_info"]["extra_valid_results"][0]["peer"]["ndcg@10"] >= 0
    plain = recbole.quick_start.run_recbole(twin, "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, train_neg_sample_args=None, loss_type="CE"))
    assert plain["test_result"]["ndcg@10"] >= 0


def test_register_model_errors(twin):
    with pytest.raises(ValueError, match="one of RecBole's own models"):
        register_model("SASRec", type("SASRec", (SASRec,), {}))
    with pytest.raises(ValueError, match="called 'SASRecTwin'"):
        register_model("Other", SASRecTwin)
    with pytest.raises(TypeError, match="not a RecBole model"):
        register_model("Linear", torch.nn.Linear)


def test_unknown_model_names_the_key_and_the_models(tiny_data, in_tmp):
    with pytest.raises(ValueError, match=r"model must be one of \[.*'SASRec'.*\], got 'SASRek'"):
        recbole_mdcns.run_recbole("SASRek", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns"))
    with pytest.raises(ValueError, match="model must be one of"):
        recbole.quick_start.run_recbole("SASRek", "tiny", config_dict=tiny_config(tiny_data, in_tmp))

