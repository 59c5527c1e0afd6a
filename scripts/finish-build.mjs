// Completes `tsc`: puts the generated native loader (and a locally built .node) beside the
// compiled facade, adds the ESM entry point and makes the CLI executable.
import { chmodSync, copyFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

const src = new URL('../src/', import.meta.url).pathname
const dist = new URL('../dist/', import.meta.url).pathname

for (const file of readdirSync(src)) {
  if (file === 'binding.js' || file === 'binding.d.ts' || file.endsWith('.node')) {
    copyFileSync(join(src, file), join(dist, file))
  }
}

// Node finds the CommonJS build's named exports statically, so ESM re-exports them as-is; its
// types say the same (named exports, no default), so an ESM consumer's compiler sees what runs.
writeFileSync(join(dist, 'index.mjs'), "export * from './index.js'\n")
writeFileSync(join(dist, 'index.d.mts'), "export * from './index.js'\n")
chmodSync(join(dist, 'cli.js'), 0o755)
