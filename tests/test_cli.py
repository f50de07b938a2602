"`workbench bench`: every benchmark takes keyword options and returns a table; the command line passes options through."
import pandas as pd, pytest
from workbench.cli import BENCHES, bench_function, bench_options, cli_options, main, run_bench
from workbench.core import WorkbenchError

def toy(tokens:int=128, lengths=(256,), model:str|None='tiny', progress:bool=True):
    "A made-up benchmark."
    return pd.DataFrame({'length': list(lengths), 'tokens': tokens, 'model': model})

@pytest.fixture
def with_toy():
    BENCHES['toy'] = toy
    yield
    del BENCHES['toy']

def test_every_benchmark_takes_options_and_is_documented():
    for name, path in BENCHES.items():
        fn = bench_function(path)
        assert fn.__doc__ and all(not isinstance(v, type) or v is None for v in bench_options(fn).values()), name
    assert {'tokens', 'repeats'} <= set(bench_options(bench_function(BENCHES['eval'])))
    assert 'repeats' in bench_options(bench_function(BENCHES['sparse']))

def test_options_pass_through(with_toy, capsys):
    t = run_bench('toy', **cli_options(['--tokens', '64', '--lengths', '512,1024', '--model', 'none']))
    assert t.to_dict('list') == {'length': [512, 1024], 'tokens': [64, 64], 'model': [None, None]}
    assert main(['bench', 'toy', '--lengths=2048']) == 0
    out = capsys.readouterr().out
    assert 'A made-up benchmark.' in out and '2048' in out

def test_an_option_the_benchmark_does_not_take(with_toy, capsys):
    with pytest.raises(WorkbenchError, match="takes no option 'repeats'; valid: tokens, lengths, model, progress"):
        run_bench('toy', repeats=2)
    assert main(['bench', 'kv', '--tokens', '512']) == 2
    assert "(workbench.kv.study.bench) takes no option 'tokens'; valid: lengths, trials" in capsys.readouterr().err
    assert main(['bench', 'quant', '--help']) == 0
    assert '--window 512' in capsys.readouterr().out

def test_demo_table_fits_120_columns(capsys):
    "What `workbench demo` prints for the stored headline rows: short labels, MB and percent, within 120 columns."
    from workbench.results import stored
    from workbench.study import print_table, terminal_table
    print_table(terminal_table(stored('headline')))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 15 and max(map(len, lines)) <= 120, max(map(len, lines))
    assert lines[0].split()[:2] == ['method', 'family'] and 'GPTQ 3b g64 + KIVI 2b + H2O 50%' in lines[-1]

def test_regress_calibrate_reaches_its_function(capsys):
    "`workbench regress NAME --calibrate` calls the notebooks' calibration (a name clash once made it crash)."
    assert main(['regress', 'no-such-notebook', '--calibrate']) == 2
    assert "no-such-notebook" in capsys.readouterr().err
