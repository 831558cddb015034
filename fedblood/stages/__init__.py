"""The study's stages, each taking the run's :class:`fedblood.experiment.Experiment`.

* :mod:`fedblood.stages.reference`: the reference model (trained or restored).
* :mod:`fedblood.stages.fl`: the federated rounds.
* :mod:`fedblood.stages.baselines`: local-only and pooled training.

:func:`fedblood.train.run` runs them in order.
"""
