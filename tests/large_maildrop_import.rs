//! A 30 MB maildrop file imported through the in-process SMTP session into a hashing sink: every byte arrives, and the memory allocated while it goes does not grow with the message.
//!
//! Memory is counted by a global allocator that tracks the bytes live in
//! this test process and their high-water mark, so the figure covers the
//! file reader, the dot-stuffing, the session and the sink alike (one test
//! per binary: no other test allocates meanwhile).

mod alloc;

use std::io::Write;
use std::sync::{Arc, Mutex};

use mailbridge::common::BoxFuture;
use mailbridge::inbound::{Incoming, MessageFile, Settings, Sink, SinkError};
use mailbridge::maildrop::{Envelope, Outcome, import_once, import_settings};
use sha2::{Digest, Sha256};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

const SIZE: usize = 30 * 1024 * 1024;
/// Most bytes an import may add to the heap at once, whatever the size: a
/// chunk of the file, its dot-stuffed form, the session's buffer.
const BOUND: usize = 2 * 1024 * 1024;
/// Where the message's own bytes start in what the sink is given.
const FIRST_LINE: &[u8] = b"From: a@example.com\r\n";

/// Write a 30 MB maildrop file (lines that need dot-stuffing, 8-bit text)
/// a piece at a time; returns the SHA-256 and size of its message.
fn write_maildrop(dir: &std::path::Path) -> ([u8; 32], u64) {
    std::fs::create_dir_all(dir).expect("maildrop dir");
    let env = Envelope {
        from: "a@example.com".into(),
        rcpts: vec!["b@example.com".into()],
    };
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(dir.join("0000big.msg")).expect("maildrop file"),
    );
    f.write_all(&serde_json::to_vec(&env).expect("envelope"))
        .expect("write");
    f.write_all(b"\n").expect("write");
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut put = |bytes: &[u8]| {
        f.write_all(bytes).expect("write");
        hash.update(bytes);
        size += bytes.len() as u64;
        size as usize
    };
    put(FIRST_LINE);
    put(b"To: b@example.com\r\nSubject: big\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n");
    let mut written = put(b"Message-ID: <big@example.com>\r\n\r\n");
    let mut i = 0u64;
    while written < SIZE {
        written = match i % 5 {
            0 => put(format!(".{i} starts with a dot\r\n").as_bytes()),
            1 => put(b".\r\n"),
            2 => put(format!("line {i}: gr\u{fc}\u{df}e \u{e9}t\u{e9}\r\n").as_bytes()),
            _ => put(format!("{i:0>70}\r\n").as_bytes()),
        };
        i += 1;
    }
    f.flush().expect("flush");
    (hash.finalize().into(), size)
}

/// What the sink made of the one message it was given.
#[derive(Default)]
struct Seen {
    digest: Option<([u8; 32], u64)>,
    widest_write: usize,
}

/// Hashes each message from its first own line on (what the session put
/// in front, `Received:`, is skipped), holding nothing of it.
#[derive(Default)]
struct HashingSink(Arc<Mutex<Seen>>);

struct HashingFile {
    seen: Arc<Mutex<Seen>>,
    /// Bytes before `FIRST_LINE` was found (a few hundred).
    prefix: Vec<u8>,
    started: bool,
    hash: Sha256,
    size: u64,
}

impl HashingFile {
    fn take(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.started {
            self.hash.update(bytes);
            self.size += bytes.len() as u64;
            return Ok(());
        }
        self.prefix.extend_from_slice(bytes);
        match self
            .prefix
            .windows(FIRST_LINE.len())
            .position(|w| w == FIRST_LINE)
        {
            Some(at) => {
                self.started = true;
                let rest = self.prefix.split_off(at);
                self.take(&rest)
            }
            None if self.prefix.len() > 64 * 1024 => Err(std::io::Error::other(
                "the message's first line is not near the start",
            )),
            None => Ok(()),
        }
    }
}

impl Sink for HashingSink {
    fn begin(&self, _id: &str) -> Box<dyn MessageFile> {
        Box::new(HashingFile {
            seen: self.0.clone(),
            prefix: Vec::new(),
            started: false,
            hash: Sha256::new(),
            size: 0,
        })
    }
}

impl MessageFile for HashingFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        {
            let mut seen = self.seen.lock().expect("lock");
            seen.widest_write = seen.widest_write.max(bytes.len());
        }
        self.take(bytes)
    }
    fn commit(mut self: Box<Self>, msg: Incoming) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async move {
            self.take(&msg.tail).map_err(|_| SinkError::Io)?;
            if !self.started || !self.prefix.starts_with(b"Received: from maildrop") {
                return Err(SinkError::Io);
            }
            let digest: [u8; 32] = self.hash.clone().finalize().into();
            self.seen.lock().expect("lock").digest = Some((digest, self.size));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mb_maildrop_file_is_imported_with_bounded_memory_and_every_byte_intact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let md = dir.path().join("maildrop");
    let want = write_maildrop(&md);
    let listen = mailbridge::config::Listen {
        allowed_recipient_domains: vec!["example.com".into()],
        ..Default::default()
    };
    let settings = Arc::new(import_settings(&Settings::new("mx.test", listen)));
    let sink = HashingSink::default();

    let mark = alloc::mark();
    let out = import_once(&md, &settings, &sink).await;
    let peak = mark.peak();
    assert!(
        matches!(&out[..], [(name, Outcome::Queued(_))] if name == "0000big.msg"),
        "{out:?}"
    );
    let seen = sink.0.lock().expect("lock");
    let got = seen.digest.expect("the sink got the message");
    assert_eq!(got.1, want.1, "size received");
    assert_eq!(got.0, want.0, "SHA-256 of the message received");
    assert!(
        seen.widest_write <= 128 * 1024,
        "one write of {} bytes",
        seen.widest_write
    );
    eprintln!(
        "importing {} bytes: heap peak {peak} bytes above the start",
        want.1
    );
    assert!(
        peak < BOUND,
        "importing {} bytes allocated up to {peak} bytes at once",
        want.1
    );
    assert!(
        !md.join("0000big.msg").exists(),
        "an imported file is removed"
    );
}
