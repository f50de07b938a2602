"SmolLM2 in float16 on the CPU: one method of each family through the same `Study` code as float32 (slow)."
import pytest, torch
from workbench.kv.methods import KIVI
from workbench.models import load
from workbench.quant.methods import RTN
from workbench.sparse.methods import SinkWindow
from workbench.study import Study
from workbench.tasks import Perplexity
from workbench.tokens.text import ContinuationPPL, RandomPrompt

METHODS = [RTN(bits=4, group_size=64), KIVI(bits=2, residual=32), SinkWindow(sinks=4, window=124)]

@pytest.mark.slow
def test_smollm2_float16_rows_match_float32(tmp_path):
    task = Perplexity(tokens=512, window=256, chunk=64) # decoded in chunks: the cache methods hold what they keep
    rows = {d: Study(load('smollm2-135m', dtype=d), METHODS, task, name=d, root=tmp_path).run(progress=False)
            for d in ('float32', 'float16')}
    r16, r32 = rows['float16'], rows['float32']
    assert list(r16.model_dtype) == ['float16'] * 4 and set(r16.config_hash).isdisjoint(r32.config_hash)
    assert r16.weight_bytes[0] * 2 == r32.weight_bytes[0] and r16.kv_bytes[0] * 2 == r32.kv_bytes[0]
    for i in range(4): # fp16 rounding: every row within 2% of its float32 twin, and finite
        assert torch.isfinite(torch.tensor(r16.ppl[i])) and abs(r16.ppl[i] / r32.ppl[i] - 1) < 0.02, r16.method[i]
    assert r16.weight_bytes[1] < r16.weight_bytes[0] and r16.kv_bytes[2] < r16.kv_bytes[0]

@pytest.mark.slow
def test_smollm2_float16_prompt_drop():
    lm, task = load('smollm2-135m', dtype='float16'), ContinuationPPL(context=256, continuation=32, windows=1)
    with RandomPrompt(keep=1.0).apply(lm): kept = task.run(lm)['ppl']
    assert abs(kept / task.run(lm)['ppl'] - 1) < 1e-3 # keeping every token changes nothing in float16 either
