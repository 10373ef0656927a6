//! The one way a message enters the queue: its spool file is written and committed (fsynced, renamed, directory synced) on a blocking thread, logged, and handed to the scheduler; used by inbound SMTP (and so `sendmail` and the maildrop), send-test and DSNs.

use crate::spool::{Draft, Meta, SpoolError};

use super::Scheduler;

/// A message to queue: its metadata, its file so far and the bytes still to
/// append (all of it, for a message built in memory).
#[derive(Debug)]
pub struct Submission {
    /// The metadata; `size` is set from the file when it is committed.
    pub meta: Meta,
    /// The message file (from [`crate::spool::Spool::draft`]).
    pub draft: Draft,
    /// Bytes to append before the commit.
    pub tail: Vec<u8>,
    /// Remove an entry with the same id first (a DSN rewritten after a
    /// crash: its id is derived from the original's).
    pub replace: bool,
}

impl Submission {
    /// A message held in memory, under `meta.id`.
    pub fn in_memory(s: &Scheduler, meta: Meta, message: Vec<u8>) -> Submission {
        Submission {
            draft: s.spool().draft(&meta.id),
            meta,
            tail: message,
            replace: false,
        }
    }
}

impl Scheduler {
    /// Make `sub` durable and schedule it; returns its metadata as queued.
    /// Returns only once the message is on stable storage (what a `250`
    /// promises); on error nothing of it stays in the spool.
    pub async fn submit(&self, sub: Submission) -> Result<Meta, SpoolError> {
        let spool = self.spool().clone();
        let Submission {
            mut meta,
            draft,
            tail,
            replace,
        } = sub;
        let id = meta.id.clone();
        let stored = tokio::task::spawn_blocking(move || {
            if replace {
                spool.remove(&meta.id)?;
            }
            spool.commit(draft, &mut meta, &tail).map(|()| meta)
        })
        .await;
        match stored {
            Ok(Ok(meta)) => {
                tracing::info!(
                    id = %meta.id,
                    message_id = meta.message_id.as_deref().unwrap_or(""),
                    from = %meta.from,
                    rcpts = meta.rcpts.len(),
                    size = meta.size,
                    client = %meta.client,
                    "queued"
                );
                self.enqueue(meta.clone());
                Ok(meta)
            }
            Ok(Err(e)) => {
                match &e {
                    SpoolError::Full(why) => {
                        tracing::warn!(id = %id, reason = %why, "refused: queue full")
                    }
                    SpoolError::Io(e) => {
                        tracing::error!(id = %id, error = %e, "refused: cannot write spool")
                    }
                }
                Err(e)
            }
            Err(e) => {
                tracing::error!(id = %id, error = %e, "refused: spool writer failed");
                Err(SpoolError::Io(std::io::Error::other(e.to_string())))
            }
        }
    }
}
