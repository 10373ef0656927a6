//! Where the inbound session hands an accepted message: it is written to the spool (fsynced) and scheduled, and only then does the client hear `250`.

use std::sync::Arc;

use crate::common::BoxFuture;
use crate::inbound::{Incoming, Sink, SinkError};
use crate::spool::{Meta, SpoolError};

use super::{Scheduler, now_unix};

impl Sink for Scheduler {
    fn accept(&self, msg: Incoming) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let mut meta = Meta::new(
                msg.id.clone(),
                msg.from.clone(),
                msg.rcpts.clone(),
                msg.body.len() as u64,
                now_unix(),
            );
            meta.message_id = msg.message_id.clone();
            meta.client = msg.client.to_string();
            meta.smtputf8 = msg.smtputf8;
            meta.auth_user = msg.auth_user.clone();
            let spool: Arc<_> = self.spool().clone();
            let m = meta.clone();
            let stored = tokio::task::spawn_blocking(move || spool.store(&m, &msg.body)).await;
            match stored {
                Ok(Ok(())) => {
                    tracing::info!(
                        id = %meta.id,
                        message_id = meta.message_id.as_deref().unwrap_or(""),
                        from = %meta.from,
                        rcpts = meta.rcpts.len(),
                        size = meta.size,
                        client = %meta.client,
                        "queued"
                    );
                    self.enqueue(meta);
                    Ok(())
                }
                Ok(Err(SpoolError::Full(why))) => {
                    tracing::warn!(id = %meta.id, reason = %why, "refused: queue full");
                    Err(SinkError::Full)
                }
                Ok(Err(SpoolError::Io(e))) => {
                    tracing::error!(id = %meta.id, error = %e, "refused: cannot write spool");
                    Err(SinkError::Io)
                }
                Err(e) => {
                    tracing::error!(id = %meta.id, error = %e, "refused: spool writer failed");
                    Err(SinkError::Io)
                }
            }
        })
    }
}
