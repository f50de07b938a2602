// Launch Debian's Chromium through playwright-core, headless, with a fresh profile and no background traffic.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync'];

// Run `fn(page, {offsite, errors})` in a fresh browser; requests to any host but 127.0.0.1 are refused and listed in
// `offsite`, script errors of the page are listed in `errors`; if `fn` fails, the page is saved as `failShot` first.
export async function withPage(fn, failShot) {
  const profile = mkdtempSync(join(tmpdir(), 'chromium-profile-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: ARGS, viewport: { width: 1280, height: 900 } });
  const offsite = [];
  await context.route('**/*', route => {
    const url = new URL(route.request().url());
    if (url.hostname === '127.0.0.1' || url.protocol === 'data:' || url.protocol === 'blob:') return route.continue();
    offsite.push(url.href); return route.abort();
  });
  try {
    const page = context.pages()[0] || await context.newPage();
    const errors = [];
    page.on('pageerror', e => errors.push(String(e)));
    try { return await fn(page, { offsite, errors }); }
    catch (e) { if (failShot) await page.screenshot({ path: failShot }).catch(() => null); throw e; }
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

// Print `result` as one JSON line (the Python test reads the last line) and set the exit code.
export function report(promise) {
  promise.then(r => { console.log(JSON.stringify(r)); }, e => { console.error(e); process.exitCode = 1; });
}
