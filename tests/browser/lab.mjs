// In JupyterLab: open a notebook, run all cells, move the first slider by keyboard and wait for the chart to change.
// usage: node lab.mjs BASE_URL TOKEN NOTEBOOK SCREENSHOT_DIR
import { withPage, report } from './chromium.mjs';
import { join } from 'node:path';

const [base, token, notebook, shots] = process.argv.slice(2);
const T = 90000;

// What the chart shows: its title and the x and y of every trace.
const chartState = () => {
  const gd = document.querySelector('.jp-OutputArea .js-plotly-plot');
  if (!gd || !gd._fullData) return null;
  return JSON.stringify({ title: gd._fullLayout?.title?.text,
                          traces: gd._fullData.map(t => [Array.from(t.x || []), Array.from(t.y || [])]) });
};

// Wait until the notebook's kernel is idle, accepting JupyterLab's kernel choice if it asks.
async function kernelStarted(page) {
  const accept = page.locator('.jp-Dialog .jp-mod-accept');
  for (const end = Date.now() + T; Date.now() < end; await page.waitForTimeout(500)) {
    if (await accept.isVisible()) await accept.click();
    const r = await fetch(`${base}/api/kernels?token=${token}`);
    if (r.ok && (await r.json()).some(k => k.execution_state === 'idle')) return;
  }
  throw new Error(`no kernel started within ${T / 1000} s`);
}

report(withPage(async (page, { offsite, errors }) => {
  await page.goto(`${base}/lab/tree/${notebook}?token=${token}`, { waitUntil: 'load' });
  await page.waitForSelector('.jp-NotebookPanel .jp-Cell', { timeout: T });
  await kernelStarted(page);
  await page.locator('.lm-MenuBar-itemLabel', { hasText: /^Run$/ }).click();
  await page.locator('.lm-Menu-itemLabel', { hasText: /^Run All Cells$/ }).click();
  await page.waitForSelector('.jp-OutputArea .js-plotly-plot .main-svg', { timeout: T });
  await page.waitForFunction(chartState, null, { timeout: T });
  const before = { chart: await page.evaluate(chartState), readout: await page.locator('.widget-readout').first().innerText() };
  await page.screenshot({ path: join(shots, 'lab-before.png') });

  await page.locator('.widget-slider .noUi-handle').first().focus();
  for (let i = 0; i < 10; i++) await page.keyboard.press('ArrowRight');
  const changed = `(() => { const s = (${chartState.toString()})(); return s !== null && s !== ${JSON.stringify(before.chart)}; })()`;
  await page.waitForFunction(changed, null, { timeout: T }).catch(() => null); // the test compares before and after
  await kernelStarted(page); // idle again: every key press has been handled
  await page.waitForTimeout(1000);
  const after = { chart: await page.evaluate(chartState), readout: await page.locator('.widget-readout').first().innerText() };
  await page.screenshot({ path: join(shots, 'lab-after.png') });
  const stderr = await page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').allInnerTexts();
  return { before, after, stderr, offsite, errors };
}, join(shots, 'lab-failed.png')));
