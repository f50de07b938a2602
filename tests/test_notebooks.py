"The notebooks are the source: they export to exactly the committed package, and their test cells pass."
import os, subprocess, sys

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def package_files():
    return {p.relative_to(ROOT): p.read_bytes() for p in sorted((ROOT/'workbench').rglob('*.py'))}

def test_export_leaves_package_unchanged():
    before = package_files()
    subprocess.run(['nbdev_export'], cwd=ROOT, check=True)
    after = package_files()
    changed = [str(p) for p in set(before) | set(after) if before.get(p) != after.get(p)]
    assert not changed, f"nbdev_export changed {changed}: export the notebooks and commit the package"

def test_notebooks_run():
    one_thread = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'} # two workers on two cores, not four
    r = subprocess.run(['nbdev_test', '--n_workers', '2'], cwd=ROOT, capture_output=True, text=True, env=one_thread)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
