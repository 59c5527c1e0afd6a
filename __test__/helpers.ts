import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import { join } from 'node:path'

/** What a peer process reports once it serves. */
export interface PeerInfo {
  segment: string
  address: bigint
  length: number
  rpcPort: number
  dataPort: number
  child: ChildProcess
  /** Sends a command line to the peer and resolves with its one-line answer. */
  command(line: string): Promise<string>
}

/** Options a peer process starts with. */
export interface PeerOptions {
  size: number
  seed?: number
  metadata?: string
  localServerName?: string
  /** Offer shared memory to same-host peers (default true). */
  sharedMemory?: boolean
  /** Serve a caller-registered Uint8Array instead of engine memory. */
  external?: boolean
}

const FIXTURES = join(__dirname, 'fixtures')

/** Runs a TypeScript fixture in a child Node process. */
export function runFixture(name: string, args: string[] = [], stdio: 'pipe' | 'inherit' = 'pipe'): ChildProcess {
  return spawn(process.execPath, ['--import=tsx', join(FIXTURES, name), ...args], {
    stdio: ['pipe', stdio, 'inherit'],
  })
}

/** Starts a peer engine in its own process and waits until it serves. */
export async function startPeer(options: PeerOptions): Promise<PeerInfo> {
  const child = runFixture('peer.ts', [JSON.stringify(options)])
  const lines = createInterface({ input: child.stdout! })
  const exited = once(child, 'exit').then(([code]) => {
    throw new Error(`peer exited early with ${code}`)
  })
  const [line] = (await Promise.race([once(lines, 'line'), exited])) as [string]
  const info = JSON.parse(line) as Omit<PeerInfo, 'child' | 'address' | 'command'> & { address: string }
  const command = async (text: string): Promise<string> => {
    const answer = once(lines, 'line')
    child.stdin!.write(`${text}\n`)
    const [reply] = (await answer) as [string]
    return reply
  }
  return { ...info, address: BigInt(info.address), child, command }
}

/** Stops a peer and waits for its exit code. */
export async function stopPeer(peer: PeerInfo, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
  if (peer.child.exitCode !== null || peer.child.signalCode !== null) return peer.child.exitCode
  const exited = once(peer.child, 'exit')
  peer.child.kill(signal)
  const [code] = await exited
  return code as number | null
}

/** Deterministic bytes: what a peer with `seed` holds at `offset`. */
export function pattern(seed: number, offset: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length)
  fillPattern(out, seed, offset)
  return out
}

/**
 * Fills `buffer` with the pattern of `seed`, as if it started at `offset`. Self-describing, as
 * `mooncake_common::pattern` in the core: every 8-byte word holds its own absolute offset
 * (little-endian) with the seed in bits 40-63, so a slice at the wrong offset or from another
 * source never matches.
 */
export function fillPattern(buffer: Uint8Array, seed: number, offset = 0): void {
  const TWO32 = 2 ** 32
  if (offset % 8 === 0 && buffer.byteOffset % 4 === 0 && buffer.length >= 8) {
    // Whole words at once (the little-endian halves of each), then the tail byte by byte.
    const words = Math.floor(buffer.length / 8)
    const halves = new Uint32Array(buffer.buffer, buffer.byteOffset, words * 2)
    for (let i = 0; i < words; i++) {
      const w = offset + i * 8
      halves[2 * i] = w % TWO32
      halves[2 * i + 1] = (Math.floor(w / TWO32) ^ (seed << 8)) >>> 0
    }
    fillPattern(buffer.subarray(words * 8), seed, offset + words * 8)
    return
  }
  let word = -1
  let low = 0
  let high = 0
  for (let i = 0; i < buffer.length; i++) {
    const at = offset + i
    const w = at - (at % 8)
    if (w !== word) {
      word = w
      low = w % TWO32
      high = (Math.floor(w / TWO32) ^ (seed << 8)) >>> 0
    }
    const k = at % 8
    buffer[i] = k < 4 ? (low >>> (8 * k)) & 0xff : (high >>> (8 * (k - 4))) & 0xff
  }
}

/** The codes a busy store answers under contention; anything else in a torture run is a finding. */
export const CONTENDED_STORE_CODES: ReadonlySet<string> = new Set([
  'ERR_OBJECT_NOT_FOUND',
  'ERR_REPLICA_IS_NOT_READY',
  'ERR_OBJECT_HAS_LEASE',
  'ERR_OBJECT_ALREADY_EXISTS',
  'ERR_INVALID_WRITE',
  'ERR_NO_AVAILABLE_HANDLE',
  'ERR_LEASE_EXPIRED',
])

/** What a torture worker saw: operations, reads and how many were verified, wrong reads, codes. */
export interface TortureReport {
  worker: number
  ops: number
  reads: number
  verified: number
  wrong: string[]
  codes: Record<string, number>
}
