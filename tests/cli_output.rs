//! The CLI's output against hostile or awkward surroundings: a closed pipe (`queue list | head -1`), a spool it may not read, and header bytes that would drive a terminal.

use std::process::{Command, Stdio};

use mailbridge::spool::{Meta, Spool};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailbridge")
}

/// A config in `dir` with a spool holding one message whose header has an
/// escape sequence, a lone CR and a BEL; its id.
fn setup(dir: &std::path::Path) -> String {
    std::fs::write(
        dir.join("config.toml"),
        "[listen]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"\"\n",
    )
    .unwrap();
    let (spool, _, _) = Spool::open(&dir.join("spool"), 100).unwrap();
    let body =
        b"Subject: \x1b]0;owned\x07\x1b[2J hi\r\nX-Note: a\rb\r\nFrom: a@b.test\r\n\r\nbody\r\n";
    let id = "20261201T000000-abcdef12".to_string();
    let mut meta = Meta::new(
        id.clone(),
        "a@b.test".into(),
        vec!["c@d.test".into()],
        body.len() as u64,
        0,
    );
    meta.last_error = Some("451 4.3.0 upstream said\x1b[31m red\r\nforged line".into());
    spool.store(&meta, body).unwrap();
    id
}

fn mailbridge(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("--config").arg(dir.join("config.toml")).args(args);
    c
}

#[test]
fn queue_list_into_a_closed_pipe_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    for args in [&["queue", "list"][..], &["check"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        // The reader is gone before mailbridge writes: like `| head -0`.
        drop(reader);
        let out = mailbridge(dir.path(), args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

#[test]
fn queue_show_and_list_escape_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let id = setup(dir.path());
    let out = mailbridge(dir.path(), &["queue", "show", &id])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.contains(&0x1b) && !out.stdout.contains(&0x07));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Subject: \\x1b]0;owned\\x07\\x1b[2J hi\r\nX-Note: a\\rb\r\nFrom: a@b.test"),
        "{text}"
    );
    let out = mailbridge(dir.path(), &["queue", "list"]).output().unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.contains(&0x1b));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "one line per message: {text}");
    assert!(
        text.contains("upstream said\\x1b[31m red\\r\\nforged line"),
        "{text}"
    );
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `queue list` by a user who may not read the spool's files is an error
/// (exit 1), not "0 message(s) queued". As root the command runs as
/// `nobody` (through `setpriv`), since root reads everything.
#[test]
fn queue_list_without_read_access_fails() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let queue = dir.path().join("spool/queue");
    for d in [dir.path(), &dir.path().join("spool"), &queue] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        dir.path().join("config.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    for e in std::fs::read_dir(&queue).unwrap() {
        let p = e.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let mut cmd = if effective_uid() == Some(0) {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()]);
        c
    } else {
        Command::new(bin())
    };
    let out = cmd
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .args(["queue", "list"])
        .output()
        .expect("setpriv (util-linux) runs the command as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("spool.path") && err.contains("ermission denied"),
        "{err}"
    );
}
