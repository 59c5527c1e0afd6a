//! Notifications between segments.

use super::*;

impl TransferEngine {
    /// Sends `message` to the segment named `target`.
    pub async fn send_notify(&self, target: &str, message: &str) -> Result<()> {
        let segment = self.open(target).await?;
        let body = serde_json::to_string(&NotifyMessage {
            name: self.local.name.clone(),
            notify_msg: message.to_owned(),
        })
        .expect("notify messages serialize");
        let reply = handshake::request(
            &segment.rpc_addr,
            MessageType::Notify,
            &body,
            self.config.connect_timeout,
            self.config.handshake_max_length,
            self.config.cluster_token.as_ref(),
        )
        .await?;
        let reply: NotifyMessage = serde_json::from_str(&reply).map_err(|e| {
            Error::new(
                ErrorKind::MalformedJson,
                format!("notify reply from {target}: {e}"),
            )
        })?;
        if reply.notify_msg.is_empty() {
            return Err(Error::new(
                ErrorKind::Metadata,
                format!("{target} rejected the notification"),
            ));
        }
        Ok(())
    }

    /// Delivers incoming notifications to `listener` instead of queueing them; `None` goes
    /// back to queueing. Queued notifications are handed to a new listener at once.
    pub fn set_notify_listener(&self, listener: Option<Arc<dyn Fn(Notification) + Send + Sync>>) {
        let backlog = listener
            .as_ref()
            .map(|_| self.take_notifies())
            .unwrap_or_default();
        *self
            .local
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = listener.clone();
        if let Some(listener) = listener {
            backlog.into_iter().for_each(|n| listener(n));
        }
    }

    /// Drains queued notifications (Mooncake's `getNotifies`).
    pub fn take_notifies(&self) -> Vec<Notification> {
        std::mem::take(&mut *self.local.queued.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
