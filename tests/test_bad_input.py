"Bad input gets a clear error naming the value and what would be valid."
import json, warnings
import pytest, torch
from workbench.core import WorkbenchError
from workbench.cli import main
from workbench.data import split_ids, make_needle
from workbench.methods import HalfKV, LocalWindow, RandomDrop
from workbench.models import load, weights_path, ModelSpec, cache_dir
from workbench.study import study_from_spec
from workbench.tasks import Perplexity, NeedleTask

@pytest.fixture(scope='module')
def lm(): return load('smollm2-135m')

def test_unknown_model():
    with pytest.raises(WorkbenchError, match="unknown model 'llama-9000'; valid: smollm2-135m, minilm-l6, dinov2-s14"): load('llama-9000')

def test_missing_model_package_names_install_command():
    spec = ModelSpec('ghost', 'causal', 'ghost-weights', '1.0', 'ghost_weights_xyz', 'w.gguf')
    with pytest.raises(WorkbenchError, match='workbench models install ghost'): weights_path(spec)

def test_unknown_task_and_spec_key(tmp_path):
    bad = tmp_path/'s.toml'; bad.write_text('name = "x"\nmodle = "smollm2-135m"\n')
    with pytest.raises(WorkbenchError, match="unknown spec key 'modle'; valid: name, model, dtype, device, splits, task, methods"): study_from_spec(bad)
    bad.write_text('[task]\nname = "rouge"\n')
    with pytest.raises(WorkbenchError, match="unknown task 'rouge'"): study_from_spec(bad)
    assert main(['run', str(bad)]) == 2

def test_knob_out_of_range():
    with pytest.raises(WorkbenchError, match=r'keep=1.5 is out of range; valid: \[0.01, 1.0\]'): RandomDrop(keep=1.5)
    with pytest.raises(WorkbenchError, match="unknown value for knob dtype 'int3'; valid: float16, bfloat16"): HalfKV(dtype='int3')

def test_budget_larger_than_sequence(lm):
    with pytest.raises(WorkbenchError, match="split 'eval' has only"): split_ids(lm.tokenizer, 'eval', 10**7)
    with pytest.raises(WorkbenchError, match='shorter than window=4096'): Perplexity(tokens=1024, window=4096)
    with pytest.raises(WorkbenchError, match='too short'): make_needle(lm.tokenizer, 40)
    with pytest.raises(WorkbenchError, match='trials=0'): NeedleTask(trials=0)

def test_task_on_wrong_model_kind():
    from workbench.models import tiny_lm
    with pytest.raises(WorkbenchError, match="needs a model of kind causal"): Perplexity(tokens=512).run(tiny_lm('bert'))

def test_corrupted_model_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv('WORKBENCH_CACHE', str(tmp_path))
    ids = torch.arange(100, 140)[None]
    with torch.no_grad(): want = load('smollm2-135m').model(ids).logits
    st = next(tmp_path.glob('gguf/*/model.safetensors'))
    data = bytearray(st.read_bytes()); data[-1000:] = b'\0' * 1000; st.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match='is corrupted'): again = load('smollm2-135m')
    with torch.no_grad(): assert torch.equal(again.model(ids).logits, want)

def test_corrupted_study_row_is_recomputed(lm, tmp_path):
    from workbench.study import Study
    task = Perplexity(tokens=64, window=64)
    Study(lm, [], task, name='c', root=tmp_path).run(progress=False)
    row = next((tmp_path/'c').glob('*.json')); d = json.loads(row.read_text()); d['ppl'] = 1.0
    d['config']['model'] = 'forged'; row.write_text(json.dumps(d))
    s = Study(lm, [], task, name='c', root=tmp_path)
    with pytest.warns(UserWarning, match='is corrupted'): df = s.run(progress=False)
    assert s.computed == 1 and df.ppl[0] > 1.0
