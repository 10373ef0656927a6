//! A message with a 30 MB attachment from a real spool file through Graph's upload path to the fake Graph: the attachment arrives byte-exact, and the memory the transport allocates while it goes does not grow with the message.
//!
//! Memory is counted by a global allocator that tracks the bytes live in
//! this test process and their high-water mark, except for allocations made
//! on the thread that runs the fake Graph (which keeps every uploaded byte,
//! as Graph does). One test per binary: nothing else allocates meanwhile.

mod alloc;
mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::fake_graph::{FakeGraph, GraphConfig};
use mailbridge::common::Secret;
use mailbridge::oauth::{StaticToken, TokenSource};
use mailbridge::transport::graph::{GraphSettings, GraphTransport};
use mailbridge::transport::{Body, Envelope, Transport};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

const SIZE: usize = 30 * 1024 * 1024;
/// Most bytes an attempt may add to the heap at once, whatever the size:
/// one upload chunk (2 MiB) being decoded and one being sent, the skeleton,
/// the HTTP client's buffers.
const BOUND: usize = 8 * 1024 * 1024;

fn attachment_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ ((i >> 11) as u8)
}

/// Spool a multipart message whose PDF attachment is `SIZE` bytes, written
/// a piece at a time.
fn spool(path: &std::path::Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("spool file"));
    f.write_all(b"From: Help Desk <desk@contoso.com>\r\nTo: boss@example.com\r\nSubject: Big report\r\nMessage-ID: <big@desk>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"OUT\"\r\n\r\n--OUT\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the attachment.\r\n--OUT\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=report.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n").expect("write");
    // 57 bytes make one 76-character line.
    let mut i = 0;
    while i < SIZE {
        let n = 57.min(SIZE - i);
        let raw: Vec<u8> = (i..i + n).map(attachment_byte).collect();
        f.write_all(B64.encode(raw).as_bytes()).expect("write");
        f.write_all(b"\r\n").expect("write");
        i += n;
    }
    f.write_all(b"--OUT--\r\n").expect("write");
    f.flush().expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mb_attachment_is_uploaded_from_the_spool_with_bounded_memory_and_byte_exact() {
    // The fake on its own thread and runtime, uncounted.
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let fake_thread = std::thread::spawn(move || {
        alloc::uncount_this_thread();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let fake = FakeGraph::start(GraphConfig::default()).await;
            let _ = tx.send(fake);
            let _ = stop_rx.await;
        });
    });
    let fake = rx.recv().expect("the fake started");

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("big.eml");
    spool(&path);
    let tokens: Arc<dyn TokenSource> = Arc::new(StaticToken {
        token: Secret::new("token-1"),
        identity: "desk@contoso.com".into(),
    });
    let client = mailbridge::http::client(None, &Default::default(), Duration::from_secs(120))
        .expect("client");
    let t = GraphTransport::new(GraphSettings::new(
        fake.endpoint(),
        "desk@contoso.com",
        tokens,
        client,
    ))
    .expect("transport");
    let env = Envelope {
        id: "big1".into(),
        from: "desk@contoso.com".into(),
        rcpts: vec!["boss@example.com".into()],
        identity: None,
    };
    let body = Body::open(std::fs::File::open(&path).expect("open")).expect("read head");

    let mark = alloc::mark();
    let d = t.deliver(&env, &body).await;
    let peak = mark.peak();
    assert!(matches!(&d, Ok(v) if v.len() == 1 && v[0].is_ok()), "{d:?}");
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    let draft = sent[0].draft.clone().unwrap_or_default();
    assert_eq!(draft["subject"], "Big report");
    let text = draft["body"]["content"].as_str().unwrap_or("");
    assert!(text.contains("See the attachment."), "{text}");
    let atts = &sent[0].attachments;
    assert_eq!(atts.len(), 1);
    assert_eq!(
        (atts[0].name.as_str(), atts[0].uploaded),
        ("report.pdf", true)
    );
    assert_eq!(atts[0].bytes.len(), SIZE, "size uploaded");
    assert!(
        atts[0]
            .bytes
            .iter()
            .enumerate()
            .all(|(i, b)| *b == attachment_byte(i)),
        "uploaded bytes differ"
    );
    eprintln!(
        "uploading a {} byte message: heap peak {peak} bytes above the start",
        body.len()
    );
    assert!(
        peak < BOUND,
        "uploading a {} byte message allocated up to {peak} bytes at once",
        body.len()
    );
    drop(sent);
    drop(fake);
    let _ = stop_tx.send(());
    fake_thread.join().expect("fake thread");
}
