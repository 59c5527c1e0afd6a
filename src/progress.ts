/**
 * The benches' progress line on stderr, drawn with `cli-progress`: one door for `mooncake
 * bench` and `mooncake bench-store`. The bar shows how far the run is; the rate is bytes that
 * completed over the wall time they took, never an estimate.
 */
import { SingleBar } from 'cli-progress'

/** One reading of a running bench. */
export interface ProgressSample {
  /** Steps done, out of the total (seconds of a timed run, runs of a series). */
  done: number
  /** A new total, once it is known. */
  total?: number
  /** What runs now. */
  phase?: string
  /** Bytes completed in the current phase. */
  bytes?: number
  /** Wall time those bytes took, seconds. */
  seconds?: number
}

/** Options of {@link startProgress}. */
export interface ProgressOptions {
  /** Steps to completion. */
  total: number
  /** What a step is (`s`, `runs`). */
  unit: string
  /** Whether to draw at all (false under `--json`); nothing is drawn unless the stream is a TTY. */
  enabled: boolean
  /** Where to draw. Default `process.stderr`. */
  stream?: NodeJS.WriteStream
  /** How often to poll, ms. Default 250. */
  intervalMs?: number
}

/** A progress line being drawn. */
export interface Progress {
  /** Whether a line is being drawn (false when disabled or not on a terminal). */
  readonly active: boolean
  /** Stops polling and clears the line, so that results print on a clean screen. */
  stop(): void
}

const GB = 1e9

/** The rate and amount of a sample, or '' when it has none yet. */
export function formatRate(sample: Pick<ProgressSample, 'bytes' | 'seconds'>): string {
  if (sample.bytes === undefined) return ''
  const moved = `${(sample.bytes / GB).toFixed(2)} GB`
  if (!sample.seconds || sample.seconds <= 0) return moved
  return `${(sample.bytes / sample.seconds / GB).toFixed(2)} GB/s, ${moved}`
}

/**
 * Draws a progress line from now on, polling `poll` every `intervalMs`, until `stop()`.
 * Returns a no-op when disabled or when the stream is not a terminal.
 */
export function startProgress(options: ProgressOptions, poll: () => ProgressSample): Progress {
  const stream = options.stream ?? process.stderr
  if (!options.enabled || stream.isTTY !== true) return { active: false, stop: () => undefined }
  const bar = new SingleBar({
    format: `{bar} {value}/{total} ${options.unit}{phase}{rate}`,
    stream,
    hideCursor: true,
    clearOnComplete: true,
    barsize: 24,
    // The poll below drives the redraws.
    fps: 10,
  })
  const payload = (sample: ProgressSample) => {
    const rate = formatRate(sample)
    return { phase: sample.phase ? ` | ${sample.phase}` : '', rate: rate ? ` | ${rate}` : '' }
  }
  let total = options.total
  const first = poll()
  total = first.total ?? total
  bar.start(total, Math.min(total, first.done), payload(first))
  const timer = setInterval(() => {
    const sample = poll()
    if (sample.total !== undefined && sample.total !== total) {
      total = sample.total
      bar.setTotal(total)
    }
    bar.update(Math.min(total, sample.done), payload(sample))
  }, options.intervalMs ?? 250)
  timer.unref()
  let stopped = false
  return {
    active: true,
    stop: () => {
      if (stopped) return
      stopped = true
      clearInterval(timer)
      bar.stop()
    },
  }
}
