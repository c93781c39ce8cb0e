"""recbole-mdcns: MDCNS, DivNS and DNS negative sampling for RecBole's sequential models."""
from recbole_mdcns import compat

compat.apply()

from recbole_mdcns.quick_start import run_recbole  # noqa: E402

__all__ = ["run_recbole"]
__version__ = "0.1.0"
