//! The maildrop: where `mailbridge sendmail` leaves a message durably while the daemon is not running, and the importer that feeds each one through an in-process SMTP session into the spool.
//!
//! A maildrop file is `<id>.msg`: one line of JSON with the envelope
//! (`{"from": "...", "rcpts": [...]}`), then the message with CRLF line
//! endings. The writer creates `.<id>.tmp`, syncs it, renames it to
//! `<id>.msg` and syncs the directory, so the importer sees either nothing
//! or a complete file (as Postfix's `postdrop` and `pickup` do).
//!
//! The importer drives the same sans-IO [`Session`] as the listener, as a
//! loopback client, so every check and header the listener applies (size,
//! sender and recipient domains, mail loops, `Received:`, `Message-ID:`)
//! applies here too. The one difference is AUTH: being able to write into
//! the maildrop directory is the authorisation, as it is for Postfix's
//! maildrop; mail is sent as the default upstream identity. A message the
//! session refuses for good is moved to `rejected/` and logged; one it
//! refuses for now (queue full) stays for the next pass.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::inbound::session::{Session, Step};
use crate::inbound::{BodyWriter, Settings, Sink};
use crate::transport::Body;
use crate::transport::smtp::DataEncoder;

/// The envelope line at the top of a maildrop file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope sender (`""` for `<>`).
    pub from: String,
    /// Envelope recipients.
    pub rcpts: Vec<String>,
}

/// The maildrop directory of a configuration.
pub fn dir(cfg: &crate::config::Config) -> PathBuf {
    cfg.path(&cfg.spool.path).join("maildrop")
}

/// Write `message` (CRLF line endings) for `env` into `dir` durably; returns
/// the file's path. Creates `dir` if it is missing.
pub fn write(dir: &Path, env: &Envelope, message: &[u8]) -> io::Result<PathBuf> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
    }
    let id = crate::spool::new_id();
    let tmp = dir.join(format!(".{id}.tmp"));
    let path = dir.join(format!("{id}.msg"));
    let mut head = serde_json::to_vec(env).map_err(io::Error::other)?;
    head.push(b'\n');
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            // Readable by the daemon's user whoever submitted it; the
            // directory is not listable by others (see README).
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&head)?;
        f.write_all(message)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// Longest envelope line read (many recipients fit; a file without a
/// newline this early is not a maildrop file).
const MAX_ENVELOPE: usize = 1024 * 1024;

/// Open a maildrop file: a plain file with one link, not a symbolic link
/// (another user could otherwise point the daemon at its own files). Reads
/// the envelope line only; the message is read from the file in chunks as
/// it goes into the session. Blocking.
fn open(path: &Path) -> io::Result<(Envelope, Body)> {
    let before = std::fs::symlink_metadata(path)?;
    let plain = |m: &std::fs::Metadata| m.file_type().is_file() && m.nlink() == 1;
    if !plain(&before) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a plain file with one link",
        ));
    }
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    // Swapped for something else between the two looks.
    if !plain(&meta) || meta.ino() != before.ino() || meta.dev() != before.dev() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file changed while it was opened",
        ));
    }
    let mut line = Vec::new();
    let mut chunk = vec![0u8; 8192];
    let nl = loop {
        let n = f.read_at(&mut chunk, line.len() as u64)?;
        let from = line.len();
        line.extend_from_slice(&chunk[..n]);
        if let Some(i) = line[from..].iter().position(|&b| b == b'\n') {
            break from + i;
        }
        if n == 0 || line.len() > MAX_ENVELOPE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no envelope line",
            ));
        }
    };
    let env: Envelope = serde_json::from_slice(&line[..nl])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("envelope: {e}")))?;
    let body = Body::open_from(f, nl as u64 + 1)?;
    Ok((env, body))
}

/// What became of one maildrop file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// In the spool under this queue id.
    Queued(String),
    /// Refused for now (the reply); the file stays.
    Deferred(String),
    /// Refused for good (the reply); moved to `rejected/`.
    Rejected(String),
}

/// Feed one message through an SMTP session into `sink`, read from its
/// file a chunk at a time: the session's buffer, one chunk of the file and
/// its dot-stuffed form are all that is held, whatever the message's size.
async fn submit(settings: &Arc<Settings>, sink: &dyn Sink, env: &Envelope, body: &Body) -> Outcome {
    let client: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut s = Session::new(settings.clone(), client);
    let reply = |s: &mut Session| -> String {
        let out = s.take_output();
        let text = String::from_utf8_lossy(&out);
        text.lines().last().unwrap_or("").to_string()
    };
    let greeting = reply(&mut s);
    if !greeting.starts_with("220") {
        return Outcome::Deferred(greeting);
    }
    let utf8 = !env.from.is_ascii() || env.rcpts.iter().any(|r| !r.is_ascii());
    let eight = match body.has_8bit().await {
        Ok(eight) => eight,
        Err(e) => return Outcome::Deferred(format!("cannot read the file: {e}")),
    };
    let mut cmds = vec!["EHLO maildrop".to_string()];
    cmds.push(format!(
        "MAIL FROM:<{}>{}{}",
        env.from,
        if utf8 { " SMTPUTF8" } else { "" },
        if eight { " BODY=8BITMIME" } else { "" }
    ));
    cmds.extend(env.rcpts.iter().map(|r| format!("RCPT TO:<{r}>")));
    cmds.push("DATA".into());
    for c in cmds {
        let mut input = format!("{c}\r\n").into_bytes();
        let _ = s.feed(&mut input);
        let r = reply(&mut s);
        let want = if c == "DATA" { "354" } else { "250" };
        if !r.starts_with(want) {
            return refused(r);
        }
    }
    // Dot-stuff each chunk as it is read, and end the data.
    let mut chunks = body.reader();
    let mut encoder = DataEncoder::default();
    let mut data = Vec::new();
    let mut ended = false;
    let mut file = BodyWriter::default();
    loop {
        match s.feed(&mut data) {
            Step::Write => file.write(sink, &mut s).await,
            Step::Message(msg) => {
                let _ = s.take_output();
                let id = msg.id.clone();
                file.commit(sink, &mut s, msg).await;
                let line = reply(&mut s);
                return if line.starts_with("250") {
                    Outcome::Queued(id)
                } else {
                    refused(line)
                };
            }
            Step::NeedInput if ended => {
                return Outcome::Deferred("the session wanted more data".into());
            }
            Step::NeedInput => match chunks.next().await {
                Ok(Some(chunk)) => encoder.push(&chunk, &mut data),
                Ok(None) => {
                    encoder.finish(&mut data);
                    ended = true;
                }
                // The file is dropped unsent: the session never saw the end.
                Err(e) => return Outcome::Deferred(format!("cannot read the file: {e}")),
            },
            _ => {
                let r = reply(&mut s);
                return refused(r);
            }
        }
    }
}

fn refused(reply: String) -> Outcome {
    if reply.starts_with('5') {
        Outcome::Rejected(reply)
    } else {
        Outcome::Deferred(reply)
    }
}

/// Import every complete file in `dir` once; returns what became of each.
pub async fn import_once(
    dir: &Path,
    settings: &Arc<Settings>,
    sink: &dyn Sink,
) -> Vec<(String, Outcome)> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".msg") && !n.starts_with('.'))
            .collect(),
        Err(_) => return Vec::new(),
    };
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open(&path))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        };
        let outcome = match opened {
            Ok((env, body)) => submit(settings, sink, &env, &body).await,
            Err(e) => Outcome::Rejected(format!("unreadable: {e}")),
        };
        match &outcome {
            Outcome::Queued(id) => {
                tracing::info!(file = %name, id = %id, "maildrop: imported");
                if let Err(e) = std::fs::remove_file(&path) {
                    // Queued already: a second import would send it twice.
                    tracing::error!(file = %name, error = %e, "maildrop: cannot remove an imported file");
                }
            }
            Outcome::Deferred(why) => {
                tracing::warn!(file = %name, reply = %why, "maildrop: deferred");
                out.push((name, outcome));
                // The queue is full or the disk failing: try later.
                break;
            }
            Outcome::Rejected(why) => {
                let rejected = dir.join("rejected");
                let moved = std::fs::create_dir_all(&rejected)
                    .and_then(|()| std::fs::rename(&path, rejected.join(&name)));
                tracing::error!(file = %name, reply = %why, moved = moved.is_ok(), "maildrop: refused; moved to rejected/");
            }
        }
        if !matches!(outcome, Outcome::Deferred(_)) {
            out.push((name, outcome));
        }
    }
    out
}

/// The settings the importer's sessions use: the listener's, minus AUTH
/// (see the module documentation) and the client allow-list.
pub fn import_settings(listener: &Settings) -> Settings {
    let mut s = listener.clone();
    s.listen.require_auth = false;
    s.listen.allow_clients = vec![ipnet::IpNet::from(std::net::IpAddr::from([127, 0, 0, 1]))];
    s.loopback = |_| true;
    s
}

/// Import at start, then every `every` until `shutdown`, each time with the
/// listener's settings in force (a reload applies to the next import).
pub async fn watch(
    dir: PathBuf,
    listener: crate::inbound::LiveSettings,
    sink: Arc<dyn Sink>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let settings = Arc::new(import_settings(&listener.current()));
        import_once(&dir, &settings, sink.as_ref()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::{Incoming, MessageFile, SinkError};
    use parking_lot::Mutex;

    /// Committed messages with their whole bytes.
    type Committed = Arc<Mutex<Vec<(Incoming, Vec<u8>)>>>;

    /// The messages committed.
    #[derive(Default)]
    struct Collect(Committed);

    struct CollectFile(Committed, Vec<u8>);

    impl Sink for Collect {
        fn begin(&self, _id: &str) -> Box<dyn MessageFile> {
            Box::new(CollectFile(self.0.clone(), Vec::new()))
        }
    }

    impl MessageFile for CollectFile {
        fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.1.extend_from_slice(bytes);
            Ok(())
        }
        fn commit(
            self: Box<Self>,
            msg: Incoming,
        ) -> crate::common::BoxFuture<'static, Result<(), SinkError>> {
            let CollectFile(all, mut body) = *self;
            body.extend_from_slice(&msg.tail);
            all.lock().push((msg, body));
            Box::pin(async { Ok(()) })
        }
    }

    fn settings() -> Arc<Settings> {
        // AUTH required on the listener does not apply to the maildrop.
        let listen = crate::config::Listen {
            allowed_recipient_domains: vec!["example.com".into()],
            require_auth: true,
            ..Default::default()
        };
        Arc::new(import_settings(&Settings::new("mx.test", listen)))
    }

    fn env(rcpt: &str) -> Envelope {
        Envelope {
            from: "app@example.com".into(),
            rcpts: vec![rcpt.into()],
        }
    }

    #[tokio::test]
    async fn imports_through_the_session_and_sets_refused_mail_aside() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("maildrop");
        let ok = write(&md, &env("a@example.com"), b"Subject: one\r\n\r\n.dot\r\n").unwrap();
        write(
            &md,
            &env("b@elsewhere.example"),
            b"Subject: two\r\n\r\nx\r\n",
        )
        .unwrap();
        // A symbolic link to another file is not read.
        std::os::unix::fs::symlink(&ok, md.join("zz-link.msg")).unwrap();
        let sink = Collect::default();
        let out = import_once(&md, &settings(), &sink).await;
        assert_eq!(out.len(), 3, "{out:?}");
        let got = sink.0.lock();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.rcpts, vec!["a@example.com"]);
        let body = String::from_utf8_lossy(&got[0].1);
        assert!(body.starts_with("Received: from maildrop"), "{body}");
        assert!(body.contains("\r\nSubject: one\r\n"), "{body}");
        assert!(
            body.ends_with("\r\n\r\n.dot\r\n"),
            "dot-stuffing undone: {body}"
        );
        assert!(
            matches!(&out[1].1, Outcome::Rejected(r) if r.starts_with("550")),
            "{out:?}"
        );
        assert!(
            matches!(&out[2].1, Outcome::Rejected(r) if r.contains("plain file")),
            "{out:?}"
        );
        let left: Vec<_> = std::fs::read_dir(&md)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().unwrap().is_file())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(std::fs::read_dir(md.join("rejected")).unwrap().count(), 2);
    }
}
