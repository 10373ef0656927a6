//! The CLI's output against hostile or awkward surroundings: a closed pipe for every command (`queue list | head -1`), a spool it may not read, header bytes that would drive a terminal, a password from a pipe, the readable `status` text, and `queue retry --all` without a running relay.

mod daemon;

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
    let spool = Spool::open(&dir.join("spool"), 100).unwrap();
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

#[test]
fn every_command_into_a_closed_pipe_ends_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let id = setup(dir.path());
    let commands: [&[&str]; 8] = [
        &["queue", "list"],
        &["queue", "show", &id],
        &["queue", "retry", "--all"],
        &["check"],
        &["status"],
        &["status", "--json"],
        &["health"],
        &["--help"],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = mailbridge(dir.path(), args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // 0, or 1 for what needs the (not running) relay; never a signal.
        assert!(matches!(out.status.code(), Some(0 | 1)), "{args:?}: {err}");
    }
    // `hash-password` too, with the password on a pipe.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"pw\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn hash_password_from_a_pipe_prints_only_the_hash() {
    use std::io::Write;
    let mut child = Command::new(bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8_lossy(&out.stdout);
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("correct horse"));
    // No prompt and no echo when stdin is not a terminal.
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let parsed = PasswordHash::new(hash.trim()).unwrap();
    assert!(
        argon2::Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok()
    );
}

#[test]
fn queue_retry_all_without_a_relay_makes_every_message_due() {
    let dir = tempfile::tempdir().unwrap();
    let first = setup(dir.path());
    let spool = Spool::open(&dir.path().join("spool"), 100).unwrap();
    let second = "20261201T000001-abcdef13".to_string();
    let mut meta = Meta::new(
        second.clone(),
        "a@b.test".into(),
        vec!["e@f.test".into()],
        8,
        0,
    );
    meta.next_attempt = 4_000_000_000;
    spool.store(&meta, b"x: y\r\n\r\n").unwrap();
    let mut m = spool.read_meta(&first).unwrap();
    m.next_attempt = 4_000_000_000;
    spool.update(&m).unwrap();
    drop(spool);
    let out = mailbridge(dir.path(), &["queue", "retry", "--all"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 message(s) due now"), "{err}");
    let spool = Spool::open(&dir.path().join("spool"), 100).unwrap();
    for id in [&first, &second] {
        assert_eq!(spool.read_meta(id).unwrap().next_attempt, 0, "{id}");
    }
    // An id and --all together is a usage error.
    let out = mailbridge(dir.path(), &["queue", "retry", "--all", &first])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn status_text_shows_dates_the_reason_the_queue_and_identities() {
    let doc = serde_json::json!({
        "version": "0.1.0",
        "uptime_secs": 3700,
        "route": {"active": "alternate", "server": "smtp://backup.test:587", "since": 1_796_150_375u64,
                  "reason": "primary unavailable: connection refused"},
        "servers": [{"label": "primary", "server": "smtp://main.test:587"},
                    {"label": "alternate", "server": "smtp://backup.test:587"}],
        "queue": {"depth": 3, "in_flight": 1, "deferred": 2, "bounce_undeliverable": 0,
                  "oldest_age_secs": 5400, "last_error": "451 4.3.0 try later\u{1b}[2J"},
        "corrupt": {"count": 0, "newest": null},
        "oauth": [{"upstream": "upstream", "provider": "office365", "flow": "authorization_code",
                   "identities": [{"identity": "desk@corp.test", "state": "reconsent_needed",
                                   "access_token_expires_at": null, "last_error": "invalid_grant"}]}],
    });
    let text = mailbridge::cli::status::status_text(&doc, 1_796_150_375 + 600);
    assert!(
        text.contains("Sending through: alternate server smtp://backup.test:587 since "),
        "{text}"
    );
    assert!(
        text.contains(&mailbridge::cli::status::date(1_796_150_375)),
        "{text}"
    );
    assert!(!text.contains("1796150375"), "no epoch numbers: {text}");
    assert!(text.contains("(10m ago)"), "{text}");
    assert!(
        text.contains("because: primary unavailable: connection refused"),
        "{text}"
    );
    assert!(
        text.contains("Queue: 3 message(s), 2 waiting for a retry, 1 in flight, oldest 90m"),
        "{text}"
    );
    assert!(
        text.contains("desk@corp.test") && text.contains("reconsent_needed"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "escaped for the terminal: {text}");
}

/// The keys of `v` and of each object inside it, as paths.
fn shape(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                let p = format!("{at}.{k}");
                out.push(p.clone());
                shape(v, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for v in a {
                shape(v, &format!("{at}[]"), out);
            }
        }
        _ => {}
    }
    out.sort();
    out.dedup();
}

#[test]
fn auth_status_has_one_shape_whether_or_not_the_relay_runs() {
    let dir = tempfile::tempdir().unwrap();
    daemon::write_config(
        dir.path(),
        "protocol = \"graph\"\nrequires_auth = true\nauth = \"oauth\"\nmailbox = \"desk@corp.test\"\n\
         [upstream.oauth]\nprovider = \"custom\"\nscope = \"x\"\nflow = \"client_credentials\"\n\
         client_id = \"c\"\nclient_secret = \"s\"\ntoken_url = \"http://127.0.0.1:9/token\"",
    );
    let d = daemon::Daemon::start(dir.path());
    let (code, live, err) = d.cli(&["auth", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("from the running relay"), "{err}");
    drop(d);
    let (code, offline, err) = daemon::cli(
        &dir.path().join("config.toml"),
        &["auth", "status"],
        "127.0.0.1:9".parse().unwrap(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the relay is not running"), "{err}");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    shape(&serde_json::from_str(&live).unwrap(), "", &mut a);
    shape(&serde_json::from_str(&offline).unwrap(), "", &mut b);
    assert_eq!(a, b, "live:\n{live}\noffline:\n{offline}");
    assert!(a.contains(&".identities[].state".to_string()), "{a:?}");
}
