//! The deployment files: the systemd unit passes `systemd-analyze verify` without a warning, and the daemon tells systemd it is ready (`Type=notify`) through `NOTIFY_SOCKET`.

mod daemon;

use daemon::{Daemon, bin, have, write_config};
use std::process::Command;
use std::time::Duration;

#[test]
fn systemd_unit_verifies_cleanly() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/systemd/mailbridge.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/mailbridge "));
    // verify checks that ExecStart exists: point it at the built binary.
    let path = dir.path().join("mailbridge.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/mailbridge", bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Unknown keys and bad values are only warnings: none is allowed.
    assert!(err.trim().is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn ready_notification_reaches_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut d = Daemon::start_env(
        dir.path(),
        &dir.path().join("config.toml"),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(d.term(), Some(0));
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
