//! The client's side of the master RPC: timeouts, and failures mapped to store codes.

use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};
use tonic::transport::{Channel, Endpoint};

use crate::proto::master_client::MasterClient as Grpc;
use crate::wire::STORE_VERSION;

/// A connection to the master.
#[derive(Clone)]
pub struct MasterClient {
    grpc: Grpc<Channel>,
    timeout: Duration,
}

impl MasterClient {
    /// Connects to `address` (`host:port`) and checks the master's version.
    pub async fn connect(address: &str, timeout: Duration) -> Result<Self> {
        let uri = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("master address '{address}': {e}"),
                )
            })?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|e| {
            Error::new(
                ErrorKind::RpcFail,
                format!("connect to master {address}: {e}"),
            )
        })?;
        let client = Self {
            grpc: Grpc::new(channel),
            timeout,
        };
        let version = client
            .call(
                |mut g| async move { g.service_ready(crate::proto::ServiceReadyRequest {}).await },
            )
            .await?
            .version;
        if version != STORE_VERSION {
            return Err(Error::new(
                ErrorKind::InvalidVersion,
                format!("master at {address} speaks '{version}', this client '{STORE_VERSION}'"),
            ));
        }
        Ok(client)
    }

    /// Runs one RPC, mapping transport failures to `ERR_RPC_FAIL` / `ERR_RPC_TIMEOUT` and
    /// whole-call refusals to their stable codes.
    pub async fn call<T, F, Fut>(&self, rpc: F) -> Result<T>
    where
        F: FnOnce(Grpc<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let reply = tokio::time::timeout(
            self.timeout + Duration::from_millis(100),
            rpc(self.grpc.clone()),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::RpcTimeout,
                format!("master did not answer within {:?}", self.timeout),
            )
        })?;
        match reply {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(from_status(&status)),
        }
    }
}

fn from_status(status: &tonic::Status) -> Error {
    let message = status.message();
    if let Some(rest) = message.strip_prefix('[') {
        if let Some((code, text)) = rest.split_once("] ") {
            if let Some(kind) = ErrorKind::ALL.iter().copied().find(|k| k.code() == code) {
                return Error::new(kind, text.to_owned());
            }
        }
    }
    match status.code() {
        tonic::Code::DeadlineExceeded => {
            Error::new(ErrorKind::RpcTimeout, format!("master RPC: {message}"))
        }
        _ => Error::new(
            ErrorKind::RpcFail,
            format!("master RPC failed ({:?}): {message}", status.code()),
        ),
    }
}
