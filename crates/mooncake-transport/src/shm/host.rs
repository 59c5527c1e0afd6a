//! Whether two engines share a host.
//!
//! The kernel's boot id names this running kernel: two processes that see the same boot id
//! run on the same machine (though possibly in different namespaces; the socket handshake
//! settles that). A hostname says nothing of the kind.

use std::sync::OnceLock;

/// This host's identity, or `None` where the kernel does not expose one.
pub fn host_id() -> Option<&'static str> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty())
    })
    .as_deref()
}
