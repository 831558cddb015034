"""The deployed study's server loop: the simulation's rounds, with sites answering over Flower.

:func:`run` does what :func:`fedblood.stages.fl.fl_stage` does, with the centers' local updates
computed at the sites (:mod:`fedblood.deploy.site`) and every other step the simulation's:

* the reference model comes from ``reference.restore`` (a deployed server has no images to
  train one; train it at the reference site with ``launch.py`` and pass its workdir);
  the sites evaluate it on their test splits when they connect (Table 1);
* round ``r``: the centers ``fl.participation`` draws are sent the server state; the
  replies that arrive within ``round_timeout`` and pass :func:`fedblood.deploy.wire.check_tree`
  (shapes, dtypes, finite values) are the round's active clients; the simulation's own
  jitted server step (``execution='loop'``) aggregates them with weights ``n_k / sum(n) * C``
  from the sizes the sites reported. Every connected site then evaluates the new model,
  the rows go to ``metrics.jsonl`` and the round is checkpointed (Orbax, the simulation's
  layout plus the sites' sizes, Table 1 and each center's last accepted round);
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

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedblood import checkpoint, data, metrics, report, runlog, train
from fedblood import workdir as workdir_lib
from fedblood.experiment import STAGE
from fedblood.stages import fl as fl_lib
from fedblood.stages.reference import reference_stage
from fedblood.algorithms import base
from fedblood.deploy import study as study_lib
from fedblood.deploy import wire


class FederationError(RuntimeError):
  """The federation cannot go on (no site answered, or a center never connected)."""


def note(workdir: Path, text: str) -> None:
  """A line in ``deploy.log`` and on stdout (Flower streams it to ``flwr run --stream``)."""
  now = time.time()
  stamp = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now)) + f'.{int(now % 1 * 1000):03d}Z'
  line = f'{stamp} {text}'
  print(f'fedblood: {text}', flush=True)
  with open(workdir / 'deploy.log', 'a') as f:
    f.write(line + '\n')


class Sites:
  """Which node answers for which center; asks new nodes who they are."""

  def __init__(self, grid, st, base_request: dict, workdir: Path, timeout: float):
    self.grid, self.st, self.base, self.workdir, self.timeout = (
        grid, st, base_request, workdir, timeout)
    self.node_of, self.sizes = {}, {}

  def center_of(self, node_id):
    return {n: c for c, n in self.node_of.items()}.get(node_id)

  def send(self, kind: str, payloads: dict, content: dict) -> dict:
    """Sends ``kind`` to ``{node_id: request fields}``; returns ``{node_id: reply}`` (no errors)."""
    msgs = [Message(RecordDict({'request': ConfigRecord({**self.base, **fields}), **content}),
                    dst_node_id=node, message_type=kind, ttl=self.timeout)
            for node, fields in payloads.items()]
    replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout)) if msgs else []
    # An error the SuperLink writes (e.g. the node stopped its heartbeat) comes from the
    # SuperLink, not the node: name the node the request went to.
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    out = {}
    for reply in replies:
      node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
      who = f'node {node} (center {self.center_of(node)!r})'
      if reply.has_error():
        note(self.workdir, f'{kind}: {who} failed: {reply.error.reason}')
      elif 'site' not in reply.content:
        note(self.workdir, f'{kind}: refused the reply of {who}: no site record')
      else:
        out[node] = reply
    return out

  def refresh(self, content: dict | None = None, models=()) -> dict:
    """Asks nodes not yet known for their center; returns ``{center: eval JSON}`` if asked."""
    ids = set(self.grid.get_node_ids())
    self.node_of = {c: n for c, n in self.node_of.items() if n in ids}
    new = ids - set(self.node_of.values())
    fields = {'evaluate': json.dumps(list(models))}
    replies = self.send('query', {n: fields for n in new}, content or {})
    evals = {}
    for node, reply in replies.items():
      site = dict(reply.content['site'])
      center, size = site.get('center'), site.get('train_size')
      if center not in self.st.centers:
        note(self.workdir, f'query: refused node {node}: center {center!r} is not in the study '
                           f'{self.st.centers}')
        continue
      if self.sizes.get(center, size) != size:
        note(self.workdir, f'query: refused node {node} for center {center!r}: it reports '
                           f'{size} training images, the study has {self.sizes[center]}')
        continue
      if center in self.node_of and self.node_of[center] in ids:
        note(self.workdir, f'query: refused node {node} for center {center!r}: node '
                           f'{self.node_of[center]} answers for it and is still connected')
        continue
      self.node_of[center], self.sizes[center] = node, int(size)
      note(self.workdir, f'node {node} is center {center!r} ({size} training images)')
      if 'eval' in reply.content:
        evals[center] = json.loads(reply.content['eval']['json'])
    return evals


def _reference(config, exp, name: str, workdir: Path):
  if not config.reference.get('restore'):
    raise ValueError('reference.restore is empty: a deployed server holds no images to train '
                     'the reference model on; train it at the reference site (python launch.py) '
                     'and set reference.restore to that workdir or a weights file')
  center = data.Center(name, None, None, None)
  return reference_stage(exp, config.reference, center, workdir, log=None)


def _check_reply(st, reply) -> str | None:
  content = reply.content
  for name, template in (('params', st.trainable), ('state', st.client)):
    reason = wire.check_tree(content.get(name), template, name)
    if reason:
      return reason
  record = content.get('train')
  if record is None:
    return 'train metrics: missing'
  values = dict(record)
  if not all(np.isfinite(float(v)) for v in values.values()):
    return f'train metrics: non-finite values {values}'
  return None


def _outputs(st, reply) -> tuple:
  values = dict(reply.content['train'])
  round_metrics = {m: (np.int32 if m == 'num_steps' else np.float32)(v)
                   for m, v in values.items() if m != 'num-examples'}
  return (wire.from_record(reply.content['params'], st.trainable),
          wire.from_record(reply.content['state'], st.client), round_metrics)


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
  names, num = st.centers, len(st.centers)
  ref_params, ref_info = _reference(config, st.experiment, names[0], workdir)
  algorithm, _, state, frozen = fl_lib.fl_template(st.experiment, config.fl, ref_params, num)
  mngr = checkpoint.manager(workdir_lib.checkpoints(workdir, workdir_lib.FL),
                            keep=config.checkpoint.keep)
  start, fed = 0, {'committed': {n: 0 for n in names}, 'sizes': {}, 'before': {}}
  if mngr.latest_step() is not None:
    state, meta = checkpoint.restore(mngr, state)
    start, fed = meta['round'], meta['deploy']
    note(workdir, f'resuming after round {start} from {mngr.directory}')
  runlog.truncate(workdir, 'fl', start)
  log = runlog.logger(workdir)
  server_step = study_lib.server_step(st)
  server, clients = state['server'], state['clients']
  eval_name = fl_lib.eval_model_name(config.fl, algorithm.eval_params(server))
  all_models = sorted(algorithm.eval_params(server))
  sites = Sites(grid, st, {'config': wire.config_json(config),
                           'study': wire.study_id(config, workdir)}, workdir, round_timeout)
  sites.sizes = dict(fed['sizes'])
  frozen_rec = wire.to_record(frozen)
  payload = lambda s: {'server': wire.to_record(s), 'frozen': frozen_rec}

  deadline = time.time() + connect_timeout
  while True:  # every center must connect: the weights and Nmax need every size
    evals = sites.refresh(payload(server) if start == 0 else None,
                          [eval_name] if start == 0 else ())
    for center, ev in evals.items():
      fed['before'].setdefault(center, ev[eval_name]['test'])
    missing = [c for c in names if c not in sites.node_of or (start == 0 and
                                                               c not in fed['before'])]
    if not missing:
      break
    if time.time() > deadline:
      raise FederationError(f'centers {missing} did not connect within {connect_timeout:.0f} s '
                            f'(nodes seen: {sorted(grid.get_node_ids())})')
    time.sleep(1.0)
  fed['sizes'] = {c: sites.sizes[c] for c in names}
  sizes = jnp.asarray([fed['sizes'][c] for c in names], jnp.int32)
  weights = np.asarray(base.client_weights(sizes))
  nmax = int(max(fed['sizes'].values()))
  part_key = jax.random.fold_in(st.experiment.key, STAGE['participation'])
  summary = st.experiment.summary(ref_params)
  final = None
  for r in range(start + 1, config.fl.rounds + 1):
    round_started = time.time()
    sites.refresh()
    chosen = fl_lib.participation(config.fl, part_key, r, num)
    requests = {sites.node_of[c]: {'center': c, 'index': k, 'round': r, 'nmax': nmax,
                                   'committed': fed['committed'][c], 'weight': float(weights[k]),
                                   'evaluate': '[]'}
                for k, c in enumerate(names) if chosen[k] and c in sites.node_of}
    replies = sites.send('train', requests, payload(server))
    outs, active = {}, np.zeros(num, bool)
    for node, reply in replies.items():
      center = sites.center_of(node)
      reason = _check_reply(st, reply) or (
          None if reply.content['site']['center'] == center else 'answered for another center')
      if reason:
        note(workdir, f'round {r}: refused the reply of node {node} (center {center!r}): {reason}')
        continue
      k = names.index(center)
      outs[k], active[k] = _outputs(st, reply), True
    note(workdir, f'round {r}: active centers {[c for k, c in enumerate(names) if active[k]]} '
                  f'of {[c for k, c in enumerate(names) if chosen[k]]}')
    if not active.any():
      raise FederationError(f'round {r}: no site answered within {round_timeout:.0f} s (asked '
                            f'{sorted(requests)}); the last checkpoint is kept in '
                            f'{mngr.directory}: rerun to resume')
    first = outs[int(np.argmax(active))]  # inactive centers' outputs are ignored
    server, clients, round_metrics = server_step(
        server, clients, [outs.get(k, first) for k in range(num)], sizes, jnp.asarray(active))
    params = algorithm.eval_params(server)[eval_name]
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)):
      raise FloatingPointError(f'round {r}: the {eval_name} model has non-finite parameters')
    for k, c in enumerate(names):
      if active[k]:
        fed['committed'][c] = r
    models = all_models if r == config.fl.rounds else [eval_name]
    evals = _evaluate(sites, names, server, payload, models)
    losses, accs = np.asarray(round_metrics['loss']), np.asarray(round_metrics['accuracy'])
    rows = []
    for k, c in enumerate(names):
      if c in evals:
        ev = evals[c][eval_name]
        rows.append(fl_lib.fl_row(r, c, eval_name, active[k], losses[k], accs[k],
                                 metrics.summary(ev['test']),
                                 metrics.summary(ev['val']) if 'val' in ev else {}))
    for row in rows:
      log(row)
    val = [row['val_accuracy'] for row in rows if 'val_accuracy' in row]
    checkpoint.save(mngr, r, {'server': server, 'clients': clients, 'rng': state['rng']},
                    {'kind': 'round', 'round': r, 'centers': list(names), 'eval_model': eval_name,
                     'algorithm': config.fl.algorithm, 'deploy': fed, 'params': summary,
                     'metrics': {'val_accuracy': float(np.mean(val)) if val else None,
                                 'test_accuracy': float(np.mean([w['accuracy'] for w in rows])),
                                 'loss': float(np.mean(losses[active]))}})
    note(workdir, f'round {r}: checkpointed, {time.time() - round_started:.3f} s')
    if r == config.fl.rounds:
      final = evals
  mngr.close()
  if final is None:  # resumed after the last round: evaluate it again
    final = _evaluate(sites, names, server, payload, all_models)
  missing = [c for c in names if c not in final]
  if missing:
    raise FederationError(f'centers {missing} did not evaluate the final model; rerun to retry')
  after_models = {m: {c: final[c][m]['test'] for c in names} for m in all_models}
  results = train.study_results(config, list(names), fed['before'], after_models, eval_name, {},
                                ref_info, fed['sizes'])
  results['deployment'] = {'nodes': {c: int(n) for c, n in sites.node_of.items()}}
  workdir_lib.write_results(workdir, results, {'total_s': time.time() - started})
  report.write_report(workdir, {**results, 'wall_time_s': time.time() - started})
  runlog.close(workdir)
  note(workdir, f'done: {workdir / "report.md"}')
  return results


def _evaluate(sites, names, server, payload, models) -> dict:
  """``{center: {model: {split: metrics}}}`` from every connected site."""
  requests = {sites.node_of[c]: {'center': c, 'evaluate': json.dumps(list(models))}
              for c in names if c in sites.node_of}
  replies = sites.send('evaluate', requests, payload(server))
  return {sites.center_of(n): json.loads(rep.content['eval']['json'])
          for n, rep in replies.items() if 'eval' in rep.content}
