import { errorCatalog } from './native'

const ERRNO: ReadonlyMap<string, number | undefined> = new Map(
  errorCatalog().map((entry) => [entry.code, entry.errno ?? undefined]),
)

/**
 * Every error the package throws or rejects with.
 *
 * `code` is stable and meant for branching (`'ERR_ADDRESS_NOT_REGISTERED'`, `'ERR_TIMEOUT'`, ...);
 * `errno` is Mooncake's numeric code where one exists (`-3` for `ERR_ADDRESS_NOT_REGISTERED`).
 * The message ends with the chain of causes, one `Caused by:` line each.
 */
export class MooncakeError extends Error {
  /** Stable string code, `ERR_*`. */
  readonly code: string
  /** Mooncake's numeric error code, where it defines one. */
  readonly errno?: number

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'MooncakeError'
    this.code = code
    this.errno = ERRNO.get(code)
  }
}

const CODED = /^\[(ERR_[A-Z0-9_]+)\] ([\s\S]*)$/

/** Turns whatever the native layer threw into a `MooncakeError`. */
export function toMooncakeError(error: unknown): MooncakeError {
  if (error instanceof MooncakeError) return error
  const message = error instanceof Error ? error.message : String(error)
  const coded = CODED.exec(message)
  if (coded) return new MooncakeError(coded[1], coded[2])
  // napi's own argument conversion failures (a string where a number belongs, ...).
  return new MooncakeError('ERR_INVALID_ARGUMENT', message, { cause: error })
}

/** Runs a synchronous native call, converting its error. */
export function native<T>(call: () => T): T {
  try {
    return call()
  } catch (error) {
    throw toMooncakeError(error)
  }
}

/** Awaits a native promise (or a native call that may throw first), converting its error. */
export async function nativeAsync<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call()
  } catch (error) {
    throw toMooncakeError(error)
  }
}

/** The error for a caller mistake caught in TypeScript before reaching native code. */
export function invalidArgument(message: string): MooncakeError {
  return new MooncakeError('ERR_INVALID_ARGUMENT', message)
}
