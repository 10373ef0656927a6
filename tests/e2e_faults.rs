//! Injected storage faults on the real binary (libfiu's `fiu-run`): a failing fsync answers `451`, a full disk `452`, nothing half-written stays in the spool, and the process keeps serving.

mod daemon;

use daemon::{Daemon, have, smtp_send, write_config};
use std::process::Command;

const MSG: &str = "From: app@legacy.local\r\nSubject: fault\r\n\r\nhello\r\n";

fn fiu_ctrl(pid: u32, ctrl: &str, command: &str) {
    let st = Command::new("fiu-ctrl")
        .args(["-f", ctrl, "-c", command, &pid.to_string()])
        .status()
        .expect("fiu-ctrl");
    assert!(st.success(), "fiu-ctrl {command}");
}

fn count(d: &Daemon, sub: &str) -> usize {
    std::fs::read_dir(d.dir.join(sub))
        .map(|r| r.count())
        .unwrap_or(0)
}

/// Files in `spool/queue` once `spool/tmp` is empty. Retry attempts rewrite
/// metadata through a short-lived temp file, so `tmp/` may hold one for a
/// moment; a half-written entry left by a failed store never goes away, and
/// fails this after 10 s.
fn spool_files(d: &Daemon) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count(d, "spool/tmp") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "spool/tmp keeps a file: {:?}",
            std::fs::read_dir(d.dir.join("spool/tmp")).map(|r| r
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect::<Vec<_>>())
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    count(d, "spool/queue")
}

#[test]
fn fsync_failure_gives_451_and_leaves_nothing() {
    if !have("fiu-run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Deliveries would remove files; an unreachable upstream keeps accepted mail queued.
    write_config(
        dir.path(),
        "protocol = \"smtp\"\nserver = \"127.0.0.1:9\"\ntls = false\ntimeout_secs = 1",
    );
    let ctrl = dir.path().join("fiu").display().to_string();
    let d = Daemon::start_wrapped(dir.path(), &["fiu-run", "-x", "-f", &ctrl]);
    let r = smtp_send(d.smtp, "app@legacy.local", &["a@example.com"], MSG);
    assert!(r.starts_with("250"), "{r}");
    let before = spool_files(&d);
    assert_eq!(before, 2, "one committed entry: .eml + .json");

    // The spool syncs files with fdatasync and directories with fsync: fail both.
    fiu_ctrl(d.pid(), &ctrl, "enable name=posix/io/sync/*,failinfo=5");
    let r = smtp_send(d.smtp, "app@legacy.local", &["b@example.com"], MSG);
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert_eq!(spool_files(&d), before, "no half entry");

    fiu_ctrl(d.pid(), &ctrl, "enable name=posix/io/sync/*,failinfo=28");
    let r = smtp_send(d.smtp, "app@legacy.local", &["c@example.com"], MSG);
    assert!(
        r.starts_with("452 4.3.1"),
        "ENOSPC is 'insufficient storage': {r}\n{}",
        d.log()
    );
    assert_eq!(spool_files(&d), before);

    fiu_ctrl(d.pid(), &ctrl, "disable name=posix/io/sync/*");
    let r = smtp_send(d.smtp, "app@legacy.local", &["d@example.com"], MSG);
    assert!(r.starts_with("250"), "still serving after the faults: {r}");
    assert_eq!(spool_files(&d), before + 2);
}

#[test]
fn the_250_is_written_only_after_the_spool_is_synced() {
    if !have("strace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "protocol = \"smtp\"\nserver = \"127.0.0.1:9\"\ntls = false\ntimeout_secs = 1",
    );
    let trace = dir.path().join("trace.txt").display().to_string();
    let d = Daemon::start_wrapped(
        dir.path(),
        &[
            "strace",
            "-f",
            "-y",
            "-qq",
            "-s",
            "200",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2,write,sendto,writev",
            "-o",
            &trace,
        ],
    );
    let r = smtp_send(d.smtp, "app@legacy.local", &["a@example.com"], MSG);
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let id = r.rsplit(' ').next().unwrap().to_string();
    drop(d);
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let pos = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
    let reply = pos(&|l: &str| l.contains(&format!("250 2.0.0 Ok: queued as {id}")))
        .expect("the 250 write");
    let body_sync = pos(&|l: &str| l.contains("sync(") && l.contains(&format!("tmp/{id}.eml")))
        .expect("fsync of the body");
    let meta_sync = pos(&|l: &str| l.contains("sync(") && l.contains(&format!("tmp/{id}.json")))
        .expect("fsync of the metadata");
    let commit = pos(&|l: &str| l.contains("rename") && l.contains(&format!("queue/{id}.json")))
        .expect("rename into queue/");
    let dir_sync = lines
        .iter()
        .enumerate()
        .position(|(i, l)| i > commit && l.contains("fsync(") && l.contains("/queue>"))
        .expect("fsync of queue/");
    assert!(
        body_sync < commit && meta_sync < commit,
        "files synced before the rename"
    );
    assert!(
        commit < dir_sync && dir_sync < reply,
        "directory synced after the rename and before the 250:\n{}",
        &lines[body_sync.min(commit)..=reply].join("\n")
    );
}
