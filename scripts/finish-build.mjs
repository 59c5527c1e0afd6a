// Completes `tsc`: puts the generated native loader and the .node beside the compiled facade,
// adds the ESM entry point and makes the CLI executable.
import { chmodSync, copyFileSync, readdirSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'

const src = new URL('../src/', import.meta.url).pathname
const dist = new URL('../dist/', import.meta.url).pathname

for (const file of readdirSync(src)) {
  if (file === 'binding.js' || file === 'binding.d.ts' || file.endsWith('.node')) {
    copyFileSync(join(src, file), join(dist, file))
  }
}

const require = createRequire(import.meta.url)
const names = Object.keys(require(join(dist, 'index.js'))).filter((n) => n !== 'default')
writeFileSync(
  join(dist, 'index.mjs'),
  `import facade from './index.js'\nexport const { ${names.join(', ')} } = facade\nexport default facade\n`,
)
chmodSync(join(dist, 'cli.js'), 0o755)
