"""The package's layer contract: imports go one way, down the layer order, and never in a loop.

Read from the source with `ast` (nothing is imported). A module of layer i may import modules of
layers below i and modules of its own package; two packages of one layer never import each other.
An import inside a function is allowed only for an optional heavy dependency, and says why on its
line: TensorFlow (the data layer), torch, oneDNN (contrib).
"""

import ast
import pathlib
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'diffusion_jax'

# Bottom to top; a name is a subpackage (folder) or a top-level module of diffusion_jax.
LAYERS = (
    ('config', 'images'),
    ('parallel',),
    ('contrib',),
    ('nn', 'data'),
    ('processes',),
    ('sampling',),
    ('objectives',),
    ('pipelines',),
    ('training',),
    ('interop',),
    ('evaluation', 'serving'),
    ('modes',),
    ('api', 'convert', 'fid', '__init__'),
)
# Function-local imports of these are allowed (optional or heavy: oneDNN's C++ build,
# TensorFlow), each with a comment on its line or the line above saying why.
LAZY_ALLOWED = ('diffusion_jax.contrib', 'diffusion_jax.data')
LAZY_THIRD_PARTY = ('tensorflow', 'tensorflow_datasets', 'torch', 'safetensors', 'sklearn')


def _component(module: str) -> str:
  """'diffusion_jax.training.loop' -> 'training'; 'diffusion_jax' -> '__init__'."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else '__init__'


def _layer_of(component: str) -> int:
  for i, names in enumerate(LAYERS):
    if component in names:
      return i
  raise AssertionError(f'{component!r} is in no layer of tests/test_layers.py LAYERS: add it.')


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  relative = path.relative_to(root.parent).with_suffix('')
  parts = list(relative.parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _imports(path: pathlib.Path, root: pathlib.Path):
  """(imported diffusion_jax module, line, inside a function, line text and the one above) of a
  file. `from pkg import name` counts as pkg.name when that is a module, else as pkg."""
  source = path.read_text()
  lines = source.splitlines()
  tree = ast.parse(source)
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
        targets = []
        for alias in child.names:
          candidate = f'{child.module}.{alias.name}'
          as_path = root.parent / pathlib.Path(*candidate.split('.'))
          is_module = as_path.with_suffix('.py').exists() or (as_path / '__init__.py').exists()
          targets.append(candidate if is_module else child.module)
        for target in targets:
          out.append((target, child.lineno, in_function, _context(lines, child.lineno)))
      elif isinstance(child, ast.Import):
        for alias in child.names:
          out.append((alias.name, child.lineno, in_function, _context(lines, child.lineno)))
      visit(child, local)

  visit(tree, False)
  return out


def _context(lines, lineno):
  return '\n'.join(lines[max(lineno - 2, 0):lineno])


def check_package(root: pathlib.Path):
  """Every violation of the contract in the package at `root`, as readable lines."""
  errors, graph = [], {}
  for path in sorted(root.rglob('*.py')):
    module = _module_name(path, root)
    component = _component(module)
    layer = _layer_of(component)
    edges = graph.setdefault(module, set())
    for target, lineno, in_function, context in _imports(path, root):
      where = f'{path.relative_to(root.parent)}:{lineno}'
      top = target.split('.')[0]
      if in_function and top != root.name and top in LAZY_THIRD_PARTY and '#' not in context:
        errors.append(f'{where}: the function-local import of {target} needs a comment saying '
                      'why it is not at the top of the file.')
      if top != root.name:
        continue
      edges.add(target)
      other = _component(target)
      if in_function:
        if not target.startswith(LAZY_ALLOWED):
          errors.append(f'{where}: {target} is imported inside a function; import it at the top '
                        f'(only {LAZY_ALLOWED} may be imported lazily, being heavy or optional).')
        elif '#' not in context:
          errors.append(f'{where}: the function-local import of {target} needs a comment saying '
                        'why.')
      if other == component:
        continue
      other_layer = _layer_of(other)
      if other_layer > layer:
        errors.append(f'{where}: {module} (layer {layer}, {component}) imports {target} (layer '
                      f'{other_layer}, {other}), which is above it.')
      elif other_layer == layer:
        errors.append(f'{where}: {module} imports {target}: {component} and {other} are one '
                      'layer and must not import each other.')
  errors.extend(f'import cycle: {" -> ".join(cycle)}' for cycle in _cycles(graph))
  return errors


def _cycles(graph):
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def connect(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph.get(node, ()):
      if nxt not in graph:
        continue
      if nxt not in index:
        connect(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        top = stack.pop()
        on_stack.discard(top)
        component.append(top)
        if top == node:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      connect(node)
  return out


def test_the_package_keeps_its_layer_contract():
  errors = check_package(PACKAGE)
  assert not errors, 'The layer contract is broken:\n' + '\n'.join(errors)


def _write_package(tmp_path, files):
  root = tmp_path / 'diffusion_jax'
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  for folder in [root] + [p for p in root.rglob('*') if p.is_dir()]:
    (folder / '__init__.py').touch()
  return root


def test_an_upward_import_fails_the_contract(tmp_path):
  root = _write_package(tmp_path, {
      'nn/unet.py': 'from diffusion_jax.training import loop\n',
      'training/loop.py': 'from diffusion_jax.nn import unet\n'})
  errors = check_package(root)
  assert any('diffusion_jax.nn.unet (layer 3, nn) imports diffusion_jax.training.loop' in e
             for e in errors), errors
  assert any(e.startswith('import cycle:') and 'diffusion_jax.nn.unet' in e for e in errors)


def test_same_layer_packages_and_unexplained_lazy_imports_fail(tmp_path):
  root = _write_package(tmp_path, {
      'nn/unet.py': 'from diffusion_jax.data import pipeline\n',
      'data/pipeline.py': '',
      'training/loop.py': ('def f():\n'
                           '  from diffusion_jax.nn import unet\n'
                           '  from diffusion_jax.data import pipeline\n'
                           '  import tensorflow\n'),
  })
  errors = '\n'.join(check_package(root))
  assert 'nn and data are one layer' in errors
  assert 'diffusion_jax.nn.unet is imported inside a function' in errors
  assert 'the function-local import of diffusion_jax.data.pipeline needs a comment' in errors
  assert 'the function-local import of tensorflow needs a comment' in errors


@pytest.mark.parametrize('component', sorted({c for layer in LAYERS for c in layer} - {'__init__'}))
def test_every_layer_name_exists(component):
  assert (PACKAGE / component).is_dir() or (PACKAGE / f'{component}.py').is_file()
