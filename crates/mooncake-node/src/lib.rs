//! The Node.js binding. It converts arguments and errors and calls the core; behaviour lives
//! in the core crates. File names mirror the TypeScript facade (`engine.rs` ↔ `engine.ts`).

// napi items are public to JavaScript, not to Rust crates.
#![allow(unreachable_pub)]
// napi-derive registers nothing in test builds, so there every export looks unused.
#![cfg_attr(test, allow(dead_code))]

mod bench;
mod convert;
mod engine;
mod error;
mod master;
mod metadata_server;
mod p2p;
mod store;

use std::sync::Once;

/// Installs the log subscriber once: `MOONCAKE_LOG` (an `EnvFilter` directive), else
/// `MC_LOG_LEVEL` (TRACE, INFO, WARNING, ERROR), else warnings only.
pub(crate) fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let directive = std::env::var("MOONCAKE_LOG").ok().unwrap_or_else(|| {
            match std::env::var("MC_LOG_LEVEL")
                .unwrap_or_default()
                .to_ascii_uppercase()
                .as_str()
            {
                "TRACE" => "trace",
                "INFO" => "info",
                "ERROR" => "error",
                _ => "warn",
            }
            .to_owned()
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(directive))
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    });
}
