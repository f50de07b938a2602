"The one explorer, `viz.explore`, without a browser: set a control, read what the output area shows."
import pytest
import plotly.graph_objects as go
from workbench.core import Knob, Method, WorkbenchError
from workbench.models import tiny_lm
from workbench.viz import explore, result_outputs

class Keep(Method):
    family = 'tokens'
    knobs = (Knob('keep', 0.5, low=0.1, high=1.0), Knob('seed', 0, low=0, high=9))

class Merge(Method):
    family = 'tokens'
    knobs = (Knob('keep', 0.5, low=0.1, high=1.0), Knob('r', 2, low=1, high=8))
    def validate(self):
        if self.r > 6: raise WorkbenchError(f"r={self.r} merges too many")

def figure(m, layer=0): return go.Figure(layout=dict(title=f"{m.name} at layer {layer}"))

def shown(w): return str(w.output.outputs) # plain Python: no notebook renderer, the figure's text

def test_controls_redraw_the_output():
    w = explore([Keep, Merge], figure, fixed={'seed': 3}, extra=[Knob('layer', 0, low=0, high=5)])
    assert list(w.controls) == ['keep'] and w.method.seed == 3 and 'at layer 0' in shown(w)
    w.controls['keep'].value = 0.25
    assert 'Keep(keep=0.25, seed=3) at layer 0' in shown(w)
    w.inputs['layer'].value = 4
    assert 'at layer 4' in shown(w)
    w.pick.value = 'Merge'
    assert list(w.controls) == ['keep', 'r'] and 'Merge(keep=0.25, r=2) at layer 4' in shown(w) # keep carried over
    w.controls['r'].value = 7
    assert w.result is None and w.output.outputs == () and 'r=7 merges too many' in w.message.value

def test_results_of_every_kind():
    assert 'text/html' in result_outputs({'ppl': 1.5})[0]['data']
    assert len(result_outputs([figure(Keep()), {'a': 1}])) == 2
    with pytest.raises(WorkbenchError, match="unknown knob of Keep, Merge 'sed'"): explore([Keep, Merge], figure, fixed={'sed': 1})

def test_family_explorers_on_tiny_models():
    from workbench.quant.study import quant_explorer, RTN, HQQ
    from workbench.kv.study import kv_explorer, StreamingLLM, KIVI
    lm = tiny_lm('llama')
    q = quant_explorer(lm, (RTN, HQQ), fixed={'iters': 2})
    before = q.output.outputs
    q.controls['bits'].value = 2
    assert q.output.outputs != before and 'RTN(bits=2' in q.result.layout.title.text
    from transformers import AutoTokenizer
    from workbench.kv.peers import model_folder
    tok = AutoTokenizer.from_pretrained(model_folder()) # SmolLM2's tokenizer, for the perplexity split
    lm = tiny_lm('llama', vocab=len(tok)); lm.tokenizer = tok
    kv = kv_explorer(lm, tokens=64, chunk=16, methods=(StreamingLLM, KIVI))
    kv.controls['ratio'].value = 0.75
    assert 'StreamingLLM(ratio=0.75' in kv.result.layout.title.text and kv.result.data[0].type == 'heatmap'
    kv.pick.value = 'KIVI' # its default group of 32 does not divide the tiny model's head_dim: said so
    assert kv.result is None and 'group=32 must divide head_dim=16' in kv.message.value
    kv.controls['group'].value = 8
    assert kv.message.value == '' and 'peak KV' in kv.result.layout.title.text
