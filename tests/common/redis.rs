//! A private `redis-server` (Debian's) for the shared-throttle tests: a loopback port, a password, no persistence, its log in a temporary directory; it can be stopped and started again on the same port, and is killed on drop.

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::real::{free_port, have, wait_listening};

/// The password every test Redis asks for.
pub const PASSWORD: &str = "redis-test-pw-7";

/// How the server process is started (the daemon harness's reaper, so it
/// dies with the test binary whatever happens).
pub type Spawn = fn(Command) -> io::Result<Child>;

/// A running (or stopped) private Redis.
pub struct Redis {
    child: Option<Child>,
    /// Its loopback port (kept across restarts).
    pub port: u16,
    dir: tempfile::TempDir,
    spawn: Spawn,
}

/// Whether `redis-server` is installed (else the test skips, or fails
/// under `MAILBRIDGE_REQUIRE_TOOLS`).
pub fn available() -> bool {
    have("redis-server", "--version")
}

impl Redis {
    /// Start one on a free loopback port and wait until it listens.
    pub fn start(spawn: Spawn) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir,
            spawn,
        };
        r.restart();
        r
    }

    /// Its log file.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Start (again) on the same port, empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is running");
        let log = std::fs::File::create(self.log()).expect("log");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        self.child = Some((self.spawn)(cmd).expect("redis-server"));
        wait_listening(
            ([127, 0, 0, 1], self.port).into(),
            "redis-server",
            &self.log(),
        );
    }

    /// Kill it (SIGKILL: gone at once, as when its host fails).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis://127.0.0.1:<port>/0` (the password goes separately).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
