//! One delivery: a mail transaction (MAIL FROM, RCPT TO, DATA) on a pooled or new connection, per-recipient results, and what to do with the connection afterwards.

use std::time::Duration;

use super::conn::{Broken, Conn, DataError};
use super::pool::Pool;
use super::reply::Reply;
use super::{SmtpTransport, printable};
use crate::transport::{Body, Delivery, Envelope, Failure};

/// A connection is not reused once it is this old (Postfix
/// `smtp_connection_reuse_time_limit`), so a long-lived session cannot pin
/// us to one server process forever.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// The reply after the end of data may take this many times the normal
/// timeout (the server scans and stores the message first).
const FINAL_REPLY_FACTOR: u32 = 5;
/// How long the mailbox pauses after `432 4.3.2` (another client holds its
/// connections; the reply names no wait).
const THROTTLE_WAIT: Duration = Duration::from_secs(10);

impl SmtpTransport {
    /// One attempt: a pooled connection if there is one, else a new one; a
    /// pooled connection found dead at its first command is replaced once.
    pub(super) async fn deliver_inner(&self, env: &Envelope, message: &Body) -> Delivery {
        if unsafe_address(&env.from) {
            return Err(Failure::permanent(format!(
                "invalid sender address <{}>",
                printable(&env.from)
            )));
        }
        // Recipients decided locally (`Some`) are not sent to the server.
        let results: Vec<Option<Result<(), Failure>>> = env
            .rcpts
            .iter()
            .map(|r| {
                (r.is_empty() || unsafe_address(r)).then(|| {
                    Err(Failure::permanent(format!(
                        "invalid recipient address <{}>",
                        printable(r)
                    )))
                })
            })
            .collect();
        if results.iter().all(Option::is_some) {
            return Ok(finish_results(results));
        }
        let who = self.identity_for(env);
        let mut pooled = self.pool.take(who.as_ref().map(|w| w.user.as_str()));
        loop {
            let (mut conn, reused) = match pooled.take() {
                Some(conn) => (conn, true),
                None => (self.connect(who.as_ref()).await?, false),
            };
            let mut attempt = results.clone();
            match self
                .transaction(&mut conn, env, message, &mut attempt, reused)
                .await
            {
                Tx::Stale => {
                    tracing::debug!(peer = %conn.peer, "pooled connection was dead; reconnecting");
                    continue;
                }
                Tx::Done(outcome, after) => {
                    self.release(conn, after).await;
                    return outcome.map(|()| finish_results(attempt));
                }
            }
        }
    }

    /// One mail transaction on a ready connection. `results` holds the
    /// locally decided recipients and receives the others.
    async fn transaction(
        &self,
        conn: &mut Conn,
        env: &Envelope,
        message: &Body,
        results: &mut [Option<Result<(), Failure>>],
        reused: bool,
    ) -> Tx {
        // SMTPUTF8 (RFC 6531) is needed only for non-ASCII addresses.
        let mut utf8 = !env.from.is_ascii();
        if !conn.ext.smtputf8 {
            if utf8 {
                let text = format!(
                    "cannot deliver non-ASCII sender address <{}>: {} does not offer SMTPUTF8",
                    env.from, conn.peer
                );
                return Tx::Done(Err(Failure::permanent(text)), After::Keep);
            }
            for (slot, rcpt) in results.iter_mut().zip(&env.rcpts) {
                if slot.is_none() && !rcpt.is_ascii() {
                    let text = format!(
                        "cannot deliver to non-ASCII address <{rcpt}>: {} does not offer SMTPUTF8",
                        conn.peer
                    );
                    *slot = Some(Err(Failure::permanent(text)));
                }
            }
            if results.iter().all(Option::is_some) {
                return Tx::Done(Ok(()), After::Keep);
            }
        } else {
            utf8 |= env
                .rcpts
                .iter()
                .zip(results.iter())
                .any(|(r, s)| s.is_none() && !r.is_ascii());
        }
        if let Some(limit) = conn.ext.size
            && limit > 0
            && message.len() > limit
        {
            let text = format!(
                "message of {} bytes exceeds the size limit of {limit} bytes of {}",
                message.len(),
                conn.peer
            );
            return Tx::Done(Err(Failure::permanent(text)), After::Keep);
        }

        let mut mail = format!("MAIL FROM:<{}>", env.from);
        if conn.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        if conn.ext.eightbitmime {
            match message.has_8bit().await {
                Ok(true) => mail.push_str(" BODY=8BITMIME"),
                Ok(false) => {}
                Err(e) => return Tx::Done(Err(spool_failure(&e)), After::Keep),
            }
        }
        if utf8 {
            mail.push_str(" SMTPUTF8");
        }
        let stage = format!("after MAIL FROM:<{}>", env.from);
        let rcpt_lines: Vec<(usize, String)> = env
            .rcpts
            .iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_none())
            .map(|(i, rcpt)| (i, format!("RCPT TO:<{rcpt}>")))
            .collect();
        let mut cmds = Commands::default();
        if conn.ext.pipelining {
            let mut batch = vec![mail.as_str()];
            batch.extend(rcpt_lines.iter().map(|(_, line)| line.as_str()));
            batch.push("DATA");
            match conn.send_lines(&batch).await {
                Err(_) if reused => return Tx::Stale,
                Err(b) => return Tx::Done(Err(conn.broken(b, &stage)), After::Drop),
                Ok(()) => cmds.queued = batch.len(),
            }
        }
        let reply = match cmds.reply(conn, &mail).await {
            Err(_) if reused => return Tx::Stale,
            Err(b) => return Tx::Done(Err(conn.broken(b, &stage)), After::Drop),
            Ok(r) if r.code == 421 && reused => return Tx::Stale,
            Ok(r) => r,
        };
        match classify(&reply, 2) {
            Class::Ok => {}
            Class::Refused(after) => {
                let failure = refusal(conn, &reply, &stage);
                return Tx::Done(Err(failure), cmds.settle(conn, after).await);
            }
        }

        let mut accepted = Vec::new();
        for (i, line) in &rcpt_lines {
            let i = *i;
            let stage = format!("after RCPT TO:<{}>", env.rcpts[i]);
            let reply = match cmds.reply(conn, line).await {
                Ok(r) => r,
                Err(b) => return Tx::Done(Err(conn.broken(b, &stage)), After::Drop),
            };
            match classify(&reply, 2) {
                Class::Ok => {
                    accepted.push(i);
                    results[i] = Some(Ok(()));
                }
                Class::Refused(After::Drop) => {
                    return Tx::Done(Err(refusal(conn, &reply, &stage)), After::Drop);
                }
                Class::Refused(_) => results[i] = Some(Err(refusal(conn, &reply, &stage))),
            }
        }
        if accepted.is_empty() {
            return Tx::Done(Ok(()), cmds.settle(conn, After::Rset).await);
        }

        let reply = match cmds.reply(conn, "DATA").await {
            Ok(r) => r,
            Err(b) => return Tx::Done(Err(conn.broken(b, "after DATA")), After::Drop),
        };
        match classify(&reply, 3) {
            Class::Ok => {}
            Class::Refused(After::Drop) => {
                return Tx::Done(Err(refusal(conn, &reply, "after DATA")), After::Drop);
            }
            Class::Refused(after) => {
                let failure = refusal(conn, &reply, "after DATA");
                for &i in &accepted {
                    results[i] = Some(Err(failure.clone()));
                }
                return Tx::Done(Ok(()), after);
            }
        }

        match conn.send_data(message).await {
            Ok(()) => {}
            Err(DataError::Net(b)) => {
                return Tx::Done(
                    Err(conn.broken(b, "while sending the message")),
                    After::Drop,
                );
            }
            // Half a message went out without its end: close the
            // connection so the server discards it.
            Err(DataError::Spool(e)) => return Tx::Done(Err(spool_failure(&e)), After::Drop),
        }
        let stage = "after end of data";
        let reply = match conn.read_reply(conn.timeout * FINAL_REPLY_FACTOR).await {
            Ok(r) => r,
            // The final dot went out and no reply came (silence, an orderly
            // close, garbage): the server may have the message. Not a server
            // failure (no failover), retried later. A read error (a reset:
            // the server dropped data it had not read, so not the dot) is.
            Err(b @ (Broken::TimedOut(_) | Broken::Closed | Broken::Garbled(_))) => {
                let f = conn.broken(b, stage);
                return Tx::Done(Err(Failure::maybe_delivered(f.text)), After::Drop);
            }
            Err(b) => return Tx::Done(Err(conn.broken(b, stage)), After::Drop),
        };
        match classify(&reply, 2) {
            Class::Ok => Tx::Done(Ok(()), After::Keep),
            Class::Refused(After::Drop) => Tx::Done(Err(refusal(conn, &reply, stage)), After::Drop),
            Class::Refused(after) => {
                let failure = refusal(conn, &reply, stage);
                for &i in &accepted {
                    results[i] = Some(Err(failure.clone()));
                }
                Tx::Done(Ok(()), after)
            }
        }
    }

    /// Return a connection to the pool, after RSET if the transaction failed.
    async fn release(&self, mut conn: Conn, after: After) {
        let reusable = match after {
            After::Drop => false,
            After::Keep => true,
            After::Rset => matches!(conn.command("RSET").await, Ok(r) if r.code / 100 == 2),
        };
        if reusable && conn.born.elapsed() < MAX_CONNECTION_AGE {
            Pool::put(&self.pool, conn);
        }
    }
}

/// The failure for a refusal inside a transaction, with the reply's code
/// and enhanced status; `432 4.3.2` (the mailbox's connection budget) is
/// throttling, retried without backoff.
fn refusal(conn: &Conn, reply: &Reply, stage: &str) -> Failure {
    let f = conn
        .classified(reply, stage)
        .with_reply(reply.code, reply.enhanced);
    if reply.is_throttling() {
        let wait = f.not_before.unwrap_or(THROTTLE_WAIT);
        f.as_throttling().with_not_before(wait)
    } else {
        f
    }
}

/// The spooled message could not be read: this message's trouble, not the
/// server's (no failover), retried later.
fn spool_failure(e: &std::io::Error) -> Failure {
    Failure::transient(format!("cannot read the spooled message: {e}"))
}

/// True for addresses that would break the command line they go into.
pub(super) fn unsafe_address(addr: &str) -> bool {
    addr.chars().any(|c| c.is_control() || c == '<' || c == '>')
}

/// Final per-recipient results; every slot is filled by then.
fn finish_results(results: Vec<Option<Result<(), Failure>>>) -> Vec<Result<(), Failure>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Failure::transient("recipient was not attempted"))))
        .collect()
}

/// The commands of one transaction and their replies. With PIPELINING
/// (RFC 2920) MAIL FROM, every RCPT TO and DATA go out in one write and
/// their replies are read in order; without it, one round trip each.
#[derive(Default)]
struct Commands {
    /// Commands sent whose replies are still to be read (DATA last).
    queued: usize,
}

impl Commands {
    /// The reply to `line`: read if `line` went out in the batch, else sent now.
    async fn reply(&mut self, conn: &mut Conn, line: &str) -> Result<Reply, Broken> {
        if self.queued > 0 {
            self.queued -= 1;
            conn.read_reply(conn.timeout).await
        } else {
            conn.command(line).await
        }
    }

    /// Leave the transaction before its DATA: read the replies still due so
    /// that the connection stays in step for RSET and reuse. A DATA that was
    /// accepted all the same (354) is never ended: the connection is closed,
    /// so the server discards it.
    async fn settle(self, conn: &mut Conn, after: After) -> After {
        if after == After::Drop {
            return after;
        }
        for left in (0..self.queued).rev() {
            match conn.read_reply(conn.timeout).await {
                Ok(r) if r.code == 421 => return After::Drop,
                Ok(r) if left == 0 && r.code / 100 == 3 => return After::Drop,
                Ok(_) => {}
                Err(_) => return After::Drop,
            }
        }
        after
    }
}

/// What to do with a connection after a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Clean state: pool it as it is.
    Keep,
    /// A transaction may be open: RSET, then pool it if that works.
    Rset,
    /// Broken, closing (421) or out of sync: close it.
    Drop,
}

/// Outcome of [`SmtpTransport::transaction`].
enum Tx {
    /// A pooled connection was dead at MAIL FROM: nothing happened, retry on a new one.
    Stale,
    /// `Err` for the whole message, or `Ok` with the results filled in.
    Done(Result<(), Failure>, After),
}

/// A reply, seen from one stage.
enum Class {
    /// The expected class (2xx, or 3xx for DATA).
    Ok,
    /// Anything else, and what that means for the connection.
    Refused(After),
}

fn classify(reply: &Reply, expected_class: u16) -> Class {
    match reply.code / 100 {
        c if c == expected_class => Class::Ok,
        _ if reply.code == 421 => Class::Refused(After::Drop),
        4 | 5 => Class::Refused(After::Rset),
        // 2xx to DATA or 3xx to anything else: we no longer know where the
        // server is in the dialogue.
        _ => Class::Refused(After::Drop),
    }
}
