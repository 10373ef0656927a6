//! The end-to-end harness cleans up after itself: a `mailbridge` a test leaks (never dropped) still dies when the test process exits.

mod daemon;

use std::process::Command;
use std::time::{Duration, Instant};

const LEAK: &str = "MAILBRIDGE_TEST_LEAK_DAEMON";

/// True while `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[test]
fn a_leaked_daemon_dies_with_the_test_process() {
    if std::env::var_os(LEAK).is_some() {
        // Inner run: start a daemon, leak it and its directory, and exit.
        let dir = tempfile::tempdir().expect("tempdir");
        daemon::write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
        let d = daemon::Daemon::start(dir.path());
        println!("DAEMON-PID {}", d.pid());
        std::mem::forget(d);
        std::mem::forget(dir);
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_leaked_daemon_dies_with_the_test_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LEAK, "1")
        .output()
        .expect("run the inner test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "inner test failed: {stdout}");
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.split_once("DAEMON-PID ").map(|(_, pid)| pid))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no daemon pid in: {stdout}"));
    assert_ne!(pid, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() > deadline {
            // Do not leave it behind ourselves.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("mailbridge {pid} outlived the test process that started it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
