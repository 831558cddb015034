"""A compromised site for tests/test_deploy.py: on PYTHONPATH of one SuperNode only.

With FEDBLOOD_TAMPER_ROUND=r the site's round-r train reply carries NaN parameters (the site's
warm worker inherits this PYTHONPATH); the server must refuse it, name the node, and run the
round without it.
"""
import os

if os.environ.get('FEDBLOOD_TAMPER_ROUND'):
  import jax
  import numpy as np
  from fedblood.deploy import site

  _honest = site.answer

  def _answer(kind, request, *args):
    out = _honest(kind, request, *args)
    if kind == 'train' and int(request['round']) == int(os.environ['FEDBLOOD_TAMPER_ROUND']):
      leaves, treedef = jax.tree.flatten(out['params'])
      leaves[0] = np.full(np.shape(leaves[0]), np.nan, np.asarray(leaves[0]).dtype)
      out['params'] = jax.tree.unflatten(treedef, leaves)
    return out

  site.answer = _answer
