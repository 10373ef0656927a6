//! Rules beyond the schema that `check` and `run` share: defaults implied by other keys, bounds on durations, the log filter, CA files, exposure (never an open relay, no remote admin over plain HTTP), the OAuth redirect, and the spool write probe.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::{AuthKind, Config, Flow, Listen, Protocol, Upstream};

type Bad = (String, String);

fn bad(k: &str, m: impl Into<String>) -> Bad {
    (k.to_string(), m.into())
}

/// Whether the raw TOML sets `path` (e.g. `["listen", "require_auth"]`).
fn explicit(raw: &toml::Table, path: &[&str]) -> bool {
    let mut t = raw;
    for (i, k) in path.iter().enumerate() {
        match t.get(*k) {
            Some(v) if i + 1 == path.len() => {
                let _ = v;
                return true;
            }
            Some(toml::Value::Table(next)) => t = next,
            _ => return false,
        }
    }
    false
}

/// Defaults that depend on other keys, applied before validation:
/// `listen.require_auth` is true when `[[users]]` exist and the file does
/// not set it; `protocol = "smtps"` without `port` means port 465.
pub(super) fn apply_implied(cfg: &mut Config, raw: &toml::Table) {
    if !cfg.users.is_empty() && !explicit(raw, &["listen", "require_auth"]) {
        cfg.listen.require_auth = true;
    }
    if cfg.upstream.protocol == Protocol::Smtps && !explicit(raw, &["upstream", "port"]) {
        cfg.upstream.port = 465;
    }
    if let Some(alt) = cfg.upstream.alternate.as_deref_mut()
        && alt.protocol == Protocol::Smtps
        && !explicit(raw, &["upstream", "alternate", "port"])
    {
        alt.port = 465;
    }
}

/// Longest accepted value of each duration key, in seconds (beyond these a
/// value is a typo, and large enough ones would overflow time arithmetic).
const BOUNDS: &[(&str, u64, u64)] = &[
    ("listen.idle_timeout_secs", 1, 86_400),
    ("listen.data_timeout_secs", 1, 86_400),
    ("delivery.retry_initial_secs", 1, 86_400),
    ("delivery.retry_max_secs", 1, 7 * 86_400),
    ("delivery.give_up_after_secs", 60, 30 * 86_400),
    ("upstream.timeout_secs", 1, 3_600),
    ("upstream.failback_probe_secs", 0, 86_400),
    ("upstream.alternate.timeout_secs", 1, 3_600),
    ("upstream.alternate.failback_probe_secs", 0, 86_400),
];

fn duration_values(cfg: &Config) -> Vec<(&'static str, u64)> {
    let mut v = vec![
        ("listen.idle_timeout_secs", cfg.listen.idle_timeout_secs),
        ("listen.data_timeout_secs", cfg.listen.data_timeout_secs),
        (
            "delivery.retry_initial_secs",
            cfg.delivery.retry_initial_secs,
        ),
        ("delivery.retry_max_secs", cfg.delivery.retry_max_secs),
        (
            "delivery.give_up_after_secs",
            cfg.delivery.give_up_after_secs,
        ),
        ("upstream.timeout_secs", cfg.upstream.timeout_secs),
        (
            "upstream.failback_probe_secs",
            cfg.upstream.failback_probe_secs,
        ),
    ];
    if let Some(a) = cfg.upstream.alternate.as_deref() {
        v.push(("upstream.alternate.timeout_secs", a.timeout_secs));
        v.push((
            "upstream.alternate.failback_probe_secs",
            a.failback_probe_secs,
        ));
    }
    v
}

/// `log_level` must be a level or a list of `target=level` directives that
/// tracing accepts. A bare word such as `verbose` is valid tracing syntax (a
/// target name) that filters out every line mailbridge writes, so it is refused.
pub fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if level.trim().is_empty() {
        return Err("is empty (use error, warn, info, debug or trace)".into());
    }
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let is_level = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d));
        if !is_level && !d.contains('=') {
            return Err(format!(
                "`{d}` is neither a level (error, warn, info, debug, trace, off) nor a `target=level` directive"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map(|_| ())
        .map_err(|e| format!("`{level}` is not a tracing filter: {e}"))
}

/// Certificates in a PEM file; an error when it cannot be read, holds none,
/// or holds one that cannot serve as a trust anchor.
pub fn count_pem_certificates(path: &Path) -> Result<usize, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let data = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut n = 0;
    // The same test the TLS client makes at start: each one must be usable as a root.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&data) {
        let c = c.map_err(|e| format!("`{}` is not valid PEM: {e}", path.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("`{}`: unusable certificate: {e}", path.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!(
            "`{}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(n)
}

/// Never an open relay: a listener on a non-loopback address needs required
/// AUTH (with users) or an allow-list that is not "everyone". Used by
/// validation (the configured addresses) and at start (the bound ones).
pub fn check_exposure(local: SocketAddr, listen: &Listen, users: bool) -> Result<(), String> {
    if local.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    if listen.require_auth && users {
        return Ok(());
    }
    let everyone = listen.allow_clients.iter().any(|n| n.prefix_len() == 0);
    if !everyone {
        return Ok(());
    }
    Err(format!(
        "listen.allow_clients: {local} is not a loopback address and the allow-list admits every client \
         without listen.require_auth; mailbridge will not run as an open relay: list the client networks, \
         or set listen.require_auth = true with [[users]]"
    ))
}

/// Whether `host` (a `Host` header's or URL's host, without port) names
/// loopback: `localhost`, `*.localhost`, `127.0.0.0/8`, `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    if h == "localhost" || h.ends_with(".localhost") {
        return true;
    }
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Rules that need the whole configuration; called at the end of validation.
pub(super) fn validate(cfg: &Config) -> Result<(), Bad> {
    for (key, value) in duration_values(cfg) {
        if let Some((_, min, max)) = BOUNDS.iter().find(|(k, _, _)| *k == key)
            && (value < *min || value > *max)
        {
            return Err(bad(
                key,
                format!("{value} is out of range ({min} to {max} seconds)"),
            ));
        }
    }
    check_log_level(&cfg.log_level).map_err(|m| bad("log_level", m))?;
    let users = !cfg.users.is_empty();
    for (key, addr) in [
        ("listen.address", cfg.sockets.listen),
        ("listen.implicit_tls_address", cfg.sockets.implicit_tls),
    ] {
        if let Some(a) = addr {
            check_exposure(a, &cfg.listen, users).map_err(|m| {
                let m = m
                    .strip_prefix("listen.allow_clients: ")
                    .unwrap_or(&m)
                    .to_string();
                bad(key, m)
            })?;
        }
    }
    if cfg.listen.bind_sender && !users {
        return Err(bad(
            "listen.bind_sender",
            "needs at least one [[users]] entry",
        ));
    }
    if cfg.listen.bind_sender {
        for (i, u) in cfg.users.iter().enumerate() {
            if cfg.own_mailbox(u).is_none() {
                return Err(bad(
                    &format!("users[{i}].mailbox"),
                    "listen.bind_sender needs the user's own address: set mailbox (or a name that is an address, or upstream.mailbox)",
                ));
            }
        }
    }
    let mut ups = vec![("upstream", &cfg.upstream)];
    if let Some(a) = cfg.upstream.alternate.as_deref() {
        ups.push(("upstream.alternate", a));
    }
    for (prefix, u) in ups {
        check_upstream(cfg, prefix, u)?;
    }
    check_admin(cfg)?;
    Ok(())
}

fn check_upstream(cfg: &Config, prefix: &str, u: &Upstream) -> Result<(), Bad> {
    let key = |k: &str| format!("{prefix}.{k}");
    if u.auth == AuthKind::Oauth && !u.requires_auth && u.protocol != Protocol::File {
        return Err(bad(
            &key("requires_auth"),
            "auth = \"oauth\" needs requires_auth = true (without it no token is ever sent)",
        ));
    }
    if !u.tls_ca_file.is_empty() {
        count_pem_certificates(&cfg.base_dir.join(&u.tls_ca_file))
            .map_err(|m| bad(&key("tls_ca_file"), m))?;
    }
    if u.uses_oauth() && u.oauth.flow == Flow::AuthorizationCode {
        check_redirect(cfg, &key("oauth.redirect_url"), &u.oauth.redirect_url)?;
    }
    Ok(())
}

/// A loopback `redirect_url` must reach this mailbridge's admin endpoint:
/// same port as `admin.address`, path `/oauth/callback`. (A non-loopback one
/// may go through a reverse proxy; it cannot be checked here.)
fn check_redirect(cfg: &Config, key: &str, redirect: &str) -> Result<(), Bad> {
    let Ok(url) = url::Url::parse(redirect) else {
        return Err(bad(key, format!("`{redirect}` is not a URL")));
    };
    let Some(host) = url.host_str() else {
        return Err(bad(key, format!("`{redirect}` has no host")));
    };
    if !is_loopback_host(host) {
        return Ok(());
    }
    if url.path() != "/oauth/callback" {
        return Err(bad(
            key,
            format!("`{redirect}` must end in /oauth/callback (the admin endpoint's callback)"),
        ));
    }
    let Some(admin) = cfg.sockets.admin else {
        // No admin endpoint: the browser sign-in is off (`auth login --device` still works).
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(0);
    if admin.port() != 0 && port != admin.port() {
        return Err(bad(
            key,
            format!(
                "`{redirect}` points at port {port}, but admin.address is {}: the provider's redirect would not reach mailbridge (set it to http://localhost:{}/oauth/callback and register that URL with the provider)",
                cfg.admin.address,
                admin.port()
            ),
        ));
    }
    Ok(())
}

fn check_admin(cfg: &Config) -> Result<(), Bad> {
    let a = &cfg.admin;
    for (i, h) in a.hostnames.iter().enumerate() {
        if h.is_empty() || h.contains(|c: char| c.is_whitespace() || "/:@".contains(c)) {
            return Err(bad(
                &format!("admin.hostnames[{i}]"),
                format!("`{h}` is not a host name"),
            ));
        }
    }
    if let Some(addr) = cfg.sockets.admin
        && !addr.ip().to_canonical().is_loopback()
        && !a.allow_remote
    {
        return Err(bad(
            "admin.address",
            format!(
                "{addr} is not a loopback address, and the admin endpoint speaks plain HTTP (the admin token and status would cross the network unencrypted); keep it on 127.0.0.1, put a TLS proxy in front, or set admin.allow_remote = true to accept this"
            ),
        ));
    }
    Ok(())
}

/// `spool.path`, or the nearest directory above it that exists (where
/// `run` would create it), must let mailbridge create files: a probe file is
/// created and removed again. Run by `check` and `run`, not by every load
/// (read-only commands such as `queue list` work without write access).
pub fn probe_spool(cfg: &Config) -> Result<(), String> {
    let path = cfg.path(&cfg.spool.path);
    let mut dir = path.as_path();
    loop {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(format!(
                    "spool.path: `{}` is not a directory",
                    dir.display()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => dir = p,
                _ => {
                    dir = Path::new(".");
                    break;
                }
            },
            Err(e) => {
                return Err(format!("spool.path: cannot use `{}`: {e}", dir.display()));
            }
        }
    }
    let probe = dir.join(format!(".mailbridge-probe-{:016x}", rand::random::<u64>()));
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe);
    match created {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!(
            "spool.path: cannot create files in `{}` ({e}); mailbridge must be able to write its spool `{}`",
            dir.display(),
            path.display()
        )),
    }
}

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
