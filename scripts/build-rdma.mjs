// Builds the binding with the RDMA transport (it links libibverbs) and puts it beside the
// plain one as `mooncake-rdma.<platform>.node`, which the loader prefers where it loads.
// Needs rdma-core's headers and libibverbs (Debian: cmake libclang-dev libnl-3-dev
// libnl-route-3-dev libibverbs-dev).
import { execFileSync } from 'node:child_process'
import { existsSync, readdirSync, renameSync, rmSync } from 'node:fs'
import { join } from 'node:path'

const root = new URL('..', import.meta.url).pathname
const out = join(root, 'target', 'rdma-binding')
const targetDir = join(root, 'target', 'rdma')
rmSync(out, { recursive: true, force: true })

// ibverbs-sys builds rdma-core and then looks for its headers one folder off; point bindgen
// at the generated include folder once it exists (the first attempt creates it).
const include = () => {
  const build = join(targetDir, 'release', 'build')
  if (!existsSync(build)) return undefined
  const dir = readdirSync(build).find((d) => d.startsWith('ibverbs-sys-') && existsSync(join(build, d, 'out', 'build', 'include')))
  return dir && join(build, dir, 'out', 'build', 'include')
}
const napi = (extra) =>
  execFileSync(
    'npx',
    ['napi', 'build', '--platform', '--release', '--features', 'rdma', '--no-js', '--manifest-path', 'crates/mooncake-node/Cargo.toml', '--target-dir', targetDir, '--output-dir', out],
    { cwd: root, stdio: 'inherit', env: { ...process.env, ...extra } },
  )
const args = () => (include() ? { BINDGEN_EXTRA_CLANG_ARGS: `-I${include()}` } : {})
try {
  napi(args())
} catch {
  napi(args())
}
for (const file of readdirSync(out).filter((f) => f.endsWith('.node'))) {
  renameSync(join(out, file), join(root, 'src', file.replace(/^mooncake\./, 'mooncake-rdma.')))
}
