/**
 * Bench charts: throughput by block size, one line per series on a log-scale size axis, as a
 * self-contained SVG (no scripts, fonts or other outside assets). Used by `mooncake
 * bench-store --chart` and `benches/transfer.mjs`, so that every bench draws the same way.
 */

/** One measured point: `x` a size in bytes, `y` the figure (GB/s, say). */
export interface ChartPoint {
  x: number
  y: number
}

/** A line: one system or baseline. Series of the same name share a colour across panels. */
export interface ChartSeries {
  name: string
  points: ChartPoint[]
}

/** One plot of the chart (one per operation, say), side by side with the others. */
export interface ChartPanel {
  title: string
  series: ChartSeries[]
}

/** What {@link renderChart} draws. */
export interface Chart {
  title: string
  /** A line under the title (the setup the figures come from). */
  subtitle?: string
  xLabel: string
  yLabel: string
  panels: ChartPanel[]
  /** Labels of the x ticks. Default: sizes in B, KiB, MiB, GiB. */
  formatX?: (x: number) => string
  /** Total width in pixels. Default 480 per panel, at least 640. */
  width?: number
  /** Height of the plots in pixels. Default 320. */
  plotHeight?: number
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#7f7f7f', '#bcbd22']

const MARGIN = { left: 64, right: 16, top: 70, panelTop: 28, bottom: 62 }
const LEGEND_ROW = 20

/** `bytes` as `512 B`, `64 KiB`, `1 MiB`, `1.5 GiB`. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let value = bytes
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit++
  }
  return `${Number.isInteger(value) ? value : value.toFixed(1)} ${units[unit]}`
}

/** Text made safe inside an XML element or attribute. */
export function escapeXml(text: string): string {
  // Control characters other than tab and line breaks are not allowed anywhere in XML 1.0.
  return text.replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f]/g, '').replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;')
}

/** A round step for about `count` ticks up to `max`. */
function tickStep(max: number, count: number): number {
  const raw = max / count
  const magnitude = 10 ** Math.floor(Math.log10(raw))
  const fraction = raw / magnitude
  return (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10) * magnitude
}

const fixed = (n: number) => (Number.isInteger(n) ? String(n) : n.toFixed(1))

/** The chart as an SVG document. Points whose `x` is not positive or whose `y` is not finite are left out. */
export function renderChart(chart: Chart): string {
  const formatX = chart.formatX ?? formatSize
  const plotted = (points: ChartPoint[]) => points.filter((p) => p.x > 0 && Number.isFinite(p.x) && Number.isFinite(p.y)).sort((a, b) => a.x - b.x)
  const panels = chart.panels.map((panel) => ({ ...panel, series: panel.series.map((s) => ({ name: s.name, points: plotted(s.points) })) }))
  const names = [...new Set(panels.flatMap((p) => p.series.map((s) => s.name)))]
  const color = (name: string) => COLORS[names.indexOf(name) % COLORS.length]
  const all = panels.flatMap((p) => p.series.flatMap((s) => s.points))
  const xs = [...new Set(all.map((p) => p.x))].sort((a, b) => a - b)
  let [logMin, logMax] = xs.length ? [Math.log2(xs[0]), Math.log2(xs[xs.length - 1])] : [0, 1]
  if (logMax - logMin < 1e-9) [logMin, logMax] = [logMin - 1, logMax + 1]
  const pad = (logMax - logMin) * 0.08
  ;[logMin, logMax] = [logMin - pad, logMax + pad]
  const yMax = Math.max(0, ...all.map((p) => p.y))
  const step = tickStep(yMax > 0 ? yMax * 1.05 : 1, 5)
  const yTop = Math.max(step, Math.ceil((yMax * 1.05) / step) * step)

  const count = Math.max(1, panels.length)
  const width = chart.width ?? Math.max(640, 480 * count)
  const plotHeight = chart.plotHeight ?? 320
  const panelWidth = (width - MARGIN.left) / count
  const plotWidth = panelWidth - MARGIN.right - (count > 1 ? 24 : 0)
  const legendColumns = Math.max(1, Math.floor(width / 220))
  const legendTop = MARGIN.top + MARGIN.panelTop + plotHeight + MARGIN.bottom
  const height = legendTop + Math.ceil(names.length / legendColumns) * LEGEND_ROW + 16

  const out: string[] = []
  out.push(`<?xml version="1.0" encoding="UTF-8"?>`)
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
  )
  out.push(`<title>${escapeXml(chart.title)}</title>`)
  out.push(`<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`)
  out.push(`<text x="${width / 2}" y="26" text-anchor="middle" font-size="17" font-weight="bold">${escapeXml(chart.title)}</text>`)
  if (chart.subtitle) out.push(`<text x="${width / 2}" y="46" text-anchor="middle" fill="#555555">${escapeXml(chart.subtitle)}</text>`)

  panels.forEach((panel, index) => {
    const left = MARGIN.left + index * panelWidth
    const top = MARGIN.top + MARGIN.panelTop
    const sx = (x: number) => left + ((Math.log2(x) - logMin) / (logMax - logMin)) * plotWidth
    const sy = (y: number) => top + plotHeight - (y / yTop) * plotHeight
    out.push(`<g class="panel" data-panel="${escapeXml(panel.title)}">`)
    out.push(`<text x="${left + plotWidth / 2}" y="${top - 10}" text-anchor="middle" font-size="14" font-weight="bold">${escapeXml(panel.title)}</text>`)
    for (let y = 0; y <= yTop + step / 2; y += step) {
      const py = sy(y).toFixed(1)
      out.push(`<line x1="${left}" y1="${py}" x2="${left + plotWidth}" y2="${py}" stroke="#e0e0e0"/>`)
      out.push(`<text x="${left - 6}" y="${py}" text-anchor="end" dominant-baseline="middle" fill="#333333">${fixed(Number(y.toPrecision(6)))}</text>`)
    }
    for (const x of xs) {
      const px = sx(x).toFixed(1)
      out.push(`<line x1="${px}" y1="${top}" x2="${px}" y2="${top + plotHeight}" stroke="#f0f0f0"/>`)
      out.push(`<text x="${px}" y="${top + plotHeight + 18}" text-anchor="middle" fill="#333333">${escapeXml(formatX(x))}</text>`)
    }
    out.push(`<rect x="${left}" y="${top}" width="${plotWidth}" height="${plotHeight}" fill="none" stroke="#888888"/>`)
    out.push(`<text x="${left + plotWidth / 2}" y="${top + plotHeight + 40}" text-anchor="middle">${escapeXml(chart.xLabel)} (log scale)</text>`)
    if (index === 0) {
      const cy = top + plotHeight / 2
      out.push(`<text x="16" y="${cy}" text-anchor="middle" transform="rotate(-90 16 ${cy})">${escapeXml(chart.yLabel)}</text>`)
    }
    for (const series of panel.series) {
      if (!series.points.length) continue
      const stroke = color(series.name)
      const points = series.points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(' ')
      out.push(`<g class="series" data-series="${escapeXml(series.name)}">`)
      out.push(`<polyline points="${points}" fill="none" stroke="${stroke}" stroke-width="2"/>`)
      for (const p of series.points) {
        out.push(
          `<circle cx="${sx(p.x).toFixed(1)}" cy="${sy(p.y).toFixed(1)}" r="3.5" fill="${stroke}"><title>${escapeXml(`${series.name}, ${formatX(p.x)}: ${p.y.toFixed(2)}`)}</title></circle>`,
        )
      }
      out.push(`</g>`)
    }
    out.push(`</g>`)
  })

  out.push(`<g class="legend">`)
  names.forEach((name, i) => {
    const x = MARGIN.left + (i % legendColumns) * ((width - MARGIN.left) / legendColumns)
    const y = legendTop + Math.floor(i / legendColumns) * LEGEND_ROW
    out.push(`<rect x="${x.toFixed(1)}" y="${y}" width="14" height="4" fill="${color(name)}"/>`)
    out.push(`<text x="${(x + 20).toFixed(1)}" y="${y + 3}" dominant-baseline="middle">${escapeXml(name)}</text>`)
  })
  out.push(`</g>`)
  out.push(`</svg>`)
  return out.join('\n') + '\n'
}
