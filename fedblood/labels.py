"""The five leukocyte classes, in label order: the one definition.

:mod:`fedblood.data` reads class folders into these labels; :mod:`fedblood.model.metrics`, the
reports and the predictions CSV name them. It imports nothing, so any module can use it.
"""

CLASSES = ('basophil', 'eosinophil', 'lymphocyte', 'monocyte', 'neutrophil')
