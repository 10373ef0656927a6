//! The OAuth and test commands: `auth login [--device]`, `auth status`, `auth logout`, `send-test --to ADDR` and `hash-password`.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;

use crate::config::{Config, Flow};
use crate::oauth::flows::{LoginError, Settings};
use crate::oauth::{Registry, TokenSource};

/// Exit code: failure or not found.
const FAILED: u8 = 1;
/// Exit code: bad usage or configuration.
const BAD_CONFIG: u8 = 2;

/// `mailbridge auth …`.
#[derive(Debug, Subcommand)]
pub enum AuthAction {
    /// Sign in and store a refresh token: prints the URL to open (needs the
    /// running relay, whose admin endpoint receives the redirect), or with
    /// `--device` a code to enter on any device (the relay need not run).
    Login {
        /// Use the device code flow (headless servers, containers).
        #[arg(long)]
        device: bool,
        /// Mailbox to sign in for; default: the upstream's mailbox.
        #[arg(long)]
        identity: Option<String>,
        /// Sign in for `[upstream.alternate]` instead of `[upstream]`.
        #[arg(long)]
        alternate: bool,
    },
    /// Show each identity's token state (never a token).
    Status {
        /// Show `[upstream.alternate]` instead of `[upstream]` (offline view only).
        #[arg(long)]
        alternate: bool,
    },
    /// Forget an identity's refresh token.
    Logout {
        /// Mailbox to sign out; default: the upstream's mailbox.
        #[arg(long)]
        identity: Option<String>,
        /// Use `[upstream.alternate]` instead of `[upstream]`.
        #[arg(long)]
        alternate: bool,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailbridge: {msg}");
    ExitCode::from(FAILED)
}

fn bad_config(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailbridge: {msg}");
    ExitCode::from(BAD_CONFIG)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    // reqwest's builder needs a process-wide rustls provider (main installs
    // it too; this keeps the functions usable on their own).
    let _ = rustls::crypto::ring::default_provider().install_default();
    super::cli_runtime().map_err(fail)
}

/// The upstream table the command is about, if it uses OAuth.
/// The upstream table an auth command works on, and its OAuth registry.
fn registry_for(cfg: &Config, alternate: bool) -> Result<(&'static str, Arc<Registry>), ExitCode> {
    let (label, u) = if alternate {
        match cfg.upstream.alternate.as_deref() {
            Some(u) => ("upstream.alternate", u),
            None => return Err(bad_config("there is no [upstream.alternate] table")),
        }
    } else {
        ("upstream", &cfg.upstream)
    };
    if !u.uses_oauth() {
        return Err(bad_config(format!(
            "{label} does not use OAuth (set requires_auth = true and auth = \"oauth\")"
        )));
    }
    let reg = Settings::from_upstream(cfg, u)
        .and_then(Registry::new)
        .map_err(|e| bad_config(format!("{label}.{e}")))?;
    Ok((label, reg))
}

/// Run `mailbridge auth <action>`.
pub fn auth_command(cfg: &Config, action: AuthAction) -> ExitCode {
    match action {
        AuthAction::Login {
            device,
            identity,
            alternate,
        } => login(cfg, device, identity, alternate),
        AuthAction::Status { alternate } => status(cfg, alternate),
        AuthAction::Logout {
            identity,
            alternate,
        } => logout(cfg, identity, alternate),
    }
}

fn login(cfg: &Config, device: bool, identity: Option<String>, alternate: bool) -> ExitCode {
    let (label, reg) = match registry_for(cfg, alternate) {
        Ok(t) => t,
        Err(c) => return c,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let identity = identity.unwrap_or_default();
    if reg.settings().flow == Flow::ClientCredentials {
        // Nothing to sign in: check that the app gets a token.
        let m = reg.manager(&identity);
        return match rt.block_on(m.token()) {
            Ok(_) => {
                outln!(
                    "{label}: client credentials work (app-only token obtained from {}); no sign-in is needed",
                    reg.settings().endpoints.token
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("{label}: {e}")),
        };
    }
    if device {
        return rt.block_on(device_login(&reg, &identity));
    }
    browser_login(cfg, &rt, label, &identity, alternate)
}

async fn device_login(reg: &Registry, identity: &str) -> ExitCode {
    let manager = reg.manager(identity);
    let who = manager.identity();
    if who.is_empty() {
        return bad_config("no identity: set upstream.mailbox (or username), or pass --identity");
    }
    if reg.settings().provider == crate::config::Provider::Gmail {
        eprintln!(
            "mailbridge: note: Google's device flow supports only a limited set of scopes and may refuse https://mail.google.com/; \
if it does, use `mailbridge auth login` (browser) instead"
        );
    }
    let client = reg.client();
    let d = match client.device_authorization().await {
        Ok(d) => d,
        Err(e) => return fail(format!("cannot start the device sign-in: {e}")),
    };
    outln!(
        "To sign in as {who}, open {} and enter the code {}",
        d.verification_uri,
        d.user_code
    );
    if let Some(m) = &d.message {
        outln!("({m})");
    }
    outln!(
        "Waiting up to {} minutes for the sign-in to complete...",
        d.expires_in.as_secs().div_ceil(60)
    );
    let _ = std::io::stdout().flush();
    match client.poll_device(&d).await {
        Ok(grant) => {
            let has_refresh = grant.refresh_token.is_some();
            manager.complete_login(grant).await;
            if has_refresh {
                outln!(
                    "Signed in as {who}; the refresh token is stored in {}",
                    reg.store().path().display()
                );
                ExitCode::SUCCESS
            } else {
                fail(
                    "signed in, but the provider sent no refresh token (is offline_access in the scope?); \
a running relay cannot keep using this sign-in",
                )
            }
        }
        Err(LoginError::Expired) => {
            fail("the code expired before the sign-in was completed; run the command again")
        }
        Err(e) => fail(format!("sign-in failed: {e}")),
    }
}

fn browser_login(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    label: &str,
    identity: &str,
    alternate: bool,
) -> ExitCode {
    if cfg.admin.address.is_empty() {
        return bad_config(
            "the browser sign-in needs the admin endpoint (admin.address); use `mailbridge auth login --device` instead",
        );
    }
    let token = match crate::admin_token(cfg, false) {
        Ok(t) => t,
        Err(e) => {
            return fail(format!(
                "no admin token (admin.token, or spool/admin.token: {e}); start the relay first (`mailbridge run`), or use --device"
            ));
        }
    };
    let mut path = format!("http://{}/oauth/start", cfg.admin.address);
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if !identity.is_empty() {
        query.append_pair("identity", identity);
    }
    if alternate {
        query.append_pair("upstream", "alternate");
    }
    let query = query.finish();
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query);
    }
    let answer = rt.block_on(async {
        let client = super::admin_client(Duration::from_secs(30))?;
        // POST with the token in a header: it never appears in a URL.
        let resp = client
            .post(&path)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    format!(
                        "mailbridge is not running (nothing answers at {}); start it (`mailbridge run`) so it can receive the redirect, or use --device",
                        cfg.admin.address
                    )
                } else {
                    e.to_string()
                }
            })?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        match location {
            Some(l) if status.is_redirection() => Ok(l),
            _ => Err(format!(
                "the admin endpoint answered {status} instead of a redirect to the provider"
            )),
        }
    });
    match answer {
        Ok(url) => {
            outln!("Open this URL in a browser and sign in ({label}):\n\n  {url}\n");
            outln!(
                "The provider then redirects the browser to {} (the relay's admin endpoint), which stores the tokens.",
                cfg.upstream.oauth.redirect_url
            );
            outln!(
                "The link is valid for 10 minutes and works once. Check with `mailbridge auth status`."
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `auth status`: the upstream table's OAuth state, one JSON object of the
/// same shape (`provider`, `flow`, `token_endpoint`, `identities`) from the
/// running relay when it answers, else from the token store; where it came
/// from goes to stderr.
fn status(cfg: &Config, alternate: bool) -> ExitCode {
    let (_, reg) = match registry_for(cfg, alternate) {
        Ok(t) => t,
        Err(c) => return c,
    };
    let table = if alternate {
        "upstream.alternate"
    } else {
        "upstream"
    };
    // The running relay knows more (expiry, backoff); fall back to the store.
    let (doc, source) = match live_status(cfg, table) {
        Some(doc) => (doc, "from the running relay".to_string()),
        None => (
            reg.status(),
            format!(
                "from the token store {}; the relay is not running",
                reg.store().path().display()
            ),
        ),
    };
    outln!(
        "{}",
        serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string())
    );
    eprintln!("mailbridge: ({source})");
    ExitCode::SUCCESS
}

/// The running relay's OAuth state of upstream table `table`, in the shape
/// of [`crate::oauth::Registry::status`].
fn live_status(cfg: &Config, table: &str) -> Option<serde_json::Value> {
    if cfg.admin.address.is_empty() {
        return None;
    }
    let token = crate::admin_token(cfg, false).ok()?;
    let rt = runtime().ok()?;
    let url = format!("http://{}/status", cfg.admin.address);
    rt.block_on(async {
        let client = super::admin_client(Duration::from_secs(10)).ok()?;
        let resp = client
            .get(&url)
            .bearer_auth(token.expose())
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = resp.error_for_status().ok()?.json().await.ok()?;
        let mut one = v
            .get("oauth")?
            .as_array()?
            .iter()
            .find(|o| o["upstream"] == table)?
            .clone();
        one.as_object_mut()?.remove("upstream");
        Some(one)
    })
}

fn logout(cfg: &Config, identity: Option<String>, alternate: bool) -> ExitCode {
    let (_, reg) = match registry_for(cfg, alternate) {
        Ok(t) => t,
        Err(c) => return c,
    };
    let who = reg.manager(identity.as_deref().unwrap_or("")).identity();
    match reg.store().remove(&who) {
        Ok(true) => {
            outln!(
                "{who}: refresh token removed from {}; a running relay stops refreshing it (its current access token lapses within the hour)",
                reg.store().path().display()
            );
            ExitCode::SUCCESS
        }
        Ok(false) => fail(format!("{who} is not signed in")),
        Err(e) => fail(format!("token store: {e}")),
    }
}

/// Run `mailbridge send-test --to ADDR` against the running relay.
pub fn send_test_command(cfg: &Config, to: &str) -> ExitCode {
    if cfg.admin.address.is_empty() {
        return bad_config("send-test needs the admin endpoint (admin.address)");
    }
    let token = match crate::admin_token(cfg, false) {
        Ok(t) => t,
        Err(e) => {
            return fail(format!(
                "no admin token (admin.token, or spool/admin.token: {e}); is mailbridge running?"
            ));
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let url = format!("http://{}/send-test", cfg.admin.address);
    let wait = Duration::from_secs(cfg.upstream.timeout_secs.max(1) * 2 + 30);
    let answer = rt.block_on(async {
        let client = super::admin_client(wait)?;
        let resp = client
            .post(&url)
            .bearer_auth(token.expose())
            .json(&serde_json::json!({ "to": to }))
            .send()
            .await
            .map_err(|e| super::admin_error(cfg, &e))?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, body))
    });
    match answer {
        Ok((_, body)) => {
            outln!(
                "{}",
                serde_json::to_string_pretty(&body).unwrap_or_else(|_| body.to_string())
            );
            if body.get("result").and_then(|r| r.as_str()) == Some("delivered") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(FAILED)
            }
        }
        Err(e) => fail(e),
    }
}

/// Run `mailbridge hash-password`: read a password (one line on stdin) and
/// print its argon2id PHC string for `[[users]] password_hash`.
pub fn hash_password_command() -> ExitCode {
    let stdin = std::io::stdin();
    let password = if stdin.is_terminal() {
        let first = match read_hidden("Password: ") {
            Ok(p) => p,
            Err(e) => return fail(format!("cannot read the password: {e}")),
        };
        match read_hidden("Again: ") {
            Ok(again) if again == first => first,
            Ok(_) => return fail("the two passwords differ"),
            Err(e) => return fail(format!("cannot read the password: {e}")),
        }
    } else {
        // A pipe or file: one line, nothing to hide.
        let mut line = String::new();
        if let Err(e) = stdin.lock().read_line(&mut line) {
            return fail(format!("cannot read the password: {e}"));
        }
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    match hash_password(&password) {
        Ok(phc) => {
            outln!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Read one line from the terminal on stdin without echoing it (the
/// terminal's echo is restored afterwards, also on error).
fn read_hidden(prompt: &str) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    struct Restore(i32, libc::termios);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: `self.1` came from tcgetattr on the same descriptor.
            unsafe {
                libc::tcsetattr(self.0, libc::TCSANOW, &self.1);
            }
        }
    }
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut term) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let restore = Restore(fd, term);
    let mut quiet = term;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: a valid termios for this descriptor.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    drop(restore);
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// The argon2id PHC string of `password` (default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| format!("salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHash, PasswordVerifier};

    #[test]
    fn hash_password_is_argon2id_and_verifies() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(
            argon2::Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            argon2::Argon2::default()
                .verify_password(b"wrong", &parsed)
                .is_err()
        );
        assert!(hash_password("").is_err());
    }
}
