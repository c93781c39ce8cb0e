"""The built-in samplers, one module per method family; importing a module registers its samplers.

=================================  ===========================  ==============================
``neg_sampler``                    module                       paper
=================================  ===========================  ==============================
``uniform``, ``popularity``        :mod:`.dns`                  RNS / PNS (the pool's draws)
``dns``                            :mod:`.dns`                  DNS (SIGIR'13), DNS(M, N)
``mixgcf``                         :mod:`.mixgcf`               MixGCF / MixGCF+ (KDD'21)
``dens``                           :mod:`.dens`                 DENS (WSDM'23)
``ahns``                           :mod:`.ahns`                 AHNS (AAAI'24)
``divns``                          :mod:`.divns`                DivNS (arXiv 2508.14468)
``mdcns``                          :mod:`.mdcns`                MDCNS (SIGIR 2026)
``adasir``                         :mod:`.adasir`               AdaSIR (WWW'22)
``gnno``                           :mod:`.gnno`                 GNNO (SIGIR'23)
``srns``                           :mod:`.srns`                 SRNS (NeurIPS'20)
``full_softmax``                   :mod:`.full_softmax`         RecBole's ``loss_type: CE``, no sampling
=================================  ===========================  ==============================

Per-user state shared by AdaSIR and SRNS (growth, the DDP merge rule) is in :mod:`.user_state`.
A new method is a new module here (its selection rule, its LightningModule, its config checks,
``register_sampler`` at the bottom) plus ``config_yamls/<name>.yaml``, imported below.
"""
from recbole_mdcns.methods import (  # noqa: F401  (registration on import)
    adasir, ahns, dens, divns, dns, full_softmax, gnno, mdcns, mixgcf, srns,
)
