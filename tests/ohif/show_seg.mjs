// Opens a study in the real OHIF viewer (headless Chromium), loads one DICOM-SEG series onto the CT the way a user
// does (double-click its thumbnail, answer Yes), lists the segments the segmentation panel shows, and takes
// screenshots of the viewport with all segments, with none, and with one segment alone.
//
// Usage: node show_seg.mjs REQUEST.json   (prints one JSON document on stdout; progress on stderr)
// REQUEST: {chromium, url, seg_description, segment_count, solo_segment, image_sop_instance_uid, out_dir,
//           chromium_pid_file, timeout_ms (one step), deadline_ms (the whole session)}
// image_sop_instance_uid: the CT image to show (the viewport scrolls to it), or null to keep the one OHIF shows.
// chromium_pid_file: where Chromium's process id goes once it runs (it leads a process group of its own, so the
// caller can end it should this script be killed).
// The caller serves OHIF and its DICOMweb data at `url` and parses the result; nothing here knows the data.

import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const request = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const timeout = request.timeout_ms;
const started = Date.now();
const log = (...words) => console.error(`[show_seg ${((Date.now() - started) / 1000).toFixed(1)} s]`, ...words);

// Software WebGL: Chromium has no GPU here; SwiftShader (through ANGLE) gives cornerstone a WebGL2 context.
const CHROMIUM_FLAGS = ['--no-sandbox', '--disable-dev-shm-usage', '--use-angle=swiftshader',
  '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist', '--no-first-run', '--no-default-browser-check',
  '--disable-extensions', '--disable-background-networking', '--window-size=1600,1000'];

// Memory of Chromium's whole process tree (browser, renderer, GPU, utility): proportional set size (shared pages
// split between the processes that map them, so the sum does not count them twice) and resident set size.
function processTreeMemory(rootPid) {
  const children = new Map();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const parent = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(Number(entry));
    } catch { /* the process ended meanwhile */ }
  }
  const pids = [];
  const pending = [rootPid];
  while (pending.length) {
    const pid = pending.pop();
    pids.push(pid);
    pending.push(...(children.get(pid) || []));
  }
  let pssKiB = 0;
  let rssKiB = 0;
  for (const pid of pids) {
    try {
      const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
      pssKiB += Number(/^Pss:\s+(\d+)/m.exec(rollup)[1]);
      rssKiB += Number(/^Rss:\s+(\d+)/m.exec(rollup)[1]);
    } catch { /* the process ended meanwhile */ }
  }
  return { processes: pids.length, pss_mib: pssKiB / 1024, rss_mib: rssKiB / 1024 };
}

// The JavaScript heap after a full garbage collection, so that what remains is what the page holds.
async function heap(cdp) {
  await cdp.send('HeapProfiler.collectGarbage');
  const { metrics } = await cdp.send('Performance.getMetrics');
  const value = name => metrics.find(metric => metric.name === name).value / 2 ** 20;
  return { js_heap_used_mib: value('JSHeapUsedSize'), js_heap_total_mib: value('JSHeapTotalSize') };
}

async function memory(browser, cdp) {
  return { ...(await heap(cdp)), ...processTreeMemory(browser.process().pid) };
}

// Two animation frames and a pause: cornerstone renders asynchronously after a state change.
async function settled(page, pauseMs = 1500) {
  await page.evaluate(() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done))));
  await new Promise(done => setTimeout(done, pauseMs));
}

// What the viewport shows, from cornerstone (OHIF exposes it as window.cornerstone): the displayed image, its
// plane, and canvas (CSS pixel) -> patient LPS world coordinates as an affine map, so the caller can tell which
// point of the patient each screenshot pixel shows.
async function viewportGeometry(page) {
  return page.evaluate(() => {
    const engine = window.cornerstone.getRenderingEngines()[0];
    const viewport = engine.getViewports().find(candidate => candidate.getCurrentImageId);
    const canvas = viewport.canvas || viewport.element.querySelector('canvas');
    const rect = canvas.getBoundingClientRect();
    const imageId = viewport.getCurrentImageId();
    const plane = window.cornerstone.metaData.get('imagePlaneModule', imageId) || {};
    const general = window.cornerstone.metaData.get('generalImageModule', imageId) || {};
    const { voiRange } = viewport.getProperties();
    return {
      voi_range: voiRange ? [voiRange.lower, voiRange.upper] : null,
      canvas_rect_css_px: [rect.left, rect.top, rect.width, rect.height],
      device_pixel_ratio: window.devicePixelRatio,
      world_at_canvas_origin: Array.from(viewport.canvasToWorld([0, 0])),
      world_per_canvas_x: Array.from(viewport.canvasToWorld([1, 0])),
      world_per_canvas_y: Array.from(viewport.canvasToWorld([0, 1])),
      image_index: viewport.getCurrentImageIdIndex(),
      image_count: viewport.getImageIds().length,
      instance_number: general.instanceNumber ?? null,
      image_position_patient: plane.imagePositionPatient ?? null,
      image_orientation_patient: plane.rowCosines ? [...plane.rowCosines, ...plane.columnCosines] : null,
    };
  });
}

async function viewportShot(page, file) {
  const pane = await page.$('[data-cy="viewport-pane"]');
  await pane.screenshot({ path: file });
  const box = await pane.boundingBox();
  return { file, rect_css_px: [box.x, box.y, box.width, box.height] };
}

// The pointer rests over the study list afterwards: hovering a segment row or the viewport opens pop-overs.
async function clickAway(page, handle, clickCount = 1) {
  await handle.click({ count: clickCount });
  await page.mouse.move(5, 995);
}

async function clickByText(page, selector, text, clickCount = 1) {
  const handle = await page.waitForFunction((sel, wanted) => [...document.querySelectorAll(sel)]
    .find(element => element.innerText.trim() === wanted), { timeout, polling: 100 }, selector, text);
  await clickAway(page, handle.asElement(), clickCount);
}

// The segmentation panel's rows, once each shows its colour dot (OHIF sets the dot's colour inline): title and
// the colour as CSS gives it, e.g. "rgb(50, 170, 60)".
async function segmentRows(page) {
  const rows = await page.waitForFunction(() => {
    const found = [...document.querySelectorAll('[data-cy="data-row"]')].map(row => ({
      title: row.querySelector('[data-cy="data-row-title"]')?.innerText.trim() ?? '',
      colour: row.querySelector('[data-cy="data-row-colorhex"]')?.style.backgroundColor ?? '',
    }));
    return found.length && found.every(row => row.title && row.colour) && found;
  }, { timeout, polling: 100 });
  return rows.jsonValue();
}

async function run(browser) {
  const page = await browser.newPage();
  await page.setViewport({ width: 1600, height: 1000 });
  const consoleErrors = [];
  page.on('console', message => { if (message.type() === 'error') consoleErrors.push(message.text().slice(0, 300)); });
  page.on('pageerror', error => consoleErrors.push(`page error: ${error.message.slice(0, 300)}`));
  const cdp = await page.createCDPSession();
  await cdp.send('Performance.enable');
  const result = { seg_description: request.seg_description, timings_s: {}, memory: {}, shots: {} };
  const since = t0 => (Date.now() - t0) / 1000;

  const navigated = Date.now();
  await page.goto(request.url, { waitUntil: 'domcontentloaded', timeout });
  // The CT is on screen once cornerstone's viewport holds an image and the overlay numbers it.
  await page.waitForFunction(() => {
    const engine = window.cornerstone?.getRenderingEngines?.()[0];
    const viewport = engine?.getViewports().find(candidate => candidate.getCurrentImageId);
    return Boolean(viewport?.getCurrentImageId()) &&
      /\(\d+\/\d+\)/.test(document.querySelector('[data-cy="viewport-overlay-bottom-right"]')?.innerText ?? '');
  }, { timeout, polling: 100 });
  result.timings_s.navigation_to_ct_displayed = since(navigated);
  await settled(page);
  result.memory.ct_displayed = await memory(browser, cdp);
  log('CT displayed', result.timings_s.navigation_to_ct_displayed);

  await clickAway(page, await page.$('[data-cy="panelSegmentation-btn"]'));
  const segLoad = Date.now();
  await clickByText(page, '[data-cy="series-description-label"]', request.seg_description, 2);
  await clickByText(page, 'button', 'Yes');
  await page.waitForFunction(count => document.querySelectorAll('[data-cy="data-row-title"]').length >= count,
    { timeout, polling: 100 }, request.segment_count);
  result.timings_s.seg_double_click_to_segments_listed = since(segLoad);
  result.timings_s.navigation_to_segments_listed = since(navigated);
  log('segments listed', result.timings_s.seg_double_click_to_segments_listed);
  await settled(page);
  result.memory.seg_displayed = await memory(browser, cdp);
  result.segments = await segmentRows(page);
  result.selected_segmentation = await page.$eval('[data-cy="segmentation-select-value"]', e => e.innerText.trim())
    .catch(() => null);
  result.orientation_markers = await page.$$eval('[data-cy="viewport-pane"] *', elements => elements
    .filter(element => element.children.length === 0 && /^[ARLPSIH]$/.test(element.innerText?.trim() ?? ''))
    .map(element => {
      const box = element.getBoundingClientRect();
      return { text: element.innerText.trim(), x: box.x + box.width / 2, y: box.y + box.height / 2 };
    }));

  if (request.image_sop_instance_uid) {
    const found = await page.evaluate(uid => {
      const engine = window.cornerstone.getRenderingEngines()[0];
      const viewport = engine.getViewports().find(candidate => candidate.getCurrentImageId);
      const index = viewport.getImageIds().findIndex(imageId => imageId.includes(`/instances/${uid}/`));
      if (index >= 0) viewport.setImageIdIndex(index);
      return index;
    }, request.image_sop_instance_uid);
    if (found < 0) throw new Error(`the viewport holds no image of SOP instance ${request.image_sop_instance_uid}`);
    await settled(page);
  }
  result.geometry = await viewportGeometry(page);
  await page.screenshot({ path: path.join(request.out_dir, 'viewer.png') });
  result.shots.viewer = path.join(request.out_dir, 'viewer.png');
  result.shots.all_segments = await viewportShot(page, path.join(request.out_dir, 'all_segments.png'));
  await clickAway(page, await page.$('[data-cy="all-segments-visibility-toggle"]'));
  await settled(page);
  result.shots.no_segment = await viewportShot(page, path.join(request.out_dir, 'no_segment.png'));
  const solo = (await segmentRows(page)).findIndex(row => row.title === request.solo_segment);
  if (solo >= 0) {
    const toggles = await page.$$('[data-cy="data-row"] [data-cy="data-row-visibility-toggle"]');
    await clickAway(page, toggles[solo]);
    await settled(page);
    result.shots.solo_segment = await viewportShot(page, path.join(request.out_dir, 'solo_segment.png'));
  }
  const after = await viewportGeometry(page);
  result.geometry_unchanged = JSON.stringify(after) === JSON.stringify(result.geometry);
  result.console_errors = consoleErrors;
  return result;
}

const profile = mkdtempSync(path.join(tmpdir(), 'ohif-chromium-'));
let browser;

// Chromium leads a process group of its own (puppeteer starts it detached): end the whole group.
function killChromium() {
  const pid = browser?.process()?.pid;
  try {
    if (pid) process.kill(-pid, 'SIGKILL');
  } catch { /* already gone */ }
}

// A hard deadline for the whole session: Chromium is ended and the script exits even when a step hangs.
const deadline = setTimeout(() => {
  log(`ran past its deadline of ${request.deadline_ms} ms`);
  killChromium();
  rmSync(profile, { recursive: true, force: true });
  process.exit(3);
}, request.deadline_ms);
try {
  browser = await puppeteer.launch({
    executablePath: request.chromium, headless: true, args: CHROMIUM_FLAGS, userDataDir: profile,
    defaultViewport: { width: 1600, height: 1000 }, protocolTimeout: timeout,
  });
  writeFileSync(request.chromium_pid_file, `${browser.process().pid}\n`);
  const result = await run(browser);
  log('done');
  result.chromium = await browser.version();
  process.stdout.write(JSON.stringify(result) + '\n');
} finally {
  clearTimeout(deadline);
  if (browser) await browser.close().catch(killChromium);
  rmSync(profile, { recursive: true, force: true });
}
