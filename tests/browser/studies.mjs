// Open each study chapter page, find its main chart by title, count the points drawn, screenshot the chart.
// usage: node studies.mjs BASE_URL SCREENSHOT_DIR PAGE|TITLE ...
import { withPage, report } from './chromium.mjs';
import { join } from 'node:path';

const [base, shots, ...specs] = process.argv.slice(2);

report(withPage(async (page, { offsite, errors }) => {
  const charts = [];
  for (const spec of specs) {
    const [name, title] = spec.split('|');
    await page.goto(`${base}/${name}.html`, { waitUntil: 'load' });
    await page.waitForSelector('.js-plotly-plot .main-svg', { timeout: 30000 });
    const found = await page.evaluate((title) => {
      const plot = [...document.querySelectorAll('.js-plotly-plot')].find(p => p.layout?.title?.text === title);
      if (!plot) return null;
      plot.id = 'main-chart';
      plot.scrollIntoView({ block: 'center', behavior: 'instant' });
      const markers = plot._fullData.filter(t => t.mode === 'markers');
      return {
        points: markers.reduce((n, t) => n + t.x.length, 0),
        drawn: plot.querySelectorAll('.scatterlayer .trace .point').length,
        traces: plot._fullData.length,
      };
    }, title);
    if (found) await page.locator('#main-chart').screenshot({ path: join(shots, `${name.replace('/', '_')}.png`) });
    charts.push({ name, title, ...(found || { points: 0, drawn: 0, traces: 0, missing: true }) });
  }
  return { charts, offsite, errors };
}, join(shots, 'failed.png')));
