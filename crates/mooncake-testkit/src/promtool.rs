//! `promtool check metrics` (Debian's `prometheus`) over an exposition, for tests of the
//! metrics pages; the tests that call it are ignored where the `promtool` probe found none.

use std::io::Write as _;
use std::process::{Command, Stdio};

/// What `promtool check metrics` says of `exposition`: `Ok` when it exits 0 with nothing to
/// say, its findings otherwise.
pub fn check_metrics(exposition: &str) -> Result<(), String> {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool did not start: {e}"))?;
    if let Some(mut stdin) = promtool.stdin.take() {
        stdin
            .write_all(exposition.as_bytes())
            .map_err(|e| format!("feeding promtool: {e}"))?;
    }
    let checked = promtool
        .wait_with_output()
        .map_err(|e| format!("promtool's verdict: {e}"))?;
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    if checked.status.success() && findings.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool ({}): {findings}", checked.status))
    }
}
