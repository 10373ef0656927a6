//! Delivery to Postfix's `smtp-sink`, an SMTP server written apart from mailbridge: pipelined transactions (RFC 2920) on pooled connections, messages arriving whole (dot-stuffed lines, one larger than a write), and refused recipients leaving the connection usable or closed, never out of step.
//!
//! Skips with a message when `smtp-sink` (Debian's `postfix` package) is not
//! installed, unless `MAILBRIDGE_REQUIRE_TOOLS` is set (CI), where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::real::{free_port, have, wait_listening};
use mailbridge::config::HostPort;
use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
use mailbridge::transport::{Body, Envelope, Severity, Transport};

const SINK: &str = "/usr/sbin/smtp-sink";

/// A running `smtp-sink`, killed on drop.
struct Sink {
    child: Child,
    port: u16,
    dumps: PathBuf,
    log: PathBuf,
}

impl Sink {
    /// `smtp-sink` on a free loopback port, one dump file per message in
    /// `dir/dumps`, with `extra` options (e.g. `-f RCPT`: refuse every RCPT with 5xx).
    fn start(dir: &Path, extra: &[&str]) -> Sink {
        let dumps = dir.join("dumps");
        std::fs::create_dir_all(&dumps).unwrap();
        let log = dir.join("sink.log");
        // As root, smtp-sink must drop to another user, who writes the dumps.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dumps, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let port = free_port();
        let mut cmd = Command::new(SINK);
        if root {
            cmd.args(["-u", "nobody"]);
        }
        cmd.arg("-d")
            .arg(dumps.join("%H%M%S."))
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .arg("64")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{SINK}: {e}"));
        let sink = Sink {
            child,
            port,
            dumps,
            log,
        };
        wait_listening(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "smtp-sink",
            &sink.log,
        );
        sink
    }

    /// The dumped messages so far, as text.
    fn messages(&self) -> Vec<String> {
        std::fs::read_dir(&self.dumps)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    }

    /// Wait (at most 10 s) until `n` messages were dumped.
    async fn wait_for(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.messages();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn transport(sink: &Sink) -> SmtpTransport {
    SmtpTransport::new(SmtpSettings {
        server: HostPort {
            host: "127.0.0.1".into(),
            port: sink.port,
        },
        implicit_tls: false,
        starttls: false,
        ca_file: None,
        auth: SmtpAuth::None,
        hostname: "relay.test".into(),
        timeout: Duration::from_secs(10),
    })
    .unwrap()
    .with_idle_connections(4)
}

fn envelope(id: usize, rcpts: &[&str]) -> Envelope {
    Envelope {
        id: format!("m{id}"),
        from: "app@relay.test".into(),
        rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
        identity: None,
    }
}

/// Message `n`: a line that starts with a dot, and `filler` lines after it.
fn message(n: usize, filler: usize) -> String {
    let mut m = format!(
        "From: app@relay.test\r\nTo: a@example.com\r\nSubject: sink test {n}\r\n\r\n.leading dot {n}\r\n"
    );
    for i in 0..filler {
        m.push_str(&format!("line {i} of message {n}, to fill the data\r\n"));
    }
    m.push_str(&format!("end of message {n}\r\n"));
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_deliveries_arrive_whole() {
    // smtp-sink prints its usage and exits non-zero on -h: `have` only
    // checks that it starts.
    if !have(SINK, "-h") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), &[]);
    let t = std::sync::Arc::new(transport(&sink));
    // Eight at once (more than the four idle connections kept), then eight
    // more on the pooled connections; message 3 is larger than one write.
    for round in 0..2 {
        let mut tasks = Vec::new();
        for n in round * 8..round * 8 + 8 {
            let t = t.clone();
            let filler = if n == 3 { 4000 } else { 20 };
            tasks.push(tokio::spawn(async move {
                let body = Body::from(message(n, filler).as_str());
                t.deliver(&envelope(n, &["a@example.com", "b@example.com"]), &body)
                    .await
            }));
        }
        for task in tasks {
            let results = task.await.unwrap().expect("delivered");
            assert!(results.iter().all(Result::is_ok), "{results:?}");
        }
    }
    let got = sink.wait_for(16).await;
    assert_eq!(
        got.len(),
        16,
        "{}",
        std::fs::read_to_string(&sink.log).unwrap()
    );
    for n in 0..16 {
        let filler = if n == 3 { 4000 } else { 20 };
        let want = message(n, filler).replace("\r\n", "\n");
        let dump = got
            .iter()
            .find(|d| d.contains(&format!("Subject: sink test {n}\n")))
            .unwrap_or_else(|| panic!("message {n} not dumped"));
        assert!(dump.contains(&want), "message {n} changed:\n{dump}");
        assert!(dump.contains("X-Rcpt-Args: <a@example.com>"), "{dump}");
        assert!(dump.contains("X-Rcpt-Args: <b@example.com>"), "{dump}");
    }
}

#[tokio::test]
async fn refused_recipients_leave_the_connection_in_step() {
    if !have(SINK, "-h") {
        return;
    }
    // Every RCPT refused (5xx): whatever the sink answers to the pipelined
    // DATA, mailbridge must not deliver an empty message, and the next
    // message must get its own replies.
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(dir.path(), &["-f", "RCPT"]);
    let t = transport(&sink);
    let body = Body::from(message(1, 5).as_str());
    for (n, rcpt) in [(1, "a@example.com"), (2, "b@example.com")] {
        let results = t
            .deliver(&envelope(n, &[rcpt]), &body)
            .await
            .expect("per recipient");
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().is_err_and(|f| f.severity == Severity::Permanent)),
            "{results:?}"
        );
    }
    // Nothing was delivered: no empty message slipped through the DATA.
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
}
