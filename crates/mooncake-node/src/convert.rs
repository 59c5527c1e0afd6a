//! Conversions of JavaScript values the bindings share: lengths, 64-bit addresses,
//! durations, and the keep-alive callback of servers.

use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunction;

use crate::error::invalid;

/// Holds the Node.js event loop open until dropped: a server keeps its process alive until it
/// is closed, like a listening socket.
pub(crate) type KeepAlive = ThreadsafeFunction<(), (), (), Status, false>;

/// A length from a JavaScript number: a non-negative integer within 2^53.
pub(crate) fn to_len(value: f64, what: &str) -> Result<usize> {
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= (1u64 << 53) as f64 {
        Ok(value as usize)
    } else {
        Err(invalid(format!(
            "{what} must be a non-negative integer, not {value}"
        )))
    }
}

/// An address or size from a JavaScript bigint.
pub(crate) fn bigint_u64(value: &BigInt, what: &str) -> Result<u64> {
    let (negative, raw, lossless) = value.get_u64();
    if negative || !lossless {
        return Err(invalid(format!("{what} must be an unsigned 64-bit bigint")));
    }
    Ok(raw)
}

/// A duration in milliseconds, when given.
pub(crate) fn millis(value: Option<f64>, what: &str, into: &mut Duration) -> Result<()> {
    if let Some(ms) = value {
        if !ms.is_finite() || ms < 0.0 {
            return Err(invalid(format!(
                "{what} must be a non-negative number of ms"
            )));
        }
        *into = Duration::from_secs_f64(ms / 1000.0);
    }
    Ok(())
}
