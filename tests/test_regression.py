"A smoke run of every regression notebook, compared with its stored smoke baseline."
import pytest
from workbench.cli import regress, regression_notebooks

@pytest.mark.parametrize('name', list(regression_notebooks()))
def test_regression_smoke(name, tmp_path):
    table = regress([name], profile='smoke', out_dir=tmp_path, threads=2) # both cores: a setting the spread covers

    drift = table[table.drift]
    assert drift.empty, f"drift in {name}:\n{drift.to_string()}"
