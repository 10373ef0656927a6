//! Where the inbound session hands an accepted message: its bytes go to a spool temp file as they arrive, and at the end it is submitted (fsynced and scheduled); only then does the client hear `250`.

use crate::common::BoxFuture;
use crate::inbound::{Incoming, MessageFile, Sink, SinkError};
use crate::spool::{Draft, Meta, SpoolError};

use super::submit::Submission;
use super::{Scheduler, now_unix};

impl Sink for Scheduler {
    fn begin(&self, id: &str) -> Box<dyn MessageFile> {
        Box::new(SpoolFile {
            draft: self.spool().draft(id),
            scheduler: self.clone(),
        })
    }
}

/// An inbound message's spool temp file.
struct SpoolFile {
    draft: Draft,
    scheduler: Scheduler,
}

impl MessageFile for SpoolFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.draft.write(bytes)
    }

    fn commit(self: Box<Self>, msg: Incoming) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async move {
            let SpoolFile { draft, scheduler } = *self;
            let mut meta = Meta::new(
                msg.id.clone(),
                msg.from.clone(),
                msg.rcpts.clone(),
                0,
                now_unix(),
            );
            meta.message_id = msg.message_id.clone();
            meta.client = msg.client.to_string();
            meta.smtputf8 = msg.smtputf8;
            meta.auth_user = msg.auth_user.clone();
            let sub = Submission {
                meta,
                draft,
                tail: msg.tail,
                replace: false,
            };
            match scheduler.submit(sub).await {
                Ok(_) => Ok(()),
                Err(SpoolError::Full(_)) => Err(SinkError::Full),
                Err(SpoolError::Io(_)) => Err(SinkError::Io),
            }
        })
    }
}
