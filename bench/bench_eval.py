"""The FL stage's per-round evaluation, with and without the frozen blocks' features kept.

Usage (prints a table, then one JSON line; --out also writes the JSON)::

  python bench/bench_eval.py          # configs/wbc.py's model (VGG16 gap, width 1/8, 64 px,
                                      # frozen 3, FedDyn) on the CPU study's split sizes
  python bench/bench_eval.py --tiny   # smoke check: 32 px, few images

Every round, the FL stage evaluates the global model on every center's validation and test
images (849 in the CPU study's fold 0), while blocks 1..``model.frozen_blocks`` never change.
Candidates, each one call per round on the same random uint8 images and parameters:

- ``whole``: the network in one piece over the images (``centralized.predict_probs``, what the
  FL stage ran before features were kept);
- ``halves``: the two compiled halves (:func:`fedblood.model.classifier.make_trunk`, then
  ``make_rest``), the frozen blocks recomputed (``Experiment.prepare(max_bytes=0)``);
- ``kept``: ``Experiment.prepare``'s kept features, only the blocks after the frozen ones run;
- ``round``: one simulated FedDyn round (every center's local epoch), for the share of the
  evaluation in a round.

Timed INTERLEAVED after a warm-up (``bench_step.interleaved``), medians compared, so the load of
a shared machine hits all alike.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/

import bench_step  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_sweep  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from configs import wbc  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
# pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood import data  # noqa: E402
from fedblood.core import simulate  # noqa: E402
from fedblood.study import centralized, experiment  # noqa: E402
from fedblood.study.stages import fl  # noqa: E402

# The CPU study's fold 0 (configs/wbc.py): (train, val, test) images per center, PBC first.
WBC_SPLITS = ((971, 225, 301), (227, 52, 72), (192, 44, 63), (166, 38, 54))


def parse_args(argv=None, doc: str = __doc__, tiny: str = '3 small centers', steps: int = 10):
  """``--tiny`` (32 px, width 1/16, ``tiny``), ``--steps``, ``--out`` of a benchmark on ``doc``."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--tiny', action='store_true', help=f'32 px, width 1/16, {tiny}')
  parser.add_argument('--steps', type=int, default=steps, help='timed calls of each candidate')
  parser.add_argument('--out', default=None, help='also write the JSON record here')
  return parser.parse_args(argv)


def wbc_config(tiny: bool):
  """configs/wbc.py's config, unlocked; ``tiny``: 32 px and width 1/16 (a smoke check)."""
  config = wbc.get_config()
  config.unlock()
  if tiny:
    config.data.image_size, config.model.width = 32, 1 / 16
  return config


def random_split(rng, n: int, px: int) -> data.Split:
  """``n`` random uint8 ``px``-pixel images with random labels of the 5 classes."""
  return data.Split(rng.integers(0, 256, (n, px, px, 3), np.uint8),
                    rng.integers(0, 5, n).astype(np.int32), np.array([''] * n))


def main(argv=None):
  args = parse_args(argv)
  config = wbc_config(args.tiny)
  sizes = WBC_SPLITS
  if args.tiny:
    args.steps, sizes = 1, ((24, 10, 12), (12, 5, 6), (8, 4, 5))
  config.fl.rounds = 1
  config.lock()
  exp = experiment.build(config)
  px = config.data.image_size
  rng = np.random.default_rng(0)
  centers = [[random_split(rng, n, px) for n in s] for s in sizes]
  evals = [c[2] for c in centers] + [c[1] for c in centers]  # tests, then vals: as fl.evaluator
  params = exp.init()
  _, round_fn, state, frozen = fl.fl_template(exp, config.fl, params, len(centers))
  trainable = exp.split(params)[0]  # the global model round 1 starts from
  sim = simulate.pad_centers([c[0] for c in centers])
  key, active = jax.random.key(1), jnp.ones(len(centers), bool)
  kept = exp.prepare(frozen, evals)
  images = np.concatenate([s.images for s in evals])

  held = [state['server'], state['clients']]  # the round donates its state: carry it on

  def run_round():
    *held[:], _ = round_fn(*held, frozen, sim, active, key, jnp.int32(1))
    jax.block_until_ready(held)

  candidates = {
      'whole': lambda: centralized.predict_probs(exp.model, trainable, frozen, images,
                                                 exp.eval_batch),
      'halves': lambda: exp.predict_prepared(trainable, frozen,
                                             exp.prepare(frozen, evals, max_bytes=0)),
      'kept': lambda: exp.predict_prepared(trainable, frozen, kept),
      'round': run_round,
  }
  secs = bench_step.interleaved(candidates, args.steps)
  diff = float(np.abs(candidates['kept']() - candidates['whole']()).max())
  n_eval, n_train = len(images), sum(s[0] for s in sizes)
  print(f'{n_eval} evaluation images, {n_train} training images a round, {px} px, width '
        f'{config.model.width}, frozen {config.model.frozen_blocks}; {args.steps} timed calls each')
  print('| candidate | s per call | vs whole | round + it, vs round + whole |')
  print('|---|---|---|---|')
  for name in ('whole', 'halves', 'kept'):
    print(f"| {name} | {secs[name]:.3f} | {secs['whole'] / secs[name]:.2f}x | "
          f"{(secs['round'] + secs['whole']) / (secs['round'] + secs[name]):.2f}x |")
  print(f"| round | {secs['round']:.3f} | | |")
  print(f'largest |kept - whole| probability: {diff:.2e}')
  bench_step.emit_record({'bench': 'eval', 'secs': secs, 'eval_images': n_eval,
                          'train_images': n_train, 'max_abs_diff': diff,
                          **bench_sweep.machine()}, args.out)


if __name__ == '__main__':
  main()
