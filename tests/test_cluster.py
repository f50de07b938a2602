"Studies on Dask: the same rows as in process, nothing lost when a worker dies, failed rows recorded and retried."
import os, signal, sys, threading, time
import cloudpickle, pytest, torch
from workbench.cli import FLOOR
from workbench.core import threads
from workbench.cluster import dask_client
from workbench.kv.methods import H2O, StreamingLLM, TOVA
from workbench.methods import HalfKV, LocalWindow
from workbench.models import tiny_lm
from workbench.quant.methods import RTN
from workbench.study import PROVENANCE, Study
from workbench.tasks import Perplexity
from workbench.tokens.vision import EViT

cloudpickle.register_pickle_by_value(sys.modules[__name__]) # the workers cannot import this test module

class RandomIds(Perplexity):
    "Perplexity on fixed random token ids: a tiny random model has no tokenizer."
    def _ids(self, lm): return torch.randint(0, 500, (self.n,), generator=torch.Generator().manual_seed(0))

METHODS = [HalfKV(), StreamingLLM(ratio=0.5), H2O(ratio=0.5), TOVA(ratio=0.5), LocalWindow(window=16), RTN(bits=4)]
COMPARED = ['ppl', 'nll', 'kl', 'top1', 'weight_bytes', 'kv_bytes', 'total_bytes', 'saving']

@pytest.fixture(scope='module')
def client():
    with dask_client(2) as c: yield c

def same_rows(a, b, rel=FLOOR, abs=1e-7):
    "Identical config hashes and methods; metrics within `rel` relative (the regression floor), or `abs` near 0."
    assert a.config_hash.tolist() == b.config_hash.tolist() and a.method.tolist() == b.method.tolist()
    for col in COMPARED:
        assert a[col].tolist() == pytest.approx(b[col].tolist(), rel=rel, abs=abs), col
    assert not set(PROVENANCE) - set(a.columns) # provenance is kept, outside the config

# On a tiny random model, eviction scores nearly tie: a float32 sum rounded differently on another thread count can
# flip which token H2O keeps (7e-4 relative on perplexity, seen once). So the tiny rows are compared with in-process
# rows on one thread, as each worker has; the SmolLM2 test compares across thread counts.
def test_tiny_architectures_same_rows_on_workers(client, tmp_path):
    for arch in ('llama', 'qwen2', 'gemma3'):
        lm, task = tiny_lm(arch), RandomIds(tokens=128, window=128, chunk=32)
        methods = METHODS[1:] if arch == 'gemma3' else METHODS # HalfKV keeps full-attention layers only
        remote = Study(lm, methods, task, name=f'{arch}-dask', root=tmp_path)
        on_dask = remote.run(client=client, progress=False)
        with threads(1): here = Study(lm, methods, task, name=f'{arch}-here', root=tmp_path).run(progress=False)
        assert remote.computed == len(methods) + 1 and not remote.failures, remote.failures
        assert set(on_dask.threads[1:]) == {1} # the workers' rows: one torch thread each
        same_rows(on_dask, here)

def test_killed_worker_loses_no_row(client, tmp_path):
    lm, task = tiny_lm('llama'), RandomIds(tokens=256, window=256, chunk=1) # token by token: ~1 s a row
    folder, killed = tmp_path/'kill', {}
    def kill_a_busy_worker():
        pids, t0 = client.run(os.getpid), time.time()
        while time.time() - t0 < 120:
            busy = [w for w, keys in client.processing().items() if keys and w in pids]
            if len(list(folder.glob('*.json'))) >= 2 and busy: # the baseline and one row are written
                killed.update(pid=pids[busy[0]], rows_before=len(list(folder.glob('*.json'))))
                os.kill(killed['pid'], signal.SIGKILL); return
            time.sleep(0.01)
    killer = threading.Thread(target=kill_a_busy_worker); killer.start()
    study = Study(lm, METHODS, task, name='kill', root=tmp_path)
    df = study.run(client=client, progress=False); killer.join()
    assert killed and killed['rows_before'] < len(METHODS) + 1, killed # killed in the middle of the sweep
    assert killed['pid'] not in client.run(os.getpid).values() # that process is gone; Dask started another
    assert not study.failures and len(df) == len(METHODS) + 1 and len(list(folder.glob('*.json'))) == len(df)
    with threads(1): same_rows(df, Study(lm, METHODS, task, name='here', root=tmp_path).run(progress=False))

def test_failed_row_recorded_not_cached_and_retried(client, tmp_path):
    lm, task = tiny_lm('llama'), RandomIds(tokens=128, window=128, chunk=32)
    study = Study(lm, [HalfKV(), EViT(), LocalWindow(window=16)], task, name='fail', root=tmp_path)
    with pytest.warns(UserWarning, match='1 of 4 rows of study .fail. failed'):
        df = study.run(client=client, progress=False)
    assert df.method.tolist() == ['baseline', HalfKV().name, LocalWindow(window=16).name]
    assert [f['method'] for f in study.failures] == [EViT().name]
    assert 'acts inside encoders' in study.failures[0]['error']
    assert not (tmp_path/'fail'/f"{study.failures[0]['config_hash']}.json").exists()
    with pytest.warns(UserWarning, match='failed'): study.run(client=client, progress=False) # retried, fails again
    assert study.computed == 0 and len(study.failures) == 1

@pytest.mark.slow
def test_smollm2_rows_on_workers_match_in_process(client, tmp_path):
    "Two threads here against one thread on each worker: every metric within the regression tolerances' floor."
    task, methods = Perplexity(tokens=512, window=512, chunk=128), [RTN(bits=3), StreamingLLM(ratio=0.5)]
    remote = Study('smollm2-135m', methods, task, name='dask', root=tmp_path)
    on_dask = remote.run(client=client, progress=False)
    loaded = client.run(lambda: sorted(str(s) for s in __import__('workbench.cluster').cluster._MODELS))
    assert all(v in ([], [str(remote.source)]) for v in loaded.values()), loaded # loaded once, kept per worker
    torch.set_num_threads(2)
    same_rows(on_dask, Study(remote.lm, methods, task, name='here', root=tmp_path).run(progress=False))

SPEC = '''name = "cli"
model = "smollm2-135m"
task = {name = "perplexity", tokens = 128, window = 128, chunk = 32}
[[methods]]
name = "LocalWindow"
window = [16, 64]
[[methods]]
name = "HalfKV"
dtype = "float16"
'''

def test_workbench_run_with_workers_writes_the_same_rows(tmp_path):
    import pandas as pd
    from workbench.cli import main
    (tmp_path/'spec.toml').write_text(SPEC)
    for engine, more in (('dask', ['--workers', '2']), ('here', [])):
        csv = str(tmp_path/f'{engine}.csv')
        assert main(['run', str(tmp_path/'spec.toml'), '--root', str(tmp_path/engine), '--csv', csv, *more]) == 0
    on_dask, here = pd.read_csv(tmp_path/'dask.csv'), pd.read_csv(tmp_path/'here.csv')
    assert len(here) == 4 and set(on_dask.threads[1:]) == {1}
    same_rows(on_dask, here)

@pytest.mark.slow
def test_regress_runs_notebooks_on_workers(tmp_path):
    from workbench.cli import regress
    table = regress(['smollm2_baseline', 'stacks'], profile='smoke', out_dir=tmp_path, threads=1, workers=2)
    assert set(table.notebook) == {'smollm2_baseline', 'stacks'} and not table.drift.any(), table[table.drift]
