import { PassThrough } from 'node:stream'

import test from 'ava'

import { escapeXml, formatSize, renderChart, type Chart } from '../src/chart'
import { formatRate, startProgress } from '../src/progress'

/**
 * A strict check of the XML the chart module writes: one prolog, every tag well formed with
 * quoted attributes, tags closed in order, and text free of raw `<` and stray `&`.
 */
function checkWellFormed(svg: string): string[] {
  const problems: string[] = []
  const body = svg.replace(/^<\?xml [^?]*\?>\s*/, '')
  const stack: string[] = []
  let at = 0
  for (const match of body.matchAll(/<[^>]*>/g)) {
    const text = body.slice(at, match.index)
    if (/[<>]/.test(text) || /&(?!(amp|lt|gt|quot|apos);)/.test(text)) problems.push(`bad text: ${text.slice(0, 40)}`)
    at = match.index! + match[0].length
    const tag = match[0]
    const parsed = /^<(\/?)([A-Za-z][\w:-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>$/.exec(tag)
    if (!parsed) {
      problems.push(`malformed tag: ${tag}`)
      continue
    }
    const [, closing, name, attributes, selfClosing] = parsed
    if (/&(?!(amp|lt|gt|quot|apos);)/.test(attributes)) problems.push(`bad attribute text: ${tag}`)
    if (closing) {
      const open = stack.pop()
      if (open !== name) problems.push(`</${name}> closes <${open}>`)
    } else if (!selfClosing) {
      stack.push(name)
    }
  }
  if (body.slice(at).trim()) problems.push('text after the root element')
  if (stack.length) problems.push(`unclosed: ${stack.join(', ')}`)
  return problems
}

const chart: Chart = {
  title: 'Store <vs> Redis & co',
  subtitle: 'loopback',
  xLabel: 'value size',
  yLabel: 'GB/s',
  panels: [
    {
      title: 'put',
      series: [
        { name: 'Mooncake "copy"', points: [{ x: 65536, y: 1.5 }, { x: 1 << 20, y: 4.25 }, { x: 4 << 20, y: 5 }] },
        { name: 'Redis & ioredis', points: [{ x: 65536, y: 0.5 }, { x: 1 << 20, y: 1 }, { x: 4 << 20, y: Number.NaN }] },
      ],
    },
    {
      title: 'get',
      series: [
        { name: 'Mooncake "copy"', points: [{ x: 1 << 20, y: 6 }, { x: 65536, y: 2 }] },
        { name: '<redis-benchmark>', points: [{ x: 65536, y: 0.7 }] },
      ],
    },
  ],
}

test('the chart is a well-formed, self-contained SVG with every series, panel and axis label', (t) => {
  const svg = renderChart(chart)
  t.deepEqual(checkWellFormed(svg), [])
  t.true(svg.startsWith('<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg"'))
  t.false(/href=|<script|url\(|@import/.test(svg), 'no outside assets')
  for (const name of ['Mooncake "copy"', 'Redis & ioredis', '<redis-benchmark>']) {
    t.true(svg.includes(`data-series="${escapeXml(name)}"`), `series ${name}`)
    t.true(svg.includes(`>${escapeXml(name)}</text>`), `legend entry for ${name}`)
  }
  // One line per series per panel it appears in; a point that is not finite is left out.
  t.is(svg.match(/<polyline /g)?.length, 4)
  t.is(svg.match(/<circle /g)?.length, 3 + 2 + 2 + 1)
  for (const text of ['>put</text>', '>get</text>', '>64 KiB</text>', '>1 MiB</text>', '>4 MiB</text>', 'value size (log scale)', '>GB/s</text>']) {
    t.true(svg.includes(text), text)
  }
  t.true(svg.includes(escapeXml('Store <vs> Redis & co')))
})

test('the size axis is logarithmic: equal ratios of size are equal distances', (t) => {
  const svg = renderChart({ title: 't', xLabel: 'x', yLabel: 'y', panels: [{ title: 'p', series: [{ name: 's', points: [1024, 4096, 16384].map((x) => ({ x, y: 1 })) }] }] })
  const xs = [...svg.matchAll(/<circle cx="([\d.]+)"/g)].map((m) => Number(m[1]))
  t.is(xs.length, 3)
  t.true(Math.abs(xs[1] - xs[0] - (xs[2] - xs[1])) < 0.2)
})

test('an empty chart still renders well formed', (t) => {
  t.deepEqual(checkWellFormed(renderChart({ title: 'nothing yet', xLabel: 'x', yLabel: 'y', panels: [] })), [])
})

test('control characters in labels and points off the axis never make the document malformed', (t) => {
  const svg = renderChart({
    title: 'bell\u0007 and nul\u0000',
    xLabel: 'x',
    yLabel: 'y',
    panels: [{ title: 'p\u001b[1m', series: [{ name: 's\u0001', points: [{ x: Number.POSITIVE_INFINITY, y: 1 }, { x: 4096, y: 2 }] }] }],
  })
  t.deepEqual(checkWellFormed(svg), [])
  t.false(/[\u0000-\u0008\u000b\u000c\u000e-\u001f]/.test(svg))
  t.false(svg.includes('NaN'))
  t.is(svg.match(/<circle /g)?.length, 1)
})

test('sizes read as binary units', (t) => {
  t.is(formatSize(512), '512 B')
  t.is(formatSize(65536), '64 KiB')
  t.is(formatSize(1 << 20), '1 MiB')
  t.is(formatSize(1.5 * 2 ** 30), '1.5 GiB')
})

test('the progress rate is completed bytes over elapsed wall time', (t) => {
  t.is(formatRate({ bytes: 3e9, seconds: 2 }), '1.50 GB/s, 3.00 GB')
  t.is(formatRate({ bytes: 5e8, seconds: 0 }), '0.50 GB')
  t.is(formatRate({}), '')
})

test('no progress line is drawn off a terminal or when disabled', (t) => {
  const stream = Object.assign(new PassThrough(), { isTTY: false }) as unknown as NodeJS.WriteStream
  let written = ''
  ;(stream as unknown as PassThrough).on('data', (chunk: Buffer) => (written += chunk.toString()))
  let polled = 0
  const offTerminal = startProgress({ total: 3, unit: 's', enabled: true, stream }, () => ({ done: polled++ }))
  const disabled = startProgress({ total: 3, unit: 's', enabled: false }, () => ({ done: polled++ }))
  t.false(offTerminal.active)
  t.false(disabled.active)
  offTerminal.stop()
  disabled.stop()
  t.is(polled, 0)
  t.is(written, '')
})
