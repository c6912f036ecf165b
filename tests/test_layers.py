"""The package's layers import one way: core (what a library user imports: the head, CARROT, the fits, the model
wrapper and registry, weights, metrics, the data readers, ...) -> engine (carrot_zzz/engine: the phases of a run)
-> scripts (train.py, validate.py, inference.py and their shared flag helpers, carrot_zzz/cli.py). Read from the
source: no wrong-way import, no import cycle, and no import of the package hidden inside a function."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'carrot_zzz')
SCRIPTS_IN_PACKAGE = {'carrot_zzz.cli'}


def _modules():
    """{module name: path} of every .py file of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return found


MODULES = _modules()


def layer(module: str) -> str:
    if module in SCRIPTS_IN_PACKAGE:
        return 'scripts'
    return 'engine' if module.startswith('carrot_zzz.engine') else 'core'


def _resolve(module: str, path: str, node: ast.ImportFrom):
    """The package modules an ImportFrom names (the module, and its names that are submodules)."""
    if node.level:
        base = module.split('.')
        if not path.endswith('__init__.py'):
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        target = '.'.join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ''
    submodules = [f'{target}.{alias.name}' for alias in node.names if f'{target}.{alias.name}' in MODULES]
    whole = target in MODULES and len(submodules) < len(node.names)      # names defined in the module itself
    return ([target] if whole else []) + submodules


def imports(module: str):
    """[(imported package module, at module level?)] of one module."""
    path = MODULES[module]
    tree = ast.parse(open(path).read())
    top = set(id(n) for n in tree.body)
    for n in tree.body:        # module-level try / if blocks count as top level
        if isinstance(n, (ast.Try, ast.If)):
            top |= {id(m) for m in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = _resolve(module, path, node)
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name in MODULES]
        else:
            continue
        found += [(name, id(node) in top) for name in names if name != module]
    return found


ORDER = {'core': 0, 'engine': 1, 'scripts': 2}


def problems(module: str):
    """The wrong-way and function-level package imports of a module, as messages."""
    found = []
    for target, at_top in imports(module):
        if ORDER[layer(target)] > ORDER[layer(module)]:
            found.append(f'{module} ({layer(module)}) imports {target} ({layer(target)}): a wrong-way import')
        if not at_top:
            found.append(f'{module} imports {target} inside a function (hides an import cycle)')
    return found


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_go_one_way_and_none_hides_in_a_function(module):
    assert problems(module) == []


def test_no_import_cycle():
    graph = {m: {t for t, _ in imports(m)} for m in MODULES}
    state = {}

    def visit(node, trail):
        state[node] = 'open'
        for nxt in graph[node]:
            if state.get(nxt) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 'done'

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_layer_reader_sees_wrong_way_imports(tmp_path, monkeypatch):
    """The reader itself, on a core module written to break both rules: both are caught."""
    fake = tmp_path / 'fake.py'
    fake.write_text('from .engine.fit import fit\n\ndef late():\n    from . import zzz_head\n')
    monkeypatch.setitem(MODULES, 'carrot_zzz.fake', str(fake))
    assert problems('carrot_zzz.fake') == [
        'carrot_zzz.fake (core) imports carrot_zzz.engine.fit (engine): a wrong-way import',
        'carrot_zzz.fake imports carrot_zzz.zzz_head inside a function (hides an import cycle)']
