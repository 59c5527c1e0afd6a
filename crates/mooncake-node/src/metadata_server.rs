//! The embedded HTTP metadata server.

use mooncake_common::auth::ClusterToken;
use mooncake_metadata::http::{MetadataServer, MetadataServerConfig};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio::sync::Mutex;

use crate::error::IntoNapi;

/// A running metadata server.
#[napi]
pub struct NativeMetadataServer {
    url: String,
    port: u32,
    inner: Mutex<Option<MetadataServer>>,
}

#[napi]
impl NativeMetadataServer {
    /// `http://host:port/metadata`.
    #[napi(getter)]
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The bound port.
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Stops the server; idempotent.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        if let Some(server) = self.inner.lock().await.take() {
            server.close().await;
        }
        Ok(())
    }
}

/// Starts a metadata server on `host:port` (port 0 picks one). With a cluster token (default
/// `MC_CLUSTER_TOKEN`; an empty string means none), writes need a proof of it.
#[napi]
pub async fn start_metadata_server(
    host: String,
    port: u32,
    cluster_token: Option<String>,
) -> Result<NativeMetadataServer> {
    crate::init_logging();
    let port =
        u16::try_from(port).map_err(|_| crate::error::invalid("port must be within 0-65535"))?;
    let config = MetadataServerConfig {
        token: ClusterToken::resolve(cluster_token.as_deref()).napi()?,
        ..MetadataServerConfig::default()
    };
    let server = MetadataServer::start_with(&host, port, config)
        .await
        .napi()?;
    Ok(NativeMetadataServer {
        url: server.url(),
        port: u32::from(server.local_addr().port()),
        inner: Mutex::new(Some(server)),
    })
}
