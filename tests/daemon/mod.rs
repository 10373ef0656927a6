//! Runs the real `mailbridge` binary for end-to-end tests: writes a config in a temp dir, starts `mailbridge run` on port 0, learns the bound addresses from its log, and kills it when dropped.
#![allow(dead_code)]

pub mod reaper;
pub mod require;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A running mailbridge process.
pub struct Daemon {
    child: Option<Child>,
    /// Its SMTP address.
    pub smtp: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
    /// The directory holding config.toml, spool/ and outbox/.
    pub dir: PathBuf,
    log: Arc<Mutex<String>>,
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailbridge")
}

/// Write `dir/config.toml`: loopback port 0 listeners, spool and outbox in
/// `dir`, short retries, plus `extra` TOML (which may add keys to
/// `[upstream]` by starting with them: it is appended after the
/// `[upstream]` header).
pub fn write_config(dir: &Path, upstream: &str) -> PathBuf {
    let cfg = format!(
        "hostname = \"mailbridge.test\"\nlog_level = \"info\"\n\
         [listen]\naddress = \"127.0.0.1:0\"\n\
         [spool]\npath = \"spool\"\n\
         [delivery]\nretry_initial_secs = 1\nretry_max_secs = 2\n\
         [admin]\naddress = \"127.0.0.1:0\"\n\
         [upstream]\n{upstream}\n"
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).expect("write config");
    path
}

fn find_addr(line: &str, what: &str) -> Option<SocketAddr> {
    if !line.contains(what) {
        return None;
    }
    // Text (`address=…`) or JSON (`"address":"…"`) log lines.
    if let Some(i) = line.find("\"address\":\"") {
        return line[i + 11..].split('"').next()?.parse().ok();
    }
    let i = line.find("address=")?;
    line[i + 8..].split_whitespace().next()?.parse().ok()
}

impl Daemon {
    /// Start `mailbridge run` with `dir/config.toml` and wait (at most 30 s)
    /// until both listeners are up.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_wrapped(dir, &[])
    }

    /// Like `start`, with the binary run under `wrapper` (e.g. `fiu-run -x`).
    pub fn start_wrapped(dir: &Path, wrapper: &[&str]) -> Daemon {
        Daemon::spawn(dir, wrapper, &dir.join("config.toml"), &[])
    }

    /// Like `start_wrapped`, with extra environment variables.
    pub fn start_with(dir: &Path, wrapper: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(dir, wrapper, &dir.join("config.toml"), env)
    }

    /// Start `mailbridge run` with `--config config` (which need not exist)
    /// and the environment variables `vars` added.
    pub fn start_env(dir: &Path, config: &Path, vars: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(dir, &[], config, vars)
    }

    fn spawn(dir: &Path, wrapper: &[&str], config: &Path, vars: &[(&str, &str)]) -> Daemon {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = reaper::spawn(cmd).expect("start mailbridge");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = find_addr(&line, "listening for SMTP") {
                    let _ = tx.send(("smtp", a));
                }
                if let Some(a) = find_addr(&line, "admin endpoint") {
                    let _ = tx.send(("admin", a));
                }
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
            }
        });
        let (mut smtp, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while smtp.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("smtp", a)) => smtp = Some(a),
                Ok((_, a)) => admin = Some(a),
                Err(_) => {
                    reaper::kill_group(&mut child);
                    panic!("mailbridge did not start; log:\n{}", log.lock().unwrap());
                }
            }
        }
        Daemon {
            child: Some(child),
            smtp: smtp.unwrap(),
            admin: admin.unwrap(),
            dir: dir.to_path_buf(),
            log,
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            reaper::kill_group(&mut c);
        }
    }

    /// SIGTERM, then wait (at most 60 s) for a clean exit; returns its exit code.
    pub fn term(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                reaper::kill_group(&mut c);
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Send a signal by name (e.g. "HUP").
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Run the CLI against this daemon's config; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli(&self.dir.join("config.toml"), args, self.admin)
    }

    /// Wait (at most `secs`) until `check` is true, polling every 20 ms.
    pub fn wait_for(&self, secs: u64, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check() {
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Entries in the spool queue directory (`<id>.msg`, with or without
    /// a `<id>.json` beside it).
    pub fn queued(&self) -> usize {
        queue_entries(&self.dir.join("spool/queue"))
    }
}

/// Entries in a spool's `queue/` directory: one per id that has a `.msg`
/// or a `.json` (an entry is `<id>.msg`, maybe with `<id>.json` beside it;
/// one in the earlier layout `<id>.eml` + `<id>.json`).
pub fn queue_entries(queue: &Path) -> usize {
    let mut ids: Vec<String> = std::fs::read_dir(queue)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| {
                    let (stem, ext) = n.rsplit_once('.')?;
                    matches!(ext, "msg" | "json").then(|| stem.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids.dedup();
    ids.len()
}

/// Run the CLI with `config` (its admin address replaced by `admin`).
pub fn cli(config: &Path, args: &[&str], admin: SocketAddr) -> (i32, String, String) {
    // The config says port 0; point the CLI at the real port through a copy.
    let text = std::fs::read_to_string(config).expect("config");
    let copy = config.with_file_name("cli-config.toml");
    std::fs::write(
        &copy,
        text.replace(
            "[admin]\naddress = \"127.0.0.1:0\"",
            &format!("[admin]\naddress = \"{admin}\""),
        ),
    )
    .expect("write");
    let out = Command::new(bin())
        .arg("--config")
        .arg(&copy)
        .args(args)
        .output()
        .expect("run cli");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// True when `tool` is on PATH. When it is not and MAILBRIDGE_REQUIRE_TOOLS is
/// set (CI), fail: a missing client must not silently skip a test.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            !require::tools_required(),
            "{tool} is required (MAILBRIDGE_REQUIRE_TOOLS is set)"
        );
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// Send one message over SMTP with a blocking socket; returns the final
/// reply line after DATA (or the first failing reply).
pub fn smtp_send(addr: SocketAddr, from: &str, rcpts: &[&str], body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = Vec::new();
    let mut reply = |s: &mut std::net::TcpStream| -> String {
        // Read until a complete final reply line ("ddd " + CRLF).
        loop {
            if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = buf.drain(..pos + 2).collect();
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return line;
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return String::from("(closed)"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let greet = reply(&mut s);
    assert!(greet.starts_with("220"), "{greet}");
    let cmd = |s: &mut std::net::TcpStream, c: &str| {
        s.write_all(format!("{c}\r\n").as_bytes()).expect("write");
    };
    cmd(&mut s, "EHLO client.test");
    let r = reply(&mut s);
    assert!(r.starts_with("250"), "{r}");
    cmd(&mut s, &format!("MAIL FROM:<{from}>"));
    let r = reply(&mut s);
    if !r.starts_with("250") {
        return r;
    }
    for rcpt in rcpts {
        cmd(&mut s, &format!("RCPT TO:<{rcpt}>"));
        let r = reply(&mut s);
        if !r.starts_with("250") {
            return r;
        }
    }
    cmd(&mut s, "DATA");
    let r = reply(&mut s);
    if !r.starts_with("354") {
        return r;
    }
    s.write_all(body.as_bytes()).expect("write body");
    s.write_all(b"\r\n.\r\n").expect("write end");
    let r = reply(&mut s);
    cmd(&mut s, "QUIT");
    r
}

/// For async tests: write `dir/config.toml` with `upstream` in a new temp
/// dir and start the daemon there, off the runtime's worker threads.
pub async fn start_in_tempdir(upstream: String) -> (tempfile::TempDir, Arc<Daemon>) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), &upstream);
    let path = dir.path().to_path_buf();
    let d = tokio::task::spawn_blocking(move || Daemon::start(&path))
        .await
        .expect("start task");
    (dir, Arc::new(d))
}

/// For async tests: send `body` through the daemon; returns the final reply.
pub async fn send_async(
    d: &Daemon,
    from: &'static str,
    rcpts: &'static [&'static str],
    body: &'static str,
) -> String {
    let addr = d.smtp;
    tokio::task::spawn_blocking(move || smtp_send(addr, from, rcpts, body))
        .await
        .expect("send task")
}

/// For async tests: wait (at most 30 s) until `check` is true, polling every 20 ms.
pub async fn wait_async(d: &Daemon, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
