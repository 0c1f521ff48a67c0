"""Rungs 2-5 of the ladder: the distillation methods, in reading order.

* :mod:`kipnb.krr` -- kernel ridge regression (fit, predict, blocked evaluation).
* :mod:`kipnb.label_solve` -- Label Solve: closed-form optimal labels for a fixed support set.
* :mod:`kipnb.kip` -- KIP: support images (and labels) learned on the KRR loss.
* :mod:`kipnb.rfad` -- RFAD: KIP with the ConvNet NNGP estimated by random ConvNet features.
* :mod:`kipnb.frepo` -- FRePo: KRR on the features of a pool of ConvNets trained online.
* :mod:`kipnb.sampling` -- importance sampling: sensitivities, importance initialization,
  importance-weighted target batches.
* :mod:`kipnb.experts` -- expert trajectories of finite networks (MTT's buffers).
* :mod:`kipnb.tm` -- trajectory matching: MTT and DATM.

Each writes a :class:`kipnb.DistilledSet`; :mod:`kipnb.evaluate` judges any of them.
Import them by their short names: ``from kipnb import kip, tm``.
"""
