'use strict';

// Polls the master's dashboard data and draws it. Every string from the master goes in
// through textContent, never as markup.

const POLL_MS = 2000;
const SVG_NS = 'http://www.w3.org/2000/svg';
const CHART_W = 300;
const CHART_H = 90;

function $(id) {
  return document.getElementById(id);
}

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

function groupThousands(n) {
  return Math.round(n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  const digits = i === 0 || n >= 100 ? 0 : 1;
  return n.toFixed(digits) + ' ' + units[i];
}

function rate(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (n >= 1e4) return (n / 1e3).toFixed(1) + 'k';
  if (n >= 100 || n === 0) return groupThousands(n);
  return n.toFixed(1);
}

function percent(share) {
  return share === null || share === undefined ? '–' : (share * 100).toFixed(1) + '%';
}

function last(values) {
  return values.length ? values[values.length - 1] : null;
}

// Steadier than the last sample alone, and still recent.
const MEAN_OF = 10;

function recentMean(values) {
  const recent = values.slice(-MEAN_OF);
  return recent.reduce((sum, v) => sum + v, 0) / recent.length;
}

function meanNote(rates) {
  const seconds = Math.round(Math.min(rates.ops.length, MEAN_OF) * rates.interval_s);
  return 'last ' + seconds + ' s';
}

/** A table cell of `text` (as text, never markup) appended to `row`. */
function appendCell(row, text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  row.append(td);
  return td;
}

function svg(name, attrs) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

// Draws each series (values, class) across the chart; null values leave a gap.
function drawChart(id, series, ceiling) {
  const chart = $(id);
  chart.replaceChildren();
  const longest = Math.max(0, ...series.map((s) => s.values.length));
  if (longest < 2) {
    chart.append(svg('text', { x: 6, y: CHART_H / 2, class: 'empty' }));
    chart.lastChild.textContent = 'collecting samples…';
    return;
  }
  const top = ceiling > 0 ? ceiling : 1;
  const x = (i) => (i * CHART_W) / (longest - 1);
  const y = (v) => CHART_H - 2 - (Math.min(v, top) / top) * (CHART_H - 6);
  for (const { values, cls, area } of series) {
    const offset = longest - values.length;
    let path = '';
    let run = [];
    const flush = () => {
      if (run.length === 0) return;
      path += run.map(([px, py], k) => (k === 0 ? 'M' : 'L') + px.toFixed(1) + ' ' + py.toFixed(1)).join(' ') + ' ';
      if (area && run.length > 1) {
        const first = run[0][0].toFixed(1);
        const end = run[run.length - 1][0].toFixed(1);
        const fill = run.map(([px, py]) => px.toFixed(1) + ' ' + py.toFixed(1)).join(' L');
        chart.append(svg('path', { d: 'M' + first + ' ' + CHART_H + ' L' + fill + ' L' + end + ' ' + CHART_H + ' Z', class: 'area ' + cls }));
      }
      run = [];
    };
    values.forEach((v, i) => {
      if (v === null || v === undefined) flush();
      else run.push([x(i + offset), y(v)]);
    });
    flush();
    if (path) chart.append(svg('path', { d: path.trim(), class: 'series ' + cls }));
  }
}

function windowText(rates) {
  const seconds = Math.round(rates.ops.length * rates.interval_s);
  if (seconds < 2) return '';
  return seconds >= 120 ? 'last ' + Math.round(seconds / 60) + ' min' : 'last ' + seconds + ' s';
}

function renderTotals(d) {
  const role = $('role');
  role.textContent = d.role;
  role.className = 'badge ' + d.role;
  setText('keys', groupThousands(d.keys));
  setText('keys-note', d.soft_pinned_keys ? groupThousands(d.soft_pinned_keys) + ' soft-pinned' : 'none soft-pinned');
  setText('hit-rate', d.gets ? percent(d.hits / d.gets) : '–');
  setText('hit-note', groupThousands(d.hits) + ' of ' + groupThousands(d.gets) + ' reads');
  setText('clients', groupThousands(d.active_clients));
  setText('evicted', groupThousands(d.evicted_keys));
  setText('evicted-note', bytes(d.evicted_bytes) + ' in ' + groupThousands(d.eviction_rounds) + ' rounds');
  const r = d.rates;
  const sampled = r.ops.length > 0;
  setText('ops', sampled ? rate(recentMean(r.ops)) : '–');
  setText('ops-note', sampled ? meanNote(r) + ', no pings' : 'no pings');
  setText('put-rate', sampled ? bytes(recentMean(r.put_bytes)) : '–');
  setText('get-rate', sampled ? bytes(recentMean(r.get_bytes)) : '–');
  setText('put-note', (sampled ? meanNote(r) + '; ' : '') + bytes(d.put_bytes) + ' in all');
  setText('get-note', (sampled ? meanNote(r) + '; ' : '') + bytes(d.get_bytes) + ' in all');
}

function renderCharts(r) {
  setText('ops-window', windowText(r));
  const opsPeak = Math.max(0, ...r.ops);
  drawChart('ops-chart', [{ values: r.ops, cls: 'ops', area: true }], opsPeak * 1.1);
  setText('ops-peak', r.ops.length ? 'peak ' + rate(opsPeak) + '/s' : '');
  const bytesPeak = Math.max(0, ...r.put_bytes, ...r.get_bytes);
  drawChart('bytes-chart', [
    { values: r.put_bytes, cls: 'put' },
    { values: r.get_bytes, cls: 'get' },
  ], bytesPeak * 1.1);
  setText('bytes-peak', r.put_bytes.length ? 'peak ' + bytes(bytesPeak) + '/s' : '');
  drawChart('hits-chart', [{ values: r.hit_rate, cls: 'hits', area: true }], 1);
  const seen = r.hit_rate.filter((v) => v !== null);
  setText('hits-peak', seen.length ? 'now ' + percent(last(seen)) + ', lowest ' + percent(Math.min(...seen)) : 'no reads yet');
}

function renderSegments(d) {
  const rows = $('segment-rows');
  rows.replaceChildren();
  $('no-segments').hidden = d.segments.length > 0;
  $('segments').hidden = d.segments.length === 0;
  for (const s of d.segments) {
    const share = s.capacity ? s.used / s.capacity : 0;
    const row = document.createElement('tr');
    const cell = (text, cls) => appendCell(row, text, cls);
    cell(s.name, 'name');
    const bar = cell('', 'bar-col');
    const track = document.createElement('div');
    track.className = 'track';
    const fill = document.createElement('div');
    fill.className = 'fill' + (share >= 0.95 ? ' full' : share >= 0.8 ? ' high' : '');
    fill.style.width = (share * 100).toFixed(2) + '%';
    track.append(fill);
    bar.append(track);
    track.title = bytes(s.capacity - s.used) + ' free';
    cell(bytes(s.used), 'num');
    cell(bytes(s.capacity), 'num');
    cell(percent(share), 'num');
    rows.append(row);
  }
  const total = d.capacity_bytes ? d.allocated_bytes / d.capacity_bytes : 0;
  setText('memory-total', bytes(d.allocated_bytes) + ' of ' + bytes(d.capacity_bytes) + ' used (' + percent(total) + ') on ' + d.segments.length + (d.segments.length === 1 ? ' node' : ' nodes'));
}

const RAIL_COLUMNS = 5;

function tally(count, one, many) {
  return groupThousands(count) + ' ' + (count === 1 ? one : many);
}

// One body per node: a heading row with the node's name, then a row per rail.
function renderRails(d) {
  const table = $('rails');
  for (const body of table.querySelectorAll('tbody')) body.remove();
  $('no-rails').hidden = d.rails.length > 0;
  table.hidden = d.rails.length === 0;
  const states = { usable: 0, paused: 0, failed: 0 };
  let count = 0;
  for (const node of d.rails) {
    const body = document.createElement('tbody');
    const heading = document.createElement('tr');
    heading.className = 'node-row';
    const th = document.createElement('th');
    th.colSpan = RAIL_COLUMNS;
    th.scope = 'rowgroup';
    const name = document.createElement('span');
    name.className = 'node-name';
    name.textContent = node.node === null ? 'clients without a segment' : node.node;
    const note = document.createElement('span');
    note.className = 'note';
    note.textContent = tally(node.rails.length, 'rail', 'rails');
    th.append(name, note);
    heading.append(th);
    body.append(heading);
    for (const rail of node.rails) {
      const row = document.createElement('tr');
      const cell = (text, cls) => appendCell(row, text, cls);
      cell(rail.peer, 'name');
      cell(rail.local + ' → ' + rail.remote, 'name path');
      const badge = document.createElement('span');
      badge.className = 'state ' + rail.state;
      badge.textContent = rail.state;
      cell('').append(badge);
      cell(bytes(rail.bytes), 'num');
      cell(groupThousands(rail.failures), 'num' + (rail.failures > 0 ? ' failures' : ''));
      body.append(row);
      if (rail.state in states) states[rail.state] += 1;
      count += 1;
    }
    table.append(body);
  }
  const troubled = [];
  if (states.paused) troubled.push(groupThousands(states.paused) + ' paused');
  if (states.failed) troubled.push(groupThousands(states.failed) + ' failed');
  setText('rails-total', count ? tally(count, 'rail', 'rails') + ' on ' + tally(d.rails.length, 'node', 'nodes') + (troubled.length ? '; ' + troubled.join(', ') : '; all usable') : '');
}

function renderHa(ha) {
  $('ha').hidden = !ha;
  if (!ha) return;
  setText('ha-leader', ha.leader || 'none known');
  setText('ha-view', String(ha.view_version));
  setText('ha-lag', groupThousands(ha.lag));
  setText('ha-failovers', groupThousands(ha.failovers));
}

function render(d) {
  renderTotals(d);
  renderCharts(d.rates);
  renderSegments(d);
  renderRails(d);
  renderHa(d.ha);
  const status = $('status');
  status.className = 'status';
  status.textContent = 'updated ' + new Date().toLocaleTimeString();
}

async function poll() {
  try {
    const answer = await fetch('dashboard/data', { cache: 'no-store' });
    if (!answer.ok) throw new Error('HTTP ' + answer.status);
    render(await answer.json());
  } catch (e) {
    const status = $('status');
    status.className = 'status lost';
    status.textContent = 'no answer from the master (' + e.message + '); retrying';
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener('DOMContentLoaded', poll);
