"""kvpress side by side: the kept positions agree with kvpress's presses (slow), the needles sent to kvpress's
environment are KVNeedle's, a missing environment names its install command, the worker stays free of workbench,
and (slow, when the environment exists) the worker runs."""
import ast, json, pytest, torch
from pathlib import Path
import workbench.kv.study as kv_study
from workbench.core import LM, WorkbenchError
from workbench.data import make_needle
from workbench.kv.peers import (bench_kvpress, install_kvpress_env, kept_agreement, kept_cross_check, kept_pairs,
                                kv_needles,
                                kvpress_env, kvpress_python, kvpress_table, model_folder)

@pytest.fixture(scope='module')
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_folder())

def test_needles_are_kvneedles(tok, monkeypatch):
    "kv_needles serializes exactly the needles KVNeedle asks (same make_needle arguments), and survives JSON."
    calls = []
    class Asked(Exception): pass
    def spy(tokenizer, length, **kw): calls.append((length, kw)); raise Asked
    monkeypatch.setattr(kv_study, 'make_needle', spy)
    task = kv_study.KVNeedle(lengths=(256, 300), trials=4)
    for L in task.lengths:
        for i in range(task.trials):
            with pytest.raises(Asked): task.trial(LM(model=None, tokenizer=tok), L, i)
    nds = kv_needles(tok, lengths=(256, 300), trials=4)
    assert len(nds) == len(calls) == 8
    for (L, kw), nd in zip(calls, nds):
        n = make_needle(tok, L, **kw)
        got = nd['context'], nd['question'], nd['answer'], nd['length'], nd['depth']
        assert got == (n.context.tolist(), n.question.tolist(), n.answer, L, n.depth)
    assert json.loads(json.dumps(nds)) == nds

def test_missing_env_names_install_command(tmp_path):
    with pytest.raises(WorkbenchError, match='workbench peers install kvpress'): kvpress_python(tmp_path)
    with pytest.raises(WorkbenchError, match='workbench peers install kvpress'):
        bench_kvpress(lengths=(256,), trials=1, env=tmp_path/'nothing')
    assert str(kvpress_env(tmp_path)) == str(tmp_path)

def test_install_commands_printed(tmp_path, capsys):
    install_kvpress_env(tmp_path/'env', dry_run=True)
    out = capsys.readouterr().out
    assert '-m venv' in out and 'torch==2.13.0' in out and 'kvpress==0.5.5' in out
    assert not (tmp_path/'env').exists()

def test_worker_imports_no_workbench():
    "The worker runs in kvpress's environment (transformers < 5.3): it may not import workbench's modules."
    import workbench.kv.kvpress_worker as w
    tree = ast.parse(Path(w.__file__).read_text())
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or '' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) if n.level == 0]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not [m for m in mods if m.split('.')[0] == 'workbench'], mods

def test_worker_bytes_equal_ledger():
    from transformers import DynamicCache
    from workbench.kv.kvpress_worker import held_bytes
    from workbench.ledger import cache_bytes
    c = DynamicCache()
    c.update(torch.zeros(1, 3, 7, 64), torch.zeros(1, 3, 7, 64), 0)
    c.update(torch.zeros(1, 3, 5, 64), torch.zeros(1, 3, 5, 64), 1)
    assert held_bytes(c) == cache_bytes(c) == 2 * 3 * 12 * 64 * 4

def test_table_has_bench_kv_columns():
    rows = [dict(press=p, ratio=r, trial=i, length=64, depth=0.5, key='12345', answer='12345' if i else '00000',
                 found=bool(i), context_tokens=64, answer_ids=[], kept_tokens=k, kv_compressed=b, kv_final=b + 10,
                 seconds=1.0)
            for p, r, k, b in [(None, 0.0, 64, 1000), ('SnapKV', 0.5, 32, 500)] for i in range(2)]
    df = kvpress_table(rows)
    for c in ['method', 'short', 'ratio', 'needle_acc', 'needle_acc_64', 'kv_peak', 'kv_final', 's_per_query',
              'final_saving', 'peak_saving', 'library']:
        assert c in df.columns, c
    assert df.method.tolist() == ['full cache', 'SnapKV(ratio=0.5)'] and df.needle_acc.tolist() == [0.5, 0.5]
    assert df.kv_final.tolist() == [1010, 510] and (df.library == 'kvpress').all()

@pytest.mark.slow
def test_worker_runs_when_env_exists():
    try: kvpress_python()
    except WorkbenchError as e: pytest.skip(str(e))
    df = bench_kvpress(lengths=(512,), trials=2, ratios=(0.75,), presses=('StreamingLLM', 'SnapKV'), progress=False)
    assert df.method.tolist() == ['full cache', 'StreamingLLM(ratio=0.75)', 'SnapKV(ratio=0.75)']
    assert df.kept_tokens.tolist() == [512, 128, 128]
    assert (df.kv_compressed[1:] * 4 == df.kv_compressed[0]).all() # 30 layers x 3 heads x 64 x fp32 per kept token
    assert df.attrs['versions']['kvpress'] == '0.5.5'

def test_kept_agreement_counts():
    a, b = [[[0, 1, 2], [0, 3, 4]], [[5, 6], [5, 7]]], [[[0, 1, 2], [0, 3, 5]], [[5, 6], [6, 7]]]
    r = kept_agreement(a, b)
    assert r['identical'] == 0.5 and r['min_overlap'] == 0.5 and r['worst'] == 'L1.h1' and r['unmatched'] == 0
    assert kept_agreement(a, [[[0, 1, -1], [0, 3, 4]], [[5, 6], [5, 7]]])['unmatched'] == 1
    assert [m.tokens for *_, m in kept_pairs(1000, (0.75,))] == [250] * 4 # kvpress's floor, not our ceiling

@pytest.mark.slow
def test_kept_positions_equal_kvpress():
    "Our StreamingLLM, SnapKV (kvpress's window 64, avg pooling 5), TOVA and Knorm keep what kvpress's presses keep."
    try: kvpress_python()
    except WorkbenchError as e: pytest.skip(str(e))
    from workbench.data import split_ids
    from workbench.models import load
    lm = load('smollm2-135m')
    df = kept_cross_check(split_ids(lm.tokenizer, 'eval', 1024).tolist(), ratios=(0.5, 0.75), lm=lm, progress=False)
    assert (df.unmatched == 0).all() # every kept key was found among the uncompressed prefill's keys
    assert (df[df.press == 'StreamingLLM'].identical == 1).all()
    # up to float near-ties (measured: identical in every layer and head; SnapKV pooling its votes over the window
    # too, as ours once did, gives 0.82 identical at 0.75)
    assert (df.identical >= 0.95).all() and (df.overlap > 0.99).all(), df
