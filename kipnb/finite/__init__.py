"""Finite networks: what distilled sets are transferred to and judged by.

* :mod:`kipnb.nets` -- FC nets and ConvNets (init/apply pairs).
* :mod:`kipnb.train` -- the optax trainer (KIP's transfer, MTT's evaluation, the experts).
* :mod:`kipnb.augment` -- differentiable siamese augmentation (DSA).

Import them by their short names: ``from kipnb import nets, train``.
"""
