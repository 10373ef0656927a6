//! End to end with the real binary and the `file` upstream: real clients (swaks, Python smtplib) in, `.eml` files out, and the CLI.

mod daemon;

use daemon::{Daemon, have, write_config};
use std::process::Command;

fn outbox(d: &Daemon) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(d.dir.join("outbox"))
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn swaks_lands_an_eml_in_the_outbox() {
    if !have("swaks") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    let out = Command::new("swaks")
        .args([
            "--server",
            &d.smtp.to_string(),
            "--to",
            "a@example.com",
            "--from",
            "app@legacy.local",
            "--header",
            "Subject: swaks test",
        ])
        .output()
        .unwrap();
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{transcript}");
    assert!(
        transcript.contains("<-  250 2.0.0 Ok: queued as "),
        "{transcript}"
    );
    d.wait_for(20, "the .eml", || outbox(&d).len() == 1);
    let eml = std::fs::read_to_string(&outbox(&d)[0]).unwrap();
    assert!(
        eml.starts_with("Return-Path: <app@legacy.local>\r\nX-Mailbridge-To: a@example.com\r\n"),
        "{eml}"
    );
    assert!(eml.contains("Subject: swaks test\r\n"));
    assert!(
        eml.contains("\r\nReceived: from ") || eml.contains("Received: from "),
        "{eml}"
    );
    d.wait_for(20, "the queue to empty", || d.queued() == 0);
}

#[test]
fn python_smtplib_with_bcc_recipients() {
    if !have("python3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "Reports <reports@legacy.local>"
m["To"] = "boss@example.com"
m["Subject"] = "Nightly report"
m.set_content("line one\n.leading dot\nlast line\n")
with smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=30) as s:
    s.ehlo("erp.local")
    assert s.has_extn("size") and s.has_extn("8bitmime") and s.has_extn("pipelining"), s.esmtp_features
    r = s.send_message(m, to_addrs=["boss@example.com", "audit@example.com"])
    assert r == {}, r
print("sent")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(d.smtp.ip().to_string())
        .arg(d.smtp.port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_for(20, "the .eml", || outbox(&d).len() == 1);
    let eml = std::fs::read_to_string(&outbox(&d)[0]).unwrap();
    assert!(
        eml.contains("X-Mailbridge-To: boss@example.com, audit@example.com\r\n"),
        "{eml}"
    );
    assert!(eml.contains("\r\n.leading dot\r\n"), "dot-unstuffed: {eml}");
    assert!(
        eml.contains("Message-ID: ") || eml.contains("Message-Id: "),
        "{eml}"
    );
    assert!(!eml.replace("\r\n", "").contains('\n'), "CRLF only");
}

#[test]
fn cli_status_failback_and_queue() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    let (code, out, err) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["route"]["active"], "primary");
    assert_eq!(v["queue"]["depth"], 0);
    let (code, out, _) = d.cli(&["failback"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"changed\": false"), "{out}");
    let (code, out, _) = d.cli(&["queue", "list"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ID "), "{out}");
    let (code, _, err) = d.cli(&["queue", "show", "0123456789abc"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = d.cli(&["queue", "retry", "../etc"]);
    assert_eq!(code, 2, "{err}");
    // A wrong admin token is refused.
    let resp = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer wrong",
            &format!("http://{}/failback", d.admin),
        ])
        .output();
    if let Ok(r) = resp
        && r.status.success()
    {
        assert_eq!(String::from_utf8_lossy(&r.stdout), "401");
    }
}

#[test]
fn check_names_the_bad_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[upstream]\nprotocol = \"smtp\"\nserver = \"mail.example.com\"\nrequires_auth = true\nusername = \"u\"\npassword = \"Pa55-secret-word\"\nportt = 25\n").unwrap();
    let out = Command::new(daemon::bin())
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("portt"), "{err}");
    assert!(!err.contains("Pa55-secret-word"), "{err}");
    std::fs::write(&path, "[upstream]\nprotocol = \"smtp\"\nserver = \"mail.example.com\"\nrequires_auth = true\nusername = \"u\"\npassword = \"Pa55-secret-word\"\n").unwrap();
    let out = Command::new(daemon::bin())
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("password = \"***\"") && !printed.contains("Pa55-secret-word"),
        "{printed}"
    );
}

#[test]
fn shipped_config_is_valid() {
    let out = Command::new(daemon::bin())
        .arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the child when dropped (a test never leaves a process behind).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_held_spool_refuses_a_second_daemon_and_offline_edits() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    // A second daemon on the same spool stops with a clear error.
    let mut second = Reaped(
        Command::new(daemon::bin())
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .arg("run")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut status = None;
    for _ in 0..300 {
        if let Some(s) = second.0.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = status.expect("the second daemon kept running");
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("in use by another mailbridge process"),
        "{err}"
    );
    // The offline CLI (admin endpoint not answering) refuses to edit under it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _, err) = daemon::cli(
        &dir.path().join("config.toml"),
        &["queue", "retry", "0123456789abc"],
        dead,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("a running mailbridge holds the spool"),
        "{err}"
    );
    // The daemon still runs and answers.
    let (code, _, err) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn status_counts_corrupt_entries() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let queue = dir.path().join("spool/queue");
    std::fs::create_dir_all(&queue).unwrap();
    std::fs::write(queue.join("0123456789abc.json"), b"{ truncated").unwrap();
    std::fs::write(queue.join("orphan.eml"), b"x").unwrap();
    let d = Daemon::start(dir.path());
    let (code, out, err) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["corrupt"]["count"], 2, "{out}");
    let newest = v["corrupt"]["newest"]["name"].as_str().unwrap_or("");
    assert!(
        ["0123456789abc.json", "orphan.eml"].contains(&newest),
        "{out}"
    );
    assert!(v["corrupt"]["newest"]["moved_at"].as_u64().unwrap_or(0) > 0);
}
