//! The `file` upstream: each message becomes one `.eml` in an outbox directory, written atomically, so mailbridge runs with no account anywhere.

use super::{Body, Delivery, Envelope, Failure, Transport};
use crate::common::BoxFuture;
use crate::common::fs::write_atomic_with;
use std::path::PathBuf;

/// Writes `<outbox>/<queue id>.eml`, with `Return-Path` and `X-Mailbridge-To`
/// headers recording the envelope.
#[derive(Debug)]
pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    /// A transport writing into `dir` (created on first use).
    pub fn new(dir: PathBuf) -> Self {
        FileTransport { dir }
    }
}

impl Transport for FileTransport {
    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a Body) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            let mut head = Vec::with_capacity(256);
            head.extend_from_slice(format!("Return-Path: <{}>\r\n", env.from).as_bytes());
            head.extend_from_slice(
                format!("X-Mailbridge-To: {}\r\n", env.rcpts.join(", ")).as_bytes(),
            );
            let path = self.dir.join(format!("{}.eml", env.id));
            let dir = self.dir.clone();
            let message = message.clone();
            let written = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                write_atomic_with(&path, |w| {
                    w.write_all(&head)?;
                    message.write_to(w)
                })
            })
            .await;
            match written {
                Ok(Ok(())) => Ok(env.rcpts.iter().map(|_| Ok(())).collect()),
                Ok(Err(e)) => Err(Failure::server(format!(
                    "cannot write to outbox {}: {e}",
                    self.dir.display()
                ))),
                Err(e) => Err(Failure::server(format!("outbox writer failed: {e}"))),
            }
        })
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async move {
            std::fs::create_dir_all(&self.dir).map_err(|e| {
                Failure::server(format!("cannot create outbox {}: {e}", self.dir.display()))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_one_file_per_message() {
        let dir = tempfile::tempdir().unwrap();
        let t = FileTransport::new(dir.path().join("out"));
        let env = Envelope {
            id: "q1".into(),
            from: "a@b".into(),
            rcpts: vec!["c@d".into(), "e@f".into()],
            identity: None,
        };
        let r = t
            .deliver(&env, &Body::from(b"Subject: x\r\n\r\nhi\r\n"))
            .await
            .unwrap();
        assert_eq!(r.len(), 2);
        let got = std::fs::read(dir.path().join("out/q1.eml")).unwrap();
        assert_eq!(
            got,
            b"Return-Path: <a@b>\r\nX-Mailbridge-To: c@d, e@f\r\nSubject: x\r\n\r\nhi\r\n"
        );
    }

    #[tokio::test]
    async fn a_spooled_message_is_copied_a_chunk_at_a_time_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut msg = b"Subject: big\r\n\r\n".to_vec();
        while msg.len() < 700_000 {
            msg.extend_from_slice(b"0123456789abcdef\r\n");
        }
        let src = dir.path().join("src.eml");
        std::fs::write(&src, &msg).unwrap();
        let body = Body::open(std::fs::File::open(&src).unwrap()).unwrap();
        let t = FileTransport::new(dir.path().join("out"));
        let env = Envelope {
            id: "q2".into(),
            from: "a@b".into(),
            rcpts: vec!["c@d".into()],
            identity: None,
        };
        t.deliver(&env, &body).await.unwrap();
        let got = std::fs::read(dir.path().join("out/q2.eml")).unwrap();
        let head = b"Return-Path: <a@b>\r\nX-Mailbridge-To: c@d\r\n";
        assert_eq!(&got[..head.len()], head);
        assert!(got[head.len()..] == msg[..], "the copy differs");
        // No temp file is left beside it.
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            1
        );
    }
}
