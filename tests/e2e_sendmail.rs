//! End to end for deployment: PHP `mail()` through `mailbridge sendmail` (daemon running, and stopped then started: the maildrop), sendmail exit codes, `/readyz` and `mailbridge health`, a daemon configured by environment variables alone, JSON logs.

mod daemon;

use daemon::{Daemon, bin, have, write_config};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn outbox(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("outbox"))
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .collect()
        })
        .unwrap_or_default()
}

fn maildrop(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("spool/maildrop"))
        .map(|r| {
            r.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                .count()
        })
        .unwrap_or(0)
}

/// A config for the sendmail side, pointing at the daemon's real SMTP port
/// (or a closed one when `smtp` is None).
fn sendmail_config(dir: &Path, smtp: Option<std::net::SocketAddr>) -> PathBuf {
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let addr = match smtp {
        Some(a) => a.to_string(),
        None => {
            // A port nothing listens on: bind, note it, close.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        }
    };
    let path = dir.join("sendmail.toml");
    std::fs::write(
        &path,
        text.replace(
            "[listen]\naddress = \"127.0.0.1:0\"",
            &format!("[listen]\naddress = \"{addr}\""),
        ),
    )
    .unwrap();
    path
}

/// PHP's `mail()` with `sendmail_path` set to `sendmail_path`.
fn php_mail(
    sendmail_path: &str,
    config: Option<&Path>,
    to: &str,
    subject: &str,
    headers: &str,
) -> Output {
    let script = format!(
        "$ok = mail({to:?}, {subject:?}, \"Hello from PHP.\\nSecond line.\\n.\\nAfter a dot.\", {headers:?}); exit($ok ? 0 : 3);"
    );
    let mut cmd = Command::new("php");
    if let Some(c) = config {
        cmd.env("MAILBRIDGE_CONFIG", c);
    }
    cmd.arg("-n")
        .arg("-d")
        .arg(format!("sendmail_path={sendmail_path}"))
        .arg("-r")
        .arg(script)
        .output()
        .expect("run php")
}

/// The message as sent (after the file transport's envelope lines).
fn check_php_message(eml: &str) {
    let i = eml.find("X-Mailbridge-To: ").expect("envelope line");
    let eml = &eml[i + eml[i..].find("\r\n").unwrap() + 2..];
    assert!(eml.contains("Subject: PHP test\r\n"), "{eml}");
    assert!(eml.contains("From: web@app.example\r\n"), "{eml}");
    // -i: the lone dot is text, and arrives as one dot.
    assert!(
        eml.contains("\r\n\r\nHello from PHP.\r\nSecond line.\r\n.\r\nAfter a dot.\r\n"),
        "{eml}"
    );
    assert!(!eml.contains("secret-copy"), "Bcc must not travel: {eml}");
    assert!(eml.contains("Message-ID: <"), "{eml}");
    assert!(
        eml.contains("\r\nDate: ") || eml.starts_with("Date: "),
        "{eml}"
    );
    assert!(
        !eml.contains("\n\n") && !eml.replace("\r\n", "").contains('\n'),
        "bare LF: {eml:?}"
    );
}

#[test]
fn php_mail_through_the_running_daemon() {
    if !have("php") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    let cfg = sendmail_config(dir.path(), Some(d.smtp));
    let path = format!("{} --config {} sendmail -t -i", bin(), cfg.display());
    let out = php_mail(
        &path,
        None,
        "to@example.com",
        "PHP test",
        "From: web@app.example\r\nBcc: secret-copy@example.com",
    );
    assert!(out.status.success(), "{out:?}");
    d.wait_for(20, "the .eml", || outbox(dir.path()).len() == 1);
    let eml = std::fs::read_to_string(&outbox(dir.path())[0]).unwrap();
    check_php_message(&eml);
    // Both recipients, the Bcc one in the envelope only.
    assert!(
        eml.contains("X-Mailbridge-To: to@example.com, secret-copy@example.com\r\n"),
        "{eml}"
    );
    assert!(
        eml.starts_with("Return-Path: <web@app.example>\r\n"),
        "{eml}"
    );
    // It went through the listener, not the maildrop. The log is read from
    // the daemon's stderr by another thread: wait for the line, do not race it.
    d.wait_for(20, "the log line of the SMTP client", || {
        d.log().contains("client=127.0.0.1")
    });
    assert_eq!(maildrop(dir.path()), 0);
}

#[test]
fn php_mail_while_stopped_goes_out_when_the_daemon_starts() {
    if !have("php") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let mut d = Daemon::start(dir.path());
    assert_eq!(d.term(), Some(0));
    let cfg = sendmail_config(dir.path(), None);
    // Called as `sendmail` (a symlink), as PHP's default sendmail_path does.
    let link = dir.path().join("sendmail");
    std::os::unix::fs::symlink(bin(), &link).unwrap();
    let path = format!("{} -t -i", link.display());
    let out = php_mail(
        &path,
        Some(&cfg),
        "to@example.com",
        "PHP test",
        "From: web@app.example\r\nBcc: secret-copy@example.com",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(maildrop(dir.path()), 1, "the message waits in the maildrop");
    assert!(outbox(dir.path()).is_empty());
    let d = Daemon::start(dir.path());
    d.wait_for(20, "the .eml", || outbox(dir.path()).len() == 1);
    let eml = std::fs::read_to_string(&outbox(dir.path())[0]).unwrap();
    check_php_message(&eml);
    assert!(
        eml.contains("X-Mailbridge-To: to@example.com, secret-copy@example.com\r\n"),
        "{eml}"
    );
    d.wait_for(20, "the maildrop to empty", || maildrop(dir.path()) == 0);
    assert!(d.log().contains("maildrop: imported"), "{}", d.log());
}

fn sendmail(cfg: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut c = Command::new(bin())
        .arg("--config")
        .arg(cfg)
        .arg("sendmail")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A usage error (no recipients, `-bp`) exits before reading the message:
    // the pipe may close under the write, and the exit code tells the rest.
    match c.stdin.take().unwrap().write_all(input.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    c.wait_with_output().unwrap()
}

#[test]
fn sendmail_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "protocol = \"file\"\noutbox = \"outbox\"\n[listen]\nallowed_recipient_domains = [\"example.com\"]",
    );
    // write_config appends after [upstream]: move the [listen] key into the listen table.
    let text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    let text = text
        .replace(
            "\n[listen]\nallowed_recipient_domains = [\"example.com\"]",
            "",
        )
        .replace(
            "[listen]\naddress = \"127.0.0.1:0\"",
            "[listen]\naddress = \"127.0.0.1:0\"\nallowed_recipient_domains = [\"example.com\"]",
        );
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    let d = Daemon::start(dir.path());
    let cfg = sendmail_config(dir.path(), Some(d.smtp));
    let msg = "Subject: codes\n\nbody\n";
    let code = |o: &Output| o.status.code();
    let o = sendmail(&cfg, &["-i"], msg);
    assert_eq!(code(&o), Some(64), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no recipients"));
    let o = sendmail(&cfg, &["-bp"], msg);
    assert_eq!(code(&o), Some(64), "{o:?}");
    let o = sendmail(&cfg, &["-i", "x@elsewhere.example"], msg);
    assert_eq!(code(&o), Some(67), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("550"), "{o:?}");
    let o = sendmail(
        &cfg,
        &["-i", "-v", "-f", "me@example.com", "ok@example.com"],
        msg,
    );
    assert_eq!(code(&o), Some(0), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("queued by the daemon"),
        "{o:?}"
    );
    d.wait_for(20, "the .eml", || outbox(dir.path()).len() == 1);
    // Daemon down and the maildrop not writable: temporary failure.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, "a file where the spool should be").unwrap();
    let cfg2 = sendmail_config(dir.path(), None);
    let text = std::fs::read_to_string(&cfg2).unwrap().replace(
        "path = \"spool\"",
        &format!("path = \"{}\"", blocked.display()),
    );
    std::fs::write(&cfg2, text).unwrap();
    let o = sendmail(&cfg2, &["-i", "ok@example.com"], msg);
    assert_eq!(code(&o), Some(75), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("maildrop"),
        "{o:?}"
    );
}

#[test]
fn readyz_and_health() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    let (code, out, err) = d.cli(&["health"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"ready\":true"), "{out}");
    // An unwritable spool makes it unready (root ignores modes: replace tmp/ by a file).
    let tmp = dir.path().join("spool/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, "not a directory").unwrap();
    let (code, _, err) = d.cli(&["health"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("503") && err.contains("\"spool_writable\":false"),
        "{err}"
    );
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    assert_eq!(d.cli(&["health"]).0, 0);
    drop(d);
    // Not running: 1.
    let (code, _, err) = daemon::cli(
        &dir.path().join("config.toml"),
        &["health"],
        "127.0.0.1:1".parse().unwrap(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not running"), "{err}");
}

#[test]
fn environment_only_daemon_with_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let outbox_dir = dir.path().join("outbox");
    let (s, o) = (
        spool.display().to_string(),
        outbox_dir.display().to_string(),
    );
    let hash = mailbridge::cli::auth::hash_password("app-password").unwrap();
    let d = Daemon::start_env(
        dir.path(),
        &dir.path().join("absent.toml"),
        &[
            ("MAILBRIDGE_HOSTNAME", "env.test"),
            ("MAILBRIDGE_LOG_FORMAT", "json"),
            ("MAILBRIDGE_LISTEN__ADDRESS", "127.0.0.1:0"),
            ("MAILBRIDGE_LISTEN__ALLOW_CLIENTS", "127.0.0.1/32,::1/128"),
            ("MAILBRIDGE_ADMIN__ADDRESS", "127.0.0.1:0"),
            ("MAILBRIDGE_SPOOL__PATH", &s),
            ("MAILBRIDGE_UPSTREAM__PROTOCOL", "file"),
            ("MAILBRIDGE_UPSTREAM__OUTBOX", &o),
            ("MAILBRIDGE_USERS__0__NAME", "app"),
            ("MAILBRIDGE_USERS__0__PASSWORD_HASH", &hash),
            // Users imply AUTH; the test's plain client sends without it.
            ("MAILBRIDGE_LISTEN__REQUIRE_AUTH", "false"),
        ],
    );
    // A user name with a line break and a forged log line in it: AUTH PLAIN
    // carries any bytes. It is logged (failed authentication) as one line.
    let forged = "evil\n{\"level\":\"ERROR\",\"message\":\"forged\"}";
    let reply = auth_plain(d.smtp, forged, "wrong");
    assert!(reply.starts_with("535"), "{reply}");
    let r = daemon::smtp_send(
        d.smtp,
        "app@example.com",
        &["a@example.com"],
        "Subject: env\r\nX-Evil: a\r\n\r\nbody",
    );
    assert!(r.starts_with("250"), "{r}");
    d.wait_for(20, "the .eml", || outbox(dir.path()).len() == 1);
    let eml = std::fs::read_to_string(&outbox(dir.path())[0]).unwrap();
    assert!(eml.contains("by env.test"), "{eml}");
    // Every log line is one JSON object.
    let log = d.log();
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{line}"
        );
        n += 1;
    }
    assert!(n >= 3 && log.contains("\"message\":\"queued\""), "{log}");
    // The user name is in one line's field (escaped there), never a line of its own.
    let failed: serde_json::Value = log
        .lines()
        .find(|l| l.contains("authentication failed"))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no failed-AUTH line: {log}"));
    let user = failed["user"].as_str().unwrap_or_default();
    assert!(
        user.starts_with("evil") && user.contains("forged"),
        "{failed}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("{\"level\":\"ERROR\",\"message\":\"forged")),
        "{log}"
    );
}

/// One AUTH PLAIN attempt on loopback; returns the reply to it.
fn auth_plain(addr: std::net::SocketAddr, user: &str, password: &str) -> String {
    use base64::Engine;
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let last = |r: &mut BufReader<std::net::TcpStream>| loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line.trim_end().to_string();
        }
    };
    assert!(last(&mut r).starts_with("220"));
    s.write_all(b"EHLO client.test\r\n").unwrap();
    assert!(last(&mut r).starts_with("250"));
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    s.write_all(format!("AUTH PLAIN {token}\r\n").as_bytes())
        .unwrap();
    let reply = last(&mut r);
    let _ = s.write_all(b"QUIT\r\n");
    reply
}
