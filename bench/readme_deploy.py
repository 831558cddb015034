r"""README's "Run across hospitals" section, run verbatim in a fresh virtualenv.

  python bench/readme_deploy.py            # refuses if any of the section's /tmp paths exists
  python bench/readme_deploy.py --clean    # removes them first (/tmp/fb-*, /tmp/fedblood-demo)

What it does: clones this repository's HEAD into a temporary folder, makes a new virtualenv
there (``python -m venv``; nothing of this Python's packages), puts its ``bin`` first on
``PATH`` as ``activate`` would, and runs every ``bash`` block of the section, in order, as one
bash script (``set -e``: a failing command fails the run) from the clone's root. Then it checks
what the section promises: the study finished, ``/tmp/fb-server/report.md`` exists, and the
federated model's mean accuracy over the external centers is above the reference model's.
Every process the section started is stopped at the end (its process group, and each site's
warm worker). Prints the time of each block and one JSON line.

Needs the package index (or a pip cache / wheelhouse pip is configured for) and the free
ports the section names (9092, 9095-9098). Takes ~10 minutes on 2 CPU cores, most of it the
install and the main job.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = '## Run across hospitals'
PATHS = ['/tmp/fb-*', '/tmp/fedblood-demo']


def blocks(readme: str) -> list[str]:
  """The ``bash`` blocks of the README's deployment section, in order."""
  start = readme.index(SECTION)
  end = readme.find('\n## ', start + len(SECTION))
  section = readme[start:end if end > 0 else None]
  return re.findall(r'```bash\n(.*?)```', section, flags=re.S)


def script(parts: list[str]) -> str:
  """One bash script running ``parts`` in order, each timed on stderr."""
  out = ['set -eo pipefail']
  for k, part in enumerate(parts):
    out += [f'echo "readme_deploy: block {k} starts $(date +%s.%N)" >&2', part.rstrip(),
            f'echo "readme_deploy: block {k} ends $(date +%s.%N)" >&2']
  return '\n'.join(out) + '\n'


def stop(proc: subprocess.Popen) -> None:
  """Stops the script's process group and every site's warm worker."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  sys.path.insert(0, str(REPO))
  from fedblood.deploy import local  # pylint: disable=g-import-not-at-top
  for state in glob.glob('/tmp/fb-site-*'):
    local.kill_worker(Path(state))


def external_means(results: dict) -> tuple[float, float]:
  """The external centers' mean accuracy before and after FL, from results.json."""
  reference = results['reference']
  before = [m['accuracy'] for c, m in results['before'].items() if c != reference]
  after = [m['accuracy'] for c, m in results['after'].items() if c != reference]
  return sum(before) / len(before), sum(after) / len(after)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--clean', action='store_true', help=f'remove {PATHS} first')
  parser.add_argument('--timeout', type=float, default=3600.0)
  args = parser.parse_args()
  found = [p for pattern in PATHS for p in glob.glob(pattern)]
  if found and not args.clean:
    sys.exit(f'readme_deploy: error: {found[:4]} exist (the section writes there); --clean '
             'removes them')
  for path in found:
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
  parts = blocks((REPO / 'README.md').read_text())
  root = Path(tempfile.mkdtemp(prefix='readme_deploy_'))
  clone = root / 'fedblood'
  subprocess.run(['git', 'clone', '-q', str(REPO), str(clone)], check=True)
  venv = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  env.update(VIRTUAL_ENV=str(venv), PATH=f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}')
  (root / 'readme.sh').write_text(script(parts))
  t0 = time.time()
  with open(root / 'readme.log', 'w') as log:
    proc = subprocess.Popen(['bash', str(root / 'readme.sh')], cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
      rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
      rc = 'timeout'
    finally:
      stop(proc)
  text = (root / 'readme.log').read_text()
  marks = {(int(k), e): float(t) for k, e, t in
           re.findall(r'readme_deploy: block (\d+) (starts|ends) ([0-9.]+)', text)}
  times = [round(marks[(k, 'ends')] - marks[(k, 'starts')], 1) for k in range(len(parts))
           if (k, 'ends') in marks]
  print(f'{len(parts)} blocks, {len(times)} ran to their end, seconds each: {times}')
  results = Path('/tmp/fb-server/results.json')
  if rc != 0 or not results.exists() or not Path('/tmp/fb-server/report.md').exists():
    print(text[-4000:])
    sys.exit(f'readme_deploy: the section failed (exit {rc}); log: {root / "readme.log"}')
  before, after = external_means(json.loads(results.read_text()))
  print(f'external centers, mean accuracy: {100 * before:.1f}% before FL, {100 * after:.1f}% after')
  print(json.dumps({'bench': 'readme_deploy', 'blocks_s': times, 'total_s': time.time() - t0,
                    'external_before': before, 'external_after': after}))
  if not after > before:
    sys.exit('readme_deploy: FL did not raise the external mean: the example shows nothing')
  shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
