"""A centralized fit's validation (every epoch): how its images are chunked, and kept features.

Usage (prints a table, then one JSON line; --out also writes the JSON)::

  python bench/bench_val.py          # configs/wbc.py's model (VGG16 gap, width 1/8, 64 px,
                                     # test-time averaging over 8 views) on fold 0's sizes
  python bench/bench_val.py --tiny   # smoke check: 32 px, width 1/16, small sets

Each fit of the CPU study validates every epoch (about 190 epochs in a fold with every
baseline), under ``model.tta`` on 8 views of each image. One epoch's validation of each set of
configs/wbc.py's fold 0 (PBC 225, LISC 52, JTSC 44, BCCD 38 images; the pooled fits' 359), on
the same random uint8 images and parameters, by three candidates:

- ``chunk128``: every chunk padded to ``eval.batch_size`` = 128 images, the last one too (how a
  fit validated before): a center's 38 images ran as 1024 views;
- ``multiple16``: ``centralized.FitModel.validator``: the last chunk padded to a multiple of 16
  (``classifier.CHUNK_MULTIPLE``), the network whole (what a fit that trains every block runs);
- ``kept``: ``Experiment.validator`` with blocks 1..3 frozen: their features computed once, each
  epoch runs blocks 4-5 and the head (what the baselines from the reference run);
- ``step16``: ``multiple16`` in steps of 16 images instead of 128 (configs/wbc.py's
  ``eval.batch_size`` since docs/performance.md decision 10).

The first three run at ``eval.batch_size`` = 128, the step the padding rule was compared at.

Timed INTERLEAVED after a warm-up (``bench_step.interleaved``), medians compared, so the load of
a shared machine hits all alike. The three give the same metrics (checked here too).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/

import bench_eval  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_step  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_sweep  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
# pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood.model import metrics  # noqa: E402
from fedblood.study import centralized, experiment  # noqa: E402

# configs/wbc.py's fold 0: validation images per center (PBC first), and the pooled fits' set.
WBC_VAL = {'pbc_barcelona': 225, 'lisc_tehran': 52, 'jtsc_jiangxi_tecom': 44, 'bccd': 38,
           'pooled (4 centers)': 359}


def chunk128(exp, frozen, split):
  """The validation as a fit ran it before: the images padded to whole chunks of 128."""
  pad = np.zeros((-len(split.labels) % exp.eval_batch,) + split.images.shape[1:], np.uint8)
  images = np.concatenate([split.images, pad])

  def validate(trainable):
    probs = centralized.predict_probs(exp.model, trainable, frozen, images, exp.eval_batch)
    val = metrics.classify(split.labels, probs[:len(split.labels)].argmax(-1))
    return val, metrics.summary(val)

  return validate


def main(argv=None):
  args = bench_eval.parse_args(argv, __doc__, 'small sets', steps=5)
  config = bench_eval.wbc_config(args.tiny)
  config.eval.batch_size = 128  # the padding rule's comparison (decision 8); step16 is decision 10
  sizes = WBC_VAL
  if args.tiny:
    args.steps, sizes = 1, {'a': 20, 'b': 9}
  config.lock()
  exp = experiment.build(config)
  px = config.data.image_size
  rng = np.random.default_rng(0)
  trainable, frozen = exp.split(exp.init())
  rows, secs_all = [], {}
  for name, n in sizes.items():
    split = bench_eval.random_split(rng, n, px)
    validators = {
        'chunk128': chunk128(exp, frozen, split),
        'multiple16': centralized.FitModel(exp.model, eval_batch=exp.eval_batch).validator(
            frozen, split),
        'kept': exp.validator(frozen, split),
        'step16': centralized.FitModel(exp.model, eval_batch=16).validator(frozen, split),
    }
    results = {k: v(trainable) for k, v in validators.items()}
    same = all(r == results['chunk128'] for r in results.values())
    secs = bench_step.interleaved({k: (lambda v=v: v(trainable)) for k, v in validators.items()},
                                  args.steps)
    secs_all[name] = secs
    rows.append((name, n, secs, same))
  print(f'{px} px, width {config.model.width}, model.tta={config.model.tta}, frozen '
        f'{config.model.frozen_blocks}, eval.batch_size {exp.eval_batch}; {args.steps} timed '
        'calls each')
  print('| validation set | images | chunk128 s | multiple16 s | kept s | step16 s '
        '| chunk128 / multiple16 | chunk128 / kept | multiple16 / step16 | same metrics |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for name, n, secs, same in rows:
    print(f"| {name} | {n} | {secs['chunk128']:.3f} | {secs['multiple16']:.3f} | "
          f"{secs['kept']:.3f} | {secs['step16']:.3f} | "
          f"{secs['chunk128'] / secs['multiple16']:.2f}x | {secs['chunk128'] / secs['kept']:.2f}x | "
          f"{secs['multiple16'] / secs['step16']:.2f}x | {same} |")
  bench_step.emit_record({'bench': 'val', 'secs': secs_all, 'sizes': sizes,
                          'same': all(r[3] for r in rows), **bench_sweep.machine()}, args.out)


if __name__ == '__main__':
  main()
