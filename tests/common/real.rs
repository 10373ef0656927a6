//! Real peers for interop tests: tool detection (skip, or fail under `MAILBRIDGE_REQUIRE_TOOLS`), free loopback ports, OpenSSL-made certificates, and a private Dovecot submission server (`passdb oauth2` by introspection) killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Shared with tests/daemon (a test may load both).
#[allow(clippy::duplicate_mod)]
#[path = "../daemon/require.rs"]
mod require;
pub use require::tools_required;

/// Whether `program` (a path or a name on PATH) can be started; if not,
/// fail under `MAILBRIDGE_REQUIRE_TOOLS`, else print why the test skips.
pub fn have(program: &str, version_arg: &str) -> bool {
    let found = Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            !tools_required(),
            "{program} is not installed and MAILBRIDGE_REQUIRE_TOOLS is set"
        );
        eprintln!("skipping: {program} is not installed");
    }
    found
}

/// A loopback port that was free a moment ago (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Run a command to completion; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// `openssl req -x509`: a self-signed certificate (CA:TRUE, as OpenSSL makes
/// it) for `localhost` and `127.0.0.1`; `(cert, key)` in `dir` named `name`.
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-subj")
        .arg(format!("/CN={name}"))
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    (cert, key)
}

/// A CA made with `openssl req -x509` and a server certificate for
/// `localhost`/`127.0.0.1` it signed: `(ca_cert, server_cert, server_key)`.
pub fn ca_and_server(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = self_signed(dir, &format!("{name}-ca"));
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let cert = dir.join(format!("{name}.crt"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    (ca, cert, key)
}

/// `sha256:<hex>` of a PEM certificate's DER, as `openssl x509 -fingerprint -sha256` shows it.
pub fn fingerprint(cert: &Path) -> String {
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert));
    let hex = out
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_ascii_lowercase();
    format!("sha256:{hex}")
}

/// Wait (bounded) until something listens on `addr`.
pub fn wait_listening(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 20 s; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The users Dovecot's processes run as: `nobody`/`nogroup` as root, else ourselves.
fn dovecot_users() -> (String, String) {
    let id = |arg: &str| run(Command::new("id").arg(arg)).trim().to_string();
    if id("-u") == "0" {
        ("nobody".into(), id_group_of("nobody"))
    } else {
        (id("-un"), id("-gn"))
    }
}

fn id_group_of(user: &str) -> String {
    run(Command::new("id").args(["-gn", user]))
        .trim()
        .to_string()
}

/// A private Dovecot 2.3 submission server: its own config, base_dir and
/// log in a temporary directory, STARTTLS on one loopback port and implicit
/// TLS on another, `passdb oauth2` validating tokens by RFC 7662
/// introspection, relaying what it accepts to `relay`. Stopped on drop.
pub struct Dovecot {
    child: Option<Child>,
    /// STARTTLS submission port (587-style).
    pub submission: SocketAddr,
    /// Implicit TLS submissions port (465-style).
    pub submissions: SocketAddr,
    /// The CA that signed the server certificate (PEM file).
    pub ca: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The Dovecot binary.
pub const DOVECOT: &str = "/usr/sbin/dovecot";

impl Dovecot {
    /// Start Dovecot offering `mechanisms` (e.g. `"xoauth2 oauthbearer"`).
    pub fn start(mechanisms: &str, introspection_url: &str, relay: SocketAddr) -> Dovecot {
        let dir = tempfile::Builder::new()
            .prefix("mb-dovecot")
            .tempdir()
            .unwrap();
        let root = dir.path();
        // Dovecot's unprivileged processes must reach their files.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ca, cert, key) = ca_and_server(root, "dovecot");
        let (user, group) = dovecot_users();
        let home = root.join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
        let submission = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let submissions = SocketAddr::from(([127, 0, 0, 1], free_port()));
        std::fs::create_dir(root.join("state")).unwrap();
        let log = root.join("dovecot.log");
        let oauth2 = root.join("oauth2.conf");
        std::fs::write(
            &oauth2,
            format!(
                "introspection_mode = post\nintrospection_url = {introspection_url}\n\
                 username_attribute = email\nactive_attribute = active\nactive_value = true\n"
            ),
        )
        .unwrap();
        let r = root.display();
        let conf = format!(
            r#"base_dir = {r}/run
state_dir = {r}/state
instance_name = mb-dovecot-{port}
protocols = submission
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
log_path = {log}
auth_verbose = yes
hostname = dovecot.test
mail_location = maildir:{r}/home/Maildir
submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}
submission_relay_trusted = yes
passdb {{
  driver = oauth2
  mechanisms = {mechanisms}
  args = {oauth2}
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={r}/home
}}
service submission-login {{
  inet_listener submission {{
    port = {port}
  }}
  inet_listener submissions {{
    port = {sport}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
  # Nobody may reach the penalty socket: Dovecot then skips its growing
  # delay per failed login from an address (every test client is 127.0.0.1).
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  chroot =
}}
"#,
            port = submission.port(),
            sport = submissions.port(),
            relay_port = relay.port(),
            cert = cert.display(),
            key = key.display(),
            log = log.display(),
            oauth2 = oauth2.display(),
        );
        let conf_path = root.join("dovecot.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(DOVECOT)
            .arg("-F")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start dovecot");
        let d = Dovecot {
            child: Some(child),
            submission,
            submissions,
            ca,
            log,
            _dir: dir,
        };
        wait_listening(submission, "dovecot", &d.log);
        wait_listening(submissions, "dovecot", &d.log);
        d
    }

    /// Dovecot's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM lets the master stop its children; SIGKILL if it lingers.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// stunnel (OpenSSL) terminating implicit TLS with `cert`/`key` on a
/// loopback port and passing the cleartext to `backend`. Stopped on drop.
pub struct Stunnel {
    child: Option<Child>,
    /// Where clients connect (TLS from the first byte).
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The stunnel binary.
pub const STUNNEL: &str = "stunnel4";

impl Stunnel {
    /// Start stunnel in front of `backend`.
    pub fn start(cert: &Path, key: &Path, backend: SocketAddr) -> Stunnel {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.path().join("stunnel.log");
        let conf = dir.path().join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\noutput = {log}\ndebug = 5\n[smtps]\naccept = {addr}\nconnect = {backend}\ncert = {cert}\nkey = {key}\n",
                log = log.display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        let child = Command::new(STUNNEL)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stunnel");
        let s = Stunnel {
            child: Some(child),
            addr,
            log,
            _dir: dir,
        };
        wait_listening(addr, "stunnel", &s.log);
        s
    }

    /// stunnel's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
