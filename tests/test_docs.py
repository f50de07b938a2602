"The docs site builds from the notebooks and shows in a real browser; JupyterLab runs a study notebook whose slider redraws its chart."
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from html.parser import HTMLParser
from pathlib import Path
import nbformat, pytest
from workbench.docs import build_docs, chapters, page_name, code_cell, exported_names, broken_links, external_resources, page_text

ROOT = Path(__file__).resolve().parent.parent
NBS, BROWSER, CHROMIUM = ROOT/'nbs', ROOT/'tests'/'browser', Path(os.environ.get('CHROMIUM', '/usr/bin/chromium'))
INSTALL = "apt-get update && apt-get install -y chromium && npm ci --prefix tests/browser"

def need_browser():
    "Fail, naming the install command, unless Chromium, node and playwright-core are there."
    missing = [what for what, ok in [(f'Debian chromium ({CHROMIUM})', CHROMIUM.exists()), ('node', shutil.which('node')),
                                     ('playwright-core (tests/browser/node_modules)', (BROWSER/'node_modules'/'playwright-core').is_dir())] if not ok]
    if missing: pytest.fail(f"missing {', '.join(missing)}; install with: {INSTALL}")

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def descendants(pid:int) -> list:
    "The ids of every process below `pid`, read from /proc."
    kids = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: kids.setdefault(int(stat.read_text().rsplit(')', 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError): pass
    found, todo = [], [pid]
    while todo: todo += kids.get(todo.pop(), []); found += [p for p in todo if p not in found]
    return found

def start(cmd, log:Path|None=None, **kw) -> subprocess.Popen:
    "Start `cmd` as the leader of a new process group, its output piped (to read) or written to `log` (a server's)."
    out = open(log, 'w') if log else subprocess.PIPE
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, text=True, **kw)
    proc.log, proc.log_file = log, out if log else None
    return proc

def stop(proc:subprocess.Popen, grace:float=15):
    "Stop `proc`: SIGTERM to its process group, SIGKILL after `grace` s, then any process it started that is left."
    below = descendants(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(grace)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    for pid in below:
        try: os.kill(pid, signal.SIGKILL)
        except ProcessLookupError: pass
    if getattr(proc, 'log_file', None): proc.log_file.close()

def wait_for(url:str, proc:subprocess.Popen, timeout:float=90):
    "Wait until `url` answers, failing early if `proc` exits."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None: pytest.fail(f"{proc.args[:4]} exited with {proc.returncode}:\n{Path(proc.log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5): return
        except OSError: time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s")

def node(script:str, *args, timeout:float=180) -> dict:
    "Run a playwright-core script of tests/browser; return the JSON it prints last."
    proc = start(['node', str(BROWSER/script), *map(str, args)], cwd=BROWSER)
    try: out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired: pytest.fail(f"{script} ran past {timeout} s")
    finally: stop(proc)
    assert proc.returncode == 0, out[-4000:]
    return json.loads(out.strip().splitlines()[-1])

class Page(HTMLParser):
    "The text of a page's code cells (MyST-NB `cell_input`) and of its headings."
    def __init__(self, path):
        super().__init__(); self.inputs, self.headings, self._stack = [], [], []
        self.feed(Path(path).read_text(encoding='utf-8'))
    def handle_starttag(self, tag, attrs):
        if tag in ('br', 'img', 'meta', 'link', 'input', 'hr'): return
        cls = dict(attrs).get('class') or ''
        kind = 'input' if 'cell_input' in cls.split() else 'heading' if tag in ('h1', 'h2', 'h3', 'h4') else None
        if kind == 'input': self.inputs.append('')
        if kind == 'heading': self.headings.append('')
        self._stack.append(kind)
    def handle_endtag(self, tag):
        if tag not in ('br', 'img', 'meta', 'link', 'input', 'hr') and self._stack: self._stack.pop()
    def handle_data(self, data):
        if 'input' in self._stack: self.inputs[-1] += data
        elif 'heading' in self._stack: self.headings[-1] += data

def squash(s:str) -> str: return ' '.join(s.split())

# Seconds each notebook may run in this build: enough for the quick chapters (the viz chapter's charts included),
# while a chapter that runs real models stops there, so the build takes about ceil(notebooks / 2) * 30 s at most.
# The published site (`workbench docs`) runs every notebook to the end.
NOTEBOOK_SECONDS = 30

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('docs')/'site'
    t = time.monotonic()
    build_docs(out, root=ROOT, timeout=NOTEBOOK_SECONDS)
    print(f"docs built in {time.monotonic() - t:.0f} s")
    return out

def test_every_chapter_has_a_page_in_order(site):
    pages = chapters(NBS)
    for p in pages: assert (site/f'{page_name(NBS, p)}.html').is_file(), p.name
    nav = re.findall(r'<a class="reference internal" href="([^"#]+)"', (site/'index.html').read_text().split('sidebar-tree', 1)[1].split('</ul>', 1)[0])
    assert nav == [f'{page_name(NBS, p)}.html' for p in pages[1:]], nav

def test_index_page_is_the_readme(site):
    text, readme = page_text(site/'index.html'), (ROOT/'README.md').read_text(encoding='utf-8')
    for h in re.findall(r'^##+ (.+)$', readme, re.M): assert squash(h) in text, h
    summary = squash(re.search(r'^> (.+?)\n\n', readme, re.M | re.S).group(1).replace('\n> ', ' '))
    assert summary in text, summary

def test_directives_keep_their_meaning(site):
    for path in chapters(NBS):
        page = Page(site/f'{page_name(NBS, path)}.html')
        shown, hidden, slow, names = [], [], [], []
        for c in nbformat.read(path, as_version=4).cells:
            if c.cell_type != 'code': continue
            d, src = code_cell(c.source)
            (hidden if {'hide', 'default_exp'} & set(d) else shown).append(src)
            if {'slow', 'notest'} & set(d): slow.append(src)
            if {'export', 'exports'} & set(d) and 'hide' not in d: names += exported_names(src)
        assert not any(re.search(r'^\s*#\s*\|', i, re.M) for i in page.inputs), path.name # no directive line is shown
        inputs = squash(' '.join(page.inputs))
        for src in hidden: # a hidden cell's lines are absent, unless a shown cell has them too
            for line in filter(None, map(squash, src.splitlines())):
                if not any(line in squash(s) for s in shown): assert line not in inputs, (path.name, line)
        for src in slow: assert squash(src) in inputs, (path.name, src[:80])
        headings = {squash(h.replace('¶', '').replace('#', '')) for h in page.headings}
        for n in names: assert n in headings, (path.name, n)
    viz = page_text(site/'07_viz.html')
    for s in ["pareto(df, x='total_bytes', y='ppl', color='method', lower_is_better=True, hover=None, title=None) -> go.Figure",
              "Scatter of all rows of df with the Pareto frontier drawn as a step line and marked.", "the bytes column: fewer is better"]:
        assert s in viz, s

def test_links_work_offline(site):
    assert broken_links(site) == []
    assert external_resources(site) == []
    assert (site/'_static'/'plotly.min.js').is_file() and (site/'.nojekyll').is_file()

def test_site_in_chromium(site):
    need_browser()
    charts = [page_name(NBS, p) for p in chapters(NBS)
              if 'Plotly.newPlot' in (site/f'{page_name(NBS, p)}.html').read_text(encoding='utf-8')]
    assert '07_viz' in charts, charts
    shots = site/'screenshots'; shots.mkdir(exist_ok=True)
    port = free_port()
    server = start([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(site)], log=site.parent/'server.log')
    try:
        wait_for(f'http://127.0.0.1:{port}/index.html', server, 30)
        r = node('site.mjs', f'http://127.0.0.1:{port}', shots, 'index.html', f'{charts[0]}.html')
    finally: stop(server)
    assert r['index']['h1'] == 'workbench', r['index']
    assert r['index']['nav'] == [f'{page_name(NBS, p)}.html' for p in chapters(NBS)[1:]], r['index']
    c = r['chart']
    assert c['plots'] >= 1 and c['drawn'] == c['plots'] and c['traces'] >= 1 and c['points'] > 0, c
    assert r['offsite'] == [] and r['errors'] == [], r
    for f in ('index.png', 'chart.png'): assert (shots/f).stat().st_size > 10_000, f

# Each study chapter's main chart, drawn from the results store: page -> (stored study, or 'study:query' when the
# chart draws some of its rows; the chart's title)
STUDY_CHARTS = {
    'kv/21_kv_study': ('kv-ppl', 'SmolLM2, decoding perplexity against KV bytes held (peak), every stored configuration'),
    'tokens/30_tokens_vision': ('tokens-vision', 'DINOv2-S/14 at 224 px: probe accuracy against attention FLOPs, every '
                                                 'stored configuration'),
    'tokens/32_tokens_study': ('tokens-bench', 'DINOv2-S/14 at 224 px: images per second against tokens per block, '
                                               'timed side by side'),
    'sparse/41_sparse_study': ('sparse-2048', 'SmolLM2, 2,048 tokens: perplexity against the scores computed, every '
                                              'stored pattern'),
    'quant/11_quant_study': ('quant-smollm2', 'SmolLM2: perplexity against weight bytes, every stored configuration'),
    'quant/12_quant_peers': ('quant-hqq-ablation', 'SmolLM2, HQQ against the hqq library: perplexity against bits per '
                                                   'weight, one ingredient swapped at a time'),
    'kv/22_kv_peers': ('kv-peers', 'SmolLM2, 2,048-token needles: needles found against KV bytes held while answering, '
                                   'ours and kvpress'),
    'tokens/31_tokens_text': ('tokens-text-needle', 'SmolLM2, 1,024-token needles: needles found against KV bytes, every '
                                                    'stored configuration'),
    '50_stacks': ('headline', 'SmolLM2: perplexity against bytes held (weights + KV peak), all families and stacks'),
    'kv/24_kv_scissorhands': ('kv-scissorhands', 'SmolLM2, decoding perplexity against KV bytes held: Scissorhands and '
                                                 'H2O at 50/75/90% evicted'),
    'kv/25_kv_lazy': ('kv-lazy', 'SmolLM2, perplexity of 1,024 decoded tokens against peak KV bytes: LazyEviction, '
                                 'H2O, SnapKV'),
    'kv/26_kv_episodic': ('kv-episodic', 'SmolLM2, four questions on one compressed 2,048-token context: accuracy '
                                         'against KV bytes held (peak)'),
    'kv/27_kv_retrieval_heads': ('kv-retrieval-heads', 'SmolLM2 needles at 2,048 tokens: CompressKV vs SnapKV, found vs '
                                                       'KV bytes held while answering'),
    'kv/28_kv_locret': ('kv-locret', 'SmolLM2, decoding perplexity against KV bytes held: Locret, SnapKV, H2O'),
    'quant/13_quant_binary': ('quant-binary', 'SmolLM2: binary coding against round-to-nearest and GPTQ, perplexity '
                                              'against weight bytes'),
    'quant/14_quant_rag': ('quant-rag', 'MiniLM on Austen paragraphs: recall@10 against bytes per stored vector, every '
                                        'stored configuration'),
    'tokens/33_tokens_schedule': ('tokens-schedule', 'DINOv2-S/14, tokens against peak activation bytes, every schedule '
                                                     'and size'),
    'sparse/42_sparse_hybrid': ('sparse-hybrid-retrofit', 'SmolLM2 retrofitted, 2,048 tokens: perplexity against KV '
                                                          'bytes held, each layout untrained'),
    'sparse/43_sparse_prefill': ('sparse-prefill:level == "quality"', 'SmolLM2, 4,096 tokens: perplexity against the '
                                                                      'scores computed, Λ-shape and DuoAttention'),
    'quant/15_quant_rotation': ('quant-rotation:quantizer != "baseline"', 'SmolLM2, one 2,048-token window: '
                                'perplexity against bits per weight, rotations and GPTQ beside the peers'),
    'quant/16_quant_awq': ('quant-awq', "SmolLM2, perplexity against the whole model's bytes: AWQ, RTN, HQQ, GPTQ and "
                                        'the hqq library'),
    'kv/29a_kv_kvzip': ('kv-kvzip', 'SmolLM2, needles found at 2,048 tokens against KV bytes held while answering, '
                                    'half the context evicted before the question'),
    'kv/29_kv_kvquant': ('kv-kvquant', 'SmolLM2 decoding perplexity against peak KV bytes: KVQuant, KIVI-2 and '
                                       'QuantizedCache')}

def test_study_charts_drawn_from_the_store(site):
    "Each study chapter's page draws its main chart in Chromium, one point per stored row; a screenshot of each."
    from workbench.results import stored
    need_browser()
    shots = site/'screenshots'; shots.mkdir(exist_ok=True)
    port = free_port()
    server = start([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(site)],
                   log=site.parent/'server-studies.log')
    try:
        wait_for(f'http://127.0.0.1:{port}/index.html', server, 30)
        r = node('studies.mjs', f'http://127.0.0.1:{port}', shots, *[f'{p}|{t}' for p, (_, t) in STUDY_CHARTS.items()])
    finally: stop(server)
    for c in r['charts']:
        store, _, query = STUDY_CHARTS[c['name']][0].partition(':') # 'store:query': the chart draws those rows
        rows = len(stored(store).query(query) if query else stored(store))
        assert not c.get('missing') and c['points'] == rows and c['drawn'] >= rows, (c, rows)
        assert (shots/f"{c['name'].replace('/', '_')}.png").stat().st_size > 10_000, c
    assert r['offsite'] == [] and r['errors'] == [], r

def test_study_chapters_type_no_tables_of_numbers():
    "Chapters 10-50 draw their tables of measured numbers from the store: no markdown table row of numbers remains."
    studied = [p for p in chapters(NBS) if re.match(r'(\w+/)?[1-5]\d[a-z]?_', page_name(NBS, p))]
    assert {page_name(NBS, p) for p in studied} >= set(STUDY_CHARTS), studied
    for path in studied:
        name = page_name(NBS, path)
        for c in nbformat.read(path, as_version=4).cells:
            rows = [l for l in c.source.splitlines() if c.cell_type == 'markdown' and re.match(r'^\s*\|.*\d.*\|\s*$', l)]
            assert not rows, (name, rows[:3])

def test_demo_report_is_published(site):
    page = (site/'demo.html').read_text(encoding='utf-8')
    assert 'workbench demo: all families and stacks on SmolLM2' in page and '<details><summary>' in page
    assert 'href="demo.html"' in (site/'index.html').read_text(encoding='utf-8')

@pytest.mark.e2e
def test_jupyterlab_explore_widget(tmp_path):
    "JupyterLab runs a study notebook; moving the `keep` slider by keyboard redraws the plotly chart."
    need_browser()
    work = tmp_path/'lab'; work.mkdir()
    shutil.copy(BROWSER/'explore_study.ipynb', work) # the run's outputs never touch the committed notebook
    news = tmp_path/'settings'/'@jupyterlab'/'apputils-extension'/'notification.jupyterlab-settings'
    news.parent.mkdir(parents=True); news.write_text('{"fetchNews": "false"}') # no news prompt over the page
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'), 'JUPYTER_CONFIG_DIR': str(tmp_path/'config')}
    lab = start([sys.executable, '-m', 'jupyterlab', '--allow-root', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
                 '--ServerApp.port_retries=0', f'--ServerApp.token={token}', f'--ServerApp.root_dir={work}',
                 f'--LabApp.workspaces_dir={tmp_path/"workspaces"}', f'--LabApp.user_settings_dir={tmp_path/"settings"}',
                 '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate'], log=tmp_path/'lab.log', env=env, cwd=work)
    try:
        wait_for(f'http://127.0.0.1:{port}/api/status?token={token}', lab)
        r = node('lab.mjs', f'http://127.0.0.1:{port}', token, 'explore_study.ipynb', tmp_path)
    finally: stop(lab)
    b, a = r['before'], r['after']
    assert b['chart'] and a['chart'] and a['chart'] != b['chart'], r
    assert float(a['readout']) > float(b['readout']), r
    assert json.loads(a['chart'])['title'] != json.loads(b['chart'])['title'], r # it names the knob values and the count kept
    assert not any('Traceback' in s or 'Error' in s for s in r['stderr']), r['stderr']
    assert r['offsite'] == [] and r['errors'] == [], r
    for f in ('lab-before.png', 'lab-after.png'): assert (tmp_path/f).stat().st_size > 10_000, f
