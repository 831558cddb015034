"""The study's stages, each taking the run's :class:`fedblood.study.experiment.Experiment`.

* :mod:`fedblood.study.stages.reference`: the reference model (trained or restored).
* :mod:`fedblood.study.stages.fl`: the federated rounds.
* :mod:`fedblood.study.stages.baselines`: local-only and pooled training.

:func:`fedblood.study.train.run` runs them in order.
"""
