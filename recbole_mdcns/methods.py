"""Registry of ``neg_sampler`` names and the LightningModule that implements each."""
from __future__ import annotations

import importlib

METHODS = {
    "uniform": "recbole_mdcns.lightning_module:DNSModule",
    "popularity": "recbole_mdcns.lightning_module:DNSModule",
    "dns": "recbole_mdcns.lightning_module:DNSModule",
    "divns": "recbole_mdcns.divns:DivNSModule",
    "mdcns": "recbole_mdcns.mdcns:MDCNSModule",
}


def method_module(name: str):
    """The ``NegativeSamplingModule`` subclass registered for ``neg_sampler: name``."""
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)
