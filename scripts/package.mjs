// Builds what `npm publish` ships for one platform and packs it beside the main package:
//   node scripts/package.mjs [--target <rust triple>]   (default: this host's glibc triple)
// glibc targets build with napi-rs's cross toolchain (glibc 2.17 sysroot) so the binary loads on
// every distribution from that floor up, which the script checks with `objdump -T`; musl targets
// build with cargo-zigbuild (`zig` on the PATH). Release binaries are stripped (Cargo profile).
// Out: target/package/<name>-<version>.tgz for the main package and the platform package, and
// target/package/manifest.json naming them.
import { execFileSync } from 'node:child_process'
import { copyFileSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

/** The newest glibc a binary may need: CentOS 7, Debian 8 and Ubuntu 14.04 have it. */
export const GLIBC_FLOOR = '2.17'

const root = new URL('..', import.meta.url).pathname
const out = join(root, 'target', 'package')

const PLATFORMS = {
  'x86_64-unknown-linux-gnu': 'linux-x64-gnu',
  'aarch64-unknown-linux-gnu': 'linux-arm64-gnu',
  'x86_64-unknown-linux-musl': 'linux-x64-musl',
  'aarch64-unknown-linux-musl': 'linux-arm64-musl',
}
const HOST = { x64: 'x86_64-unknown-linux-gnu', arm64: 'aarch64-unknown-linux-gnu' }[process.arch]

const run = (cmd, args, opts = {}) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit', ...opts })

/** The highest `GLIBC_x.y` symbol version a binary needs, from its dynamic symbol table. */
export function glibcNeeded(binary) {
  const table = execFileSync('objdump', ['-T', binary], { encoding: 'utf8', maxBuffer: 64 << 20 })
  const versions = [...table.matchAll(/GLIBC_(\d+)\.(\d+)(?:\.(\d+))?/g)].map((m) => m.slice(1).map((n) => Number(n ?? 0)))
  versions.sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2])
  const top = versions.at(-1)
  return top ? top.filter((n, i) => i < 2 || n > 0).join('.') : undefined
}

const newer = (a, b) => {
  const [x, y] = [a, b].map((v) => v.split('.').map(Number))
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) > (y[i] ?? 0)
  }
  return false
}

/** `npm pack` of a folder into `out`; returns the tarball's name and sizes. */
function pack(dir) {
  const [info] = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', out], { cwd: dir, encoding: 'utf8' }))
  return { file: info.filename, size: info.size, unpackedSize: info.unpackedSize, entries: info.entryCount }
}

function main() {
  const { values } = parseArgs({ options: { target: { type: 'string', default: HOST } } })
  const target = values.target
  const platform = PLATFORMS[target]
  if (!platform) throw new Error(`no package for target '${target}'; known: ${Object.keys(PLATFORMS).join(', ')}`)
  const gnu = target.endsWith('-gnu')
  const pkgDir = join(root, 'npm', platform)

  rmSync(out, { recursive: true, force: true })
  mkdirSync(out, { recursive: true })
  // Whatever an earlier build left: the RDMA binary joins in the release job, built elsewhere.
  for (const file of readdirSync(pkgDir)) {
    if (file.endsWith('.node')) rmSync(join(pkgDir, file))
  }

  run('npx', [
    'napi', 'build', '--platform', '--release', '--no-js',
    '--manifest-path', 'crates/mooncake-node/Cargo.toml',
    '--target', target, gnu ? '--use-napi-cross' : '--cross-compile',
    '--output-dir', join(out, 'build'),
  ])
  const binary = join(pkgDir, `mooncake.${platform}.node`)
  copyFileSync(join(out, 'build', `mooncake.${platform}.node`), binary)
  if (gnu) {
    const needed = glibcNeeded(binary)
    if (needed === undefined || newer(needed, GLIBC_FLOOR)) {
      throw new Error(`${binary} needs glibc ${needed}, above the floor ${GLIBC_FLOOR}`)
    }
    console.log(`glibc: the binary needs ${needed} at most (floor ${GLIBC_FLOOR})`)
  }
  copyFileSync(join(root, 'LICENSE'), join(pkgDir, 'LICENSE'))

  rmSync(join(root, 'dist'), { recursive: true, force: true })
  run('npm', ['run', 'build:ts'])
  const main = pack(root)
  const native = pack(pkgDir)
  rmSync(join(out, 'build'), { recursive: true, force: true })
  const manifest = { target, platform, binary: { file: `mooncake.${platform}.node`, size: statSync(binary).size }, main, native }
  writeFileSync(join(out, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`)
  for (const p of [main, native]) {
    console.log(`${p.file}: ${(p.size / 2 ** 20).toFixed(1)} MiB packed, ${(p.unpackedSize / 2 ** 20).toFixed(1)} MiB unpacked, ${p.entries} files`)
  }
}

if (import.meta.url === `file://${process.argv[1]}`) main()
