"""recbole-mdcns: MDCNS, DivNS and DNS negative sampling for RecBole's sequential models and
its dot-product general models (BPR, LightGCN, NGCF, SGL, NCL, DGCF, SpectralCF)."""
from recbole_mdcns import compat

compat.apply()

from recbole_mdcns.models import install_hook, register_model  # noqa: E402

install_hook()

from recbole_mdcns import methods  # noqa: E402,F401  (registers the built-in samplers)
from recbole_mdcns.lightning_module import NegativeSamplingModule  # noqa: E402
from recbole_mdcns.quick_start import run_recbole  # noqa: E402
from recbole_mdcns.registry import available_samplers, register_sampler  # noqa: E402

__all__ = ["NegativeSamplingModule", "available_samplers", "register_model", "register_sampler", "run_recbole"]
__version__ = "0.1.0"
