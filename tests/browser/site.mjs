// Load the docs index and a page with plotly charts from a local server; screenshot each.
// usage: node site.mjs BASE_URL SCREENSHOT_DIR INDEX_PAGE CHART_PAGE
import { withPage, report } from './chromium.mjs';
import { join } from 'node:path';

const [base, shots, indexPage, chartPage] = process.argv.slice(2);

report(withPage(async (page, { offsite, errors }) => {
  await page.goto(`${base}/${indexPage}`, { waitUntil: 'load' });
  const index = await page.evaluate(() => ({
    title: document.title,
    h1: document.querySelector('h1')?.innerText.replace(/[#¶]/g, '').trim(),
    nav: [...document.querySelectorAll('.sidebar-tree a.reference')].map(a => a.getAttribute('href')),
  }));
  await page.screenshot({ path: join(shots, 'index.png') });

  await page.goto(`${base}/${chartPage}`, { waitUntil: 'load' });
  await page.waitForSelector('.js-plotly-plot .main-svg', { timeout: 30000 });
  await page.evaluate(() => { // scroll down to the first chart (scrolling up would show the theme's back-to-top button)
    const top = document.querySelector('.js-plotly-plot').getBoundingClientRect().top;
    window.scrollTo({ top: window.scrollY + top - 200, behavior: 'instant' }); // the theme scrolls smoothly otherwise
  });
  await page.waitForTimeout(300);
  const chart = await page.evaluate(() => {
    const plots = [...document.querySelectorAll('.js-plotly-plot')];
    return {
      title: document.title,
      plots: plots.length,
      drawn: plots.filter(p => p.querySelector('.main-svg')).length,
      traces: plots[0]._fullData.length,
      points: document.querySelectorAll('.js-plotly-plot .scatterlayer .point').length,
    };
  });
  await page.screenshot({ path: join(shots, 'chart.png') });
  return { index, chart, offsite, errors };
}, join(shots, 'failed.png')));
