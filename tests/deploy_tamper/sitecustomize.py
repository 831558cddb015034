"""A compromised site for tests/test_deploy.py: on PYTHONPATH of one SuperNode only.

With FEDBLOOD_TAMPER_ROUND=r the site's round-r train reply carries NaN parameters (the site's
warm worker inherits this PYTHONPATH); the server must refuse it, name the node, and run the
round without it. With FEDBLOOD_CRASH_ROUND=r the site's worker dies (exit 9) whenever it is
asked to train round r: the ClientApp's relay starts another, which dies too, and the round
goes on without the site; it trains again in the next round, from its state on disk. With
FEDBLOOD_HANG_ROUND=r the worker stops itself (SIGSTOP) when asked to train round r, and
answers once the test sends SIGCONT: a hung site, whose late reply the server must discard.
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


if os.environ.get('FEDBLOOD_CRASH_ROUND'):
  from fedblood.deploy import site

  _alive = site.answer

  def _crashing(kind, request, *args):
    if kind == 'train' and int(request['round']) == int(os.environ['FEDBLOOD_CRASH_ROUND']):
      os._exit(9)  # pylint: disable=protected-access
    return _alive(kind, request, *args)

  site.answer = _crashing


if os.environ.get('FEDBLOOD_HANG_ROUND'):
  import signal
  from fedblood.deploy import site

  _awake = site.answer

  def _hanging(kind, request, *args):
    if kind == 'train' and int(request['round']) == int(os.environ['FEDBLOOD_HANG_ROUND']):
      os.kill(os.getpid(), signal.SIGSTOP)  # hung, heartbeats and all, until the test's SIGCONT
    return _awake(kind, request, *args)

  site.answer = _hanging
