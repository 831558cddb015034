"""The deployed study's server loop: the simulation's rounds, with sites answering over Flower.

:func:`run` does what :func:`fedblood.study.stages.fl.fl_stage` does, through the same round driver
(:func:`fedblood.study.driver.drive`), with the centers' local updates computed at the sites
(:mod:`fedblood.deploy.site`) and every other step the simulation's:

* the reference model comes from ``reference.restore`` (a deployed server has no images to
  train one; train it at the reference site with ``launch.py`` and pass its workdir);
  the sites evaluate it on their test splits when they connect (Table 1);
* round ``r``: the centers ``fl.participation`` draws are sent the server state; the
  replies that arrive within ``round_timeout`` and pass :func:`fedblood.deploy.wire.check_tree`
  (shapes, dtypes, finite values) are the round's active clients; the simulation's own
  jitted server step (``execution='loop'``) aggregates them with weights ``n_k / sum(n) * C``
  from the sizes the sites reported. Every connected site then evaluates the new model (in
  the same message as the next round's training: a site evaluates the model it receives
  before it trains from it; a final evaluate message closes the run), the rows go to
  ``metrics.jsonl`` and the round is checkpointed as a simulated one is (Orbax,
  each ``checkpoint.every`` rounds and the last, the best-validation step kept; the
  simulation's layout plus the sites' sizes, Table 1 and each center's last accepted round);
* a restarted server resumes from its last checkpoint; a site that missed rounds rejoins
  (under any node id) and trains from its state of the round it was last accepted in.

The workdir then holds what a simulated run's does (``config.json``, ``metrics.jsonl``,
``results.json``, ``report.md``, figures, ``checkpoints/``) without the baselines (they
would need the images in one place) and with ``deploy.log``: which node answered for which
center, every refused reply and why.
"""

import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedblood import data, privacy
from fedblood.algorithms import base
from fedblood.deploy import replies as replies_lib
from fedblood.deploy import site_privacy
from fedblood.deploy import study as study_lib
from fedblood.deploy import wire
from fedblood.model import metrics
from fedblood.reporting import report
from fedblood.rundir import runlog
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import driver, train
from fedblood.study.experiment import STAGE
from fedblood.study.stages import fl as fl_lib
from fedblood.study.stages.reference import reference_stage
from fedblood.deploy.sites import Sites, note  # pylint: disable=unused-import  (server_app: note)


class FederationError(RuntimeError):
  """The federation cannot go on (no site trained a round, or a center never connected)."""


def _reference(config, exp, name: str, workdir: Path):
  if not config.reference.get('restore'):
    raise ValueError('reference.restore is empty: a deployed server holds no images to train '
                     'the reference model on; train it at the reference site (python launch.py) '
                     'and set reference.restore to that workdir or a weights file')
  center = data.Center(name, None, None, None)
  return reference_stage(exp, config.reference, center, workdir, log=None)


class Federation(NamedTuple):
  """The deployed run's federation: the study, its sites and what they send."""
  st: Any                  # study_lib.Study
  sites: Sites
  payload: Callable        # server state -> the request's arrays (server state, frozen params)
  fed: dict                # checkpointed: 'committed' round, 'sizes', 'before' per center
  workdir: Path
  prefetched: dict         # round -> (the server state sent, {node: train reply})


def _connect(fd: Federation, grid, server, start: int, eval_name: str, timeout: float) -> None:
  """Waits until every center is connected (the weights and Nmax need every size)."""
  names, deadline = fd.st.centers, time.time() + timeout
  while True:
    evals = fd.sites.refresh(fd.payload(server) if start == 0 else None,
                             [eval_name] if start == 0 else ())
    for center, ev in evals.items():
      fd.fed['before'].setdefault(center, ev[eval_name]['test'])
    missing = [c for c in names if c not in fd.sites.node_of or (start == 0 and
                                                                  c not in fd.fed['before'])]
    if not missing:
      break
    if time.time() > deadline:
      raise FederationError(f'centers {missing} did not connect within {timeout:.0f} s '
                            f'(nodes seen: {sorted(grid.get_node_ids())})')
    time.sleep(1.0)
  fd.fed['sizes'] = {c: fd.sites.sizes[c] for c in names}


def _trainer(fd: Federation, directory, timeout: float):
  """The driver's ``train_round``: the drawn centers train at their sites, the server steps.

  Round ``r``'s train replies were usually fetched already, with the evaluation of round
  ``r - 1``'s model they carry (:func:`_evaluator`); otherwise they are asked for here.
  """
  names, num, fed = fd.st.centers, len(fd.st.centers), fd.fed
  sizes = jnp.asarray([fed['sizes'][c] for c in names], jnp.int32)
  server_step = study_lib.server_step(fd.st)

  def train_round(r, _, actives, states):
    ((chosen, (server, clients)),) = zip(actives, states)
    replies = fd.prefetched.pop(r, (None, None))
    if replies[0] is not server:  # not fetched with this server state: ask now
      replies = (server, send_train(fd, r, chosen, server, ()))
    outs = _accepted(fd, r, replies[1])
    active = np.asarray([k in outs for k in range(num)])
    note(fd.workdir, f'round {r}: active centers {[c for k, c in enumerate(names) if active[k]]} '
                     f'of {[c for k, c in enumerate(names) if chosen[k]]}')
    if not active.any():  # deploy.log says why for each reply refused or declined
      raise FederationError(f'round {r}: no site trained within {timeout:.0f} s (asked '
                            f'{[c for k, c in enumerate(names) if chosen[k]]}); the last '
                            f'checkpoint is kept in {directory}: rerun to resume')
    first = outs[int(np.argmax(active))]  # inactive centers' outputs are ignored
    server, clients, round_metrics = server_step(
        server, clients, [outs.get(k, first) for k in range(num)], sizes, jnp.asarray(active))
    for k, c in enumerate(names):
      if active[k]:
        fed['committed'][c] = r
    return [(server, clients, round_metrics, active)]

  return train_round


def send_train(fd: Federation, r: int, chosen, server, models) -> dict:
  """Round ``r``'s train requests to the drawn centers' sites; ``{node: reply}``.

  ``models``: the models of ``server`` each site evaluates before it trains (the reply's
  ``eval``), so that one message per site and round carries both.
  """
  names, fed = fd.st.centers, fd.fed
  weights = np.asarray(base.client_weights(jnp.asarray([fed['sizes'][c] for c in names],
                                                       jnp.int32)))
  nmax = int(max(fed['sizes'].values()))
  fd.sites.refresh()
  requests = {fd.sites.node_of[c]: {'center': c, 'index': k, 'round': r, 'nmax': nmax,
                                    'committed': fed['committed'][c],
                                    'weight': float(weights[k]),
                                    'evaluate': json.dumps(list(models))}
              for k, c in enumerate(names) if chosen[k] and c in fd.sites.node_of}
  return fd.sites.send('train', requests, fd.payload(server))


def _accepted(fd: Federation, r: int, replies: dict) -> dict:
  """``{k: outputs}`` of the replies that pass the checks; the others noted and dropped."""
  outs = {}
  for node, reply in replies.items():
    center = fd.sites.center_of(node)
    if reply.content['site']['center'] != center:
      reason = 'answered for another center'
    elif (reason := replies_lib.declined(reply)) is not None:
      note(fd.workdir, f'round {r}: center {center!r} declined to train: {reason}')
      _privacy(fd, r, center, reply)
      continue
    else:
      reason = replies_lib.problem(fd.st, reply)
    if reason:
      note(fd.workdir, f'round {r}: refused the reply of node {node} (center {center!r}): '
                       f'{reason}')
      continue
    outs[fd.st.centers.index(center)] = replies_lib.outputs(fd.st, reply)
    _privacy(fd, r, center, reply)
  return outs


def _privacy(fd: Federation, r: int, center: str, reply) -> None:
  """Keeps (and logs) the epsilon a DP site reports (:mod:`fedblood.deploy.site_privacy`)."""
  if (got := replies_lib.privacy(reply)) is not None:
    fd.fed.setdefault('privacy', {})[center] = got
    note(fd.workdir, f'round {r}: center {center!r} epsilon {got["epsilon"]:.4g} (delta '
                     f'{got["delta"]:g}, {got["steps"]} DP-SGD steps); site total '
                     f'{got["site_epsilon"]:.4g}, budget {got.get("budget")}')


def _evaluator(fd: Federation, run, all_models, final: dict):
  """The driver's ``evaluate``: every connected site evaluates; the last round's kept in final.

  Before the last round, the evaluation rides on the next round's train requests (the sites
  evaluate the model they receive, then train from it; the replies wait in
  ``fd.prefetched``); centers not drawn for it, or whose train reply carried no evaluation,
  are sent an evaluate request, except those that did not answer the train request within
  ``round_timeout`` (a hung site would make the round wait once more, in vain).
  """
  def evaluate(r, server):
    models = all_models if r == run.rounds else [run.eval_name]
    evals, silent = {}, set()
    if r < run.rounds:
      replies = send_train(fd, r + 1, run.draw(r + 1), server, models)
      fd.prefetched[r + 1] = (server, replies)
      evals = fd.sites.evals(replies)
      silent = {fd.sites.center_of(node) for node in fd.sites.unanswered}
    evals.update(fd.sites.evaluate([c for c in fd.st.centers if c not in set(evals) | silent],
                                    fd.payload(server), models))
    if r == run.rounds:
      final.update(evals)
    return {c: (metrics.summary(evals[c][run.eval_name]['test']),
                metrics.summary(evals[c][run.eval_name]['val'])
                if 'val' in evals[c][run.eval_name] else {})
            for c in fd.st.centers if c in evals}
  return evaluate


def _open(config, st, workdir: Path):
  """``(driver.Run, (server, clients), fed, ref_info, frozen)``: restored if checkpointed."""
  names = st.centers
  ref_params, ref_info = _reference(config, st.experiment, names[0], workdir)
  algorithm, _, state, frozen = fl_lib.fl_template(st.experiment, config.fl, ref_params,
                                                   len(names))
  mngr, state, start, meta = driver.open_run(workdir, state, config.checkpoint.keep)
  fed = meta.get('deploy', {'committed': {n: 0 for n in names}, 'sizes': {}, 'before': {}})
  if start:
    note(workdir, f'resuming after round {start} from {mngr.directory}')
  eval_name = driver.eval_model_name(config.fl.get('eval_model', 'server'),
                                     algorithm.eval_params(state['server']))
  part_key = jax.random.fold_in(st.experiment.key, STAGE['participation'])
  fraction = config.fl.get('participation', 1.0)
  ckpt = driver.Checkpoints(mngr, config.checkpoint.get('every', 1), state['rng'],
                            {'centers': list(names), 'eval_model': eval_name,
                             'algorithm': config.fl.algorithm,
                             'params': st.experiment.summary(ref_params)})
  epsilons = ((lambda r: [fed.get('privacy', {}).get(c, {}).get('epsilon') for c in names])
              if privacy.enabled(config.fl) else None)  # each DP site's latest report
  run = driver.Run(tuple(names), config.fl.rounds, start, eval_name, algorithm.eval_params,
                   lambda r: driver.participation(fraction, part_key, r, len(names)), epsilons,
                   ckpt)
  return run, (state['server'], state['clients']), fed, ref_info, frozen


def run(grid, config, workdir, *, connect_timeout: float = 600.0,
        round_timeout: float = 600.0) -> dict:
  """Runs (or resumes) the deployed study in ``workdir``; returns the results dict.

  Raises:
    FederationError: a center did not connect within ``connect_timeout``, or no site
      answered a round within ``round_timeout`` (the last checkpoint stays; rerun to resume).
  """
  workdir = Path(workdir)
  workdir_lib.check_config(config, workdir)
  started = time.time()
  st = study_lib.build(config)
  fl_run, (server, clients), fed, ref_info, frozen = _open(config, st, workdir)
  sites = Sites(grid, st, {'config': wire.config_json(config),
                           'study': wire.study_id(config, workdir)}, workdir, round_timeout)
  sites.sizes = dict(fed['sizes'])
  frozen_rec = wire.to_record(frozen)
  fd = Federation(st, sites, lambda s: {'server': wire.to_record(s), 'frozen': frozen_rec}, fed,
                  workdir, {})
  _connect(fd, grid, server, fl_run.start, fl_run.eval_name, connect_timeout)
  all_models, final = sorted(fl_run.eval_params(server)), {}
  round_started = [time.time()]

  def on_round(_, r, __):
    note(workdir, f'round {r}: done, {time.time() - round_started[0]:.3f} s')
    round_started[0] = time.time()

  (state,) = driver.drive(
      [fl_run], [(server, clients)], _trainer(fd, fl_run.ckpt.mngr.directory, round_timeout),
      [_evaluator(fd, fl_run, all_models, final)],
      [runlog.logger(workdir)], on_round=on_round, extra_meta=lambda: {'deploy': fed})
  selection, selected_server = driver.select(fl_run, state, config.fl.get('select', 'val'))
  fl_run.ckpt.mngr.close()
  if not final:  # resumed after the last round: evaluate it again
    final = sites.evaluate(st.centers, fd.payload(state[0]), all_models)
  selected = final
  if selection['round'] != selection['last_round']:  # Table 2's round: every site evaluates it
    note(workdir, f'Table 2 reports round {selection["round"]} (fl.select)')
    selected = sites.evaluate(st.centers, fd.payload(selected_server), all_models)
  return _finish(config, fd, (selected, final), all_models, fl_run.eval_name, ref_info,
                 selection, started)


def _finish(config, fd: Federation, evals, all_models, eval_name, ref_info, selection,
            started) -> dict:
  """Writes results.json and report.md from ``evals`` = ``(selected, last)``: the sites'
  ``{center: {model: {'test', 'val'}}}`` of Table 2's round (``selection``) and of the last."""
  names, workdir = fd.st.centers, fd.workdir
  missing = sorted({c for final in evals for c in names if c not in final})
  if missing:
    raise FederationError(f'centers {missing} did not evaluate the final model; rerun to retry')
  selected, last = evals
  after_models = {m: {c: selected[c][m]['test'] for c in names} for m in all_models}
  results = train.study_results(config.get('title', 'fedblood run'), config.fl.algorithm,
                          config.fl.rounds, list(names), fd.fed['before'], after_models,
                          eval_name, {}, ref_info, fd.fed['sizes'],
                          after_last={c: last[c][eval_name]['test'] for c in names},
                          selection=selection)
  results['deployment'] = {'nodes': {c: int(n) for c, n in fd.sites.node_of.items()}}
  if privacy.enabled(config.fl):
    results['privacy'] = site_privacy.summary(config.fl, fd.fed.get('privacy', {}))
  workdir_lib.write_results(workdir, results, {'total_s': time.time() - started})
  report.write_report(workdir, {**results, 'wall_time_s': time.time() - started})
  runlog.close(workdir)
  note(workdir, f'done: {workdir / "report.md"}')
  return results
