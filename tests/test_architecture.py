"""The shape of the code, read from its source (AST, nothing imported): no import cycle among
fedblood's modules, every subpackage importing only the layers below it, no module over 300
lines, no long function where it is not explained, and a top level of at most a dozen modules.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'fedblood'
MAX_FUNCTION_LINES = 60
# A function may run longer when its docstring says why, with these words.
LONG_MARK = 'longer than 60 lines because'
MAX_MODULE_LINES = 300
MAX_TOP_LEVEL_MODULES = 12
# fedblood's top-level modules and subpackages, bottom up: each imports only those before it
# (README, "Where things are"). The package's own __init__ (XLA flags) is not a layer.
LAYERS = ('labels', 'names', 'stats', 'backend', 'data', 'model', 'algorithms', 'privacy', 'core',
          'rundir', 'reporting', 'study', 'deploy')


def _module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(name: str, path: Path, modules: dict) -> set:
  """fedblood modules ``name`` imports anywhere in its file (function-level imports too)."""
  is_package = path.name == '__init__.py'
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the module's package
        anchor = name.split('.')
        anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
        base = '.'.join(anchor + ([base] if base else []))
      for alias in node.names:
        full = f'{base}.{alias.name}'
        out.add(full if full in modules else base)
  return {m for m in out if m in modules and m != name}


def import_graph() -> dict:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict) -> list:
  """Strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_import_graph_is_read():
  graph = import_graph()
  assert 'fedblood.algorithms.base' in graph['fedblood.algorithms.fed_dyn']
  assert 'fedblood.algorithms.base' in graph['fedblood.algorithms.dp_fedavg']
  assert 'fedblood.study.validate' in graph['fedblood.study.train']


def test_no_import_cycle_among_fedblood_modules():
  # A package's __init__ importing its own modules is not a cycle by itself (nothing imports
  # back up), so every strongly connected component of the graph is one.
  assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def _long_functions(path: Path) -> list:
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      lines = node.end_lineno - node.lineno + 1
      if lines > MAX_FUNCTION_LINES and LONG_MARK not in (ast.get_docstring(node) or ''):
        out.append(f'{path.name}:{node.lineno} {node.name} ({lines} lines)')
  return out



def _sources() -> list:
  return [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob('*.py'))]


@pytest.mark.parametrize('relative', _sources())
def test_no_function_over_60_lines_unless_its_docstring_says_why(relative):
  assert _long_functions(PACKAGE / relative) == []


@pytest.mark.parametrize('relative', _sources())
def test_no_module_over_300_lines(relative):
  assert (PACKAGE / relative).read_text().count('\n') <= MAX_MODULE_LINES


def test_the_length_checks_see_a_long_function(tmp_path):
  body = '\n'.join(f'  x{i} = {i}' for i in range(MAX_FUNCTION_LINES))
  (tmp_path / 'long.py').write_text(f'def long():\n{body}\n')
  (tmp_path / 'told.py').write_text(f'def told():\n  """{LONG_MARK} it says so."""\n{body}\n')
  assert len(_long_functions(tmp_path / 'long.py')) == 1
  assert _long_functions(tmp_path / 'told.py') == []


def test_top_level_holds_at_most_a_dozen_modules():
  top = [p.name for p in PACKAGE.glob('*.py') if p.name != '__init__.py']
  assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def layer_of(module: str) -> str | None:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict) -> list:
  """``importer -> imported`` arrows from a layer to the same or a later one in LAYERS."""
  out = []
  for importer, imported in graph.items():
    low = layer_of(importer)
    if low is None:  # fedblood/__init__.py
      continue
    for target in imported:
      high = layer_of(target)
      if high is not None and high != low and LAYERS.index(high) > LAYERS.index(low):
        out.append(f'{importer} -> {target}')
  return sorted(out)


def test_every_top_level_entry_is_a_layer():
  entries = {p.stem for p in PACKAGE.iterdir()
             if (p.suffix == '.py' and p.name != '__init__.py')
             or (p.is_dir() and (p / '__init__.py').exists())}
  assert entries == set(LAYERS)


def test_each_layer_imports_only_the_layers_below_it():
  assert upward_imports(import_graph()) == []


def test_the_layer_check_sees_an_upward_import():
  graph = {'fedblood.data.loader': {'fedblood.study.train'}, 'fedblood.study.train': set()}
  assert upward_imports(graph) == ['fedblood.data.loader -> fedblood.study.train']
