//! Mooncake's metadata key scheme.

/// Builds metadata keys under `mooncake/` plus an optional cluster id.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys for `cluster_id` (`MC_METADATA_CLUSTER_ID`), or the shared namespace.
    pub fn new(cluster_id: Option<&str>) -> Self {
        let prefix = match cluster_id {
            Some(id) if !id.is_empty() => format!("mooncake/{}/", id.trim_matches('/')),
            _ => "mooncake/".to_owned(),
        };
        Self { prefix }
    }

    /// The segment descriptor key. A name that contains `/` (`nvmeof/<name>`) is taken as a
    /// path under the prefix, as Mooncake does.
    pub fn segment(&self, name: &str) -> String {
        if name.contains('/') {
            format!("{}{name}", self.prefix)
        } else {
            format!("{}ram/{name}", self.prefix)
        }
    }

    /// The RPC address key.
    pub fn rpc_meta(&self, name: &str) -> String {
        format!("{}rpc_meta/{name}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_mooncake() {
        let keys = Keys::new(None);
        assert_eq!(keys.segment("node01"), "mooncake/ram/node01");
        assert_eq!(keys.rpc_meta("node01"), "mooncake/rpc_meta/node01");
        assert_eq!(keys.segment("nvmeof/disk"), "mooncake/nvmeof/disk");
        let keys = Keys::new(Some("tenant-a"));
        assert_eq!(keys.segment("n"), "mooncake/tenant-a/ram/n");
    }
}
