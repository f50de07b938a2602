"Lines at most 120 characters in notebook code cells and the exported package; one-line module summaries."
import json
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
WIDTH = 120
NOTEBOOKS = sorted((ROOT/'nbs').rglob('*.ipynb')) + sorted((ROOT/'tests'/'regression').glob('*.ipynb'))
MODULES = sorted(p for p in (ROOT/'workbench').rglob('*.py') if p.name != '_modidx.py') # _modidx: nbdev's index

def long_lines(lines) -> list:
    "(line number, length) of each line wider than `WIDTH`."
    return [(i, len(l)) for i, l in enumerate(lines, 1) if len(l.rstrip('\n')) > WIDTH]

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook_code_lines(nb):
    cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
    wide = {c.get('id'): long_lines(''.join(c['source']).split('\n')) for c in cells}
    assert not {k: v for k, v in wide.items() if v}, f"{nb.name}: cells with lines over {WIDTH} characters"

@pytest.mark.parametrize('mod', MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_lines(mod):
    # nbdev wraps `__all__` at 120 characters and then prefixes its first line with `__all__ = `: that line is its own
    lines = [l for l in mod.read_text().split('\n') if not l.startswith('__all__ = [')]
    assert not long_lines(lines), f"{mod.name}: lines over {WIDTH} characters (edit the notebook, then nbdev_export)"

@pytest.mark.parametrize('mod', MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_summary_one_line(mod):
    text = mod.read_text()
    if not text.startswith('"""'): return # __init__ and modules without a summary
    summary = text[3:text.index('"""', 3)]
    assert '\n' not in summary and len(summary) <= WIDTH - 6, f"{mod.name}: summary of {len(summary)} characters"
