//! Validation: every value checked with the key it came from named in the error, secrets resolved, and the strings parsed into the resolved types (servers, sockets, OAuth settings) later layers use.

use std::net::SocketAddr;
use std::path::Path;

use super::checks::{self, is_loopback_host};
use super::resolved::{Resolved, Sockets, is_exchange_online_url};
use super::schema::{AuthKind, Config, LargeMessages, Protocol, Upstream};
use super::secret;

impl Config {
    pub(super) fn validate(&mut self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| (k.to_string(), m);
        self.sockets = Sockets::default();
        self.sockets.listen = Some(self.listen.address.parse::<SocketAddr>().map_err(|_| {
            bad(
                "listen.address",
                format!("`{}` is not an `ip:port` address", self.listen.address),
            )
        })?);
        let l = &self.listen;
        if l.max_recipients < 1 {
            return Err(bad("listen.max_recipients", "must be at least 1".into()));
        }
        if l.max_command_length < 512 {
            return Err(bad(
                "listen.max_command_length",
                "must be at least 512 (RFC 5321 §4.5.3.1.4)".into(),
            ));
        }
        if l.max_connections < 1 {
            return Err(bad("listen.max_connections", "must be at least 1".into()));
        }
        if l.max_message_size < 1024 {
            return Err(bad(
                "listen.max_message_size",
                "must be at least 1024 bytes".into(),
            ));
        }
        if l.max_connections_per_ip < 1 {
            return Err(bad(
                "listen.max_connections_per_ip",
                "must be at least 1".into(),
            ));
        }
        if l.tls_cert.is_empty() != l.tls_key.is_empty() {
            return Err(bad(
                "listen.tls_key",
                "tls_cert and tls_key go together".into(),
            ));
        }
        for (k, v) in [
            ("listen.tls_cert", &l.tls_cert),
            ("listen.tls_key", &l.tls_key),
        ] {
            if !v.is_empty() && !self.base_dir.join(v).is_file() {
                return Err(bad(
                    k,
                    format!("`{v}` is not a readable file (see certs/README.md)"),
                ));
            }
        }
        if !l.implicit_tls_address.is_empty() {
            self.sockets.implicit_tls =
                Some(l.implicit_tls_address.parse::<SocketAddr>().map_err(|_| {
                    bad(
                        "listen.implicit_tls_address",
                        format!("`{}` is not an `ip:port` address", l.implicit_tls_address),
                    )
                })?);
            if l.tls_cert.is_empty() {
                return Err(bad(
                    "listen.implicit_tls_address",
                    "needs listen.tls_cert and listen.tls_key".into(),
                ));
            }
        }
        if l.require_auth && self.users.is_empty() {
            return Err(bad(
                "listen.require_auth",
                "needs at least one [[users]] entry".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() || !seen.insert(u.name.clone()) {
                return Err(bad(
                    &format!("users[{i}].name"),
                    "must be non-empty and unique".into(),
                ));
            }
            if !u.password_hash.starts_with("$argon2") {
                return Err(bad(
                    &format!("users[{i}].password_hash"),
                    "must be an argon2 hash (`mailbridge hash-password`)".into(),
                ));
            }
            if !u.mailbox.is_empty() && !crate::address::is_valid_mailbox(&u.mailbox) {
                return Err(bad(
                    &format!("users[{i}].mailbox"),
                    format!("`{}` is not an email address", u.mailbox),
                ));
            }
        }
        if self.spool.path.as_os_str().is_empty() {
            return Err(bad("spool.path", "is empty".into()));
        }
        if self.spool.max_messages < 1 {
            return Err(bad("spool.max_messages", "must be at least 1".into()));
        }
        let d = &self.delivery;
        if d.concurrency < 1 {
            return Err(bad("delivery.concurrency", "must be at least 1".into()));
        }
        if d.retry_initial_secs < 1 || d.retry_max_secs < d.retry_initial_secs {
            return Err(bad(
                "delivery.retry_max_secs",
                "must be at least retry_initial_secs, which must be at least 1".into(),
            ));
        }
        let base = self.base_dir.clone();
        let spool = self.path(&self.spool.path);
        validate_upstream(&mut self.upstream, "upstream", &base, &spool)?;
        if self.upstream.protocol == Protocol::Graph
            && self.upstream.large_messages == LargeMessages::Alternate
            && self.upstream.alternate.is_none()
        {
            return Err(bad(
                "upstream.large_messages",
                "\"alternate\" needs an [upstream.alternate]".into(),
            ));
        }
        if let Some(alt) = self.upstream.alternate.as_deref_mut() {
            if alt.alternate.is_some() {
                return Err(bad(
                    "upstream.alternate.alternate",
                    "an alternate cannot have its own alternate".into(),
                ));
            }
            validate_upstream(alt, "upstream.alternate", &base, &spool)?;
        }
        if !self.admin.address.is_empty() {
            self.sockets.admin = Some(self.admin.address.parse::<SocketAddr>().map_err(|_| {
                bad(
                    "admin.address",
                    format!(
                        "`{}` is not an `ip:port` address (or empty to disable)",
                        self.admin.address
                    ),
                )
            })?);
        }
        let a = &mut self.admin;
        a.token = secret::resolve(
            "admin.token",
            a.token.expose(),
            &a.token_env,
            &a.token_file,
            &self.base_dir,
        )
        .map_err(|m| bad("admin.token", m))?;
        super::throttle::validate(&mut self.throttle, &self.base_dir)?;
        checks::validate(self)
    }
}

/// An `https://` URL, or `http://` to a loopback host (nothing else: tokens
/// and credentials would travel in clear).
fn secure_url(v: &str) -> Result<(), String> {
    if v.starts_with("https://") {
        return Ok(());
    }
    if !v.starts_with("http://") {
        return Err(format!("`{v}` is not an https:// URL"));
    }
    match url::Url::parse(v)
        .ok()
        .and_then(|u| u.host_str().map(is_loopback_host))
    {
        Some(true) => Ok(()),
        _ => Err(format!(
            "`{v}` is plain http:// to a host that is not loopback: tokens and credentials would travel in clear; use https://"
        )),
    }
}

/// Check one upstream table (`upstream` or `upstream.alternate`) and resolve its secrets.
fn validate_upstream(
    u: &mut Upstream,
    prefix: &str,
    base: &Path,
    spool: &Path,
) -> Result<(), (String, String)> {
    u.resolved = Resolved::default();
    let key = |k: &str| format!("{prefix}.{k}");
    let bad = |k: &str, m: String| (key(k), m);
    u.password = secret::resolve(
        &key("password"),
        u.password.expose(),
        &u.password_env,
        &u.password_file,
        base,
    )
    .map_err(|m| bad("password", m))?;
    let needs_auth_user = u.requires_auth;
    match u.protocol {
        Protocol::File => {
            if u.outbox.as_os_str().is_empty() {
                return Err(bad("outbox", "is empty".into()));
            }
        }
        Protocol::Smtp | Protocol::Smtps => {
            let (server, alternate) = Resolved::servers(&u.server, &u.alternate_server, u.port)
                .map_err(|(k, m)| bad(k, m))?;
            if needs_auth_user && u.username.is_empty() && u.mailbox.is_empty() {
                return Err(bad(
                    "username",
                    "is required when requires_auth = true".into(),
                ));
            }
            if u.protocol == Protocol::Smtp && !u.tls && u.requires_auth && !u.allow_plaintext_auth
            {
                for (k, s) in [
                    ("server", Some(&server)),
                    ("alternate_server", alternate.as_ref()),
                ] {
                    let Some(s) = s else { continue };
                    if !is_loopback_host(&s.addr.host) {
                        return Err(bad(
                            "tls",
                            format!(
                                "is false with requires_auth = true: the credentials would go in clear to `{}` ({prefix}.{k}), which is not loopback; set tls = true, or {prefix}.allow_plaintext_auth = true to accept that",
                                s.addr.host
                            ),
                        ));
                    }
                }
            }
            u.resolved.server = Some(server);
            u.resolved.alternate_server = alternate;
        }
        Protocol::Graph => {
            secure_url(&u.graph_endpoint).map_err(|m| bad("graph_endpoint", m))?;
            if !u.requires_auth || u.auth != AuthKind::Oauth {
                return Err(bad(
                    "auth",
                    "Microsoft Graph needs requires_auth = true and auth = \"oauth\"".into(),
                ));
            }
            if u.mailbox.is_empty() && u.reply_to.is_empty() && u.username.is_empty() {
                return Err(bad(
                    "mailbox",
                    "Graph needs the mailbox to send as (mailbox, reply_to or username)".into(),
                ));
            }
        }
        Protocol::Ews => {
            if !u.requires_auth {
                return Err(bad("requires_auth", "Exchange Web Services needs requires_auth = true (auth = \"basic\" or \"oauth\")".into()));
            }
            secure_url(&u.connect_url).map_err(|m| bad("connect_url", m))?;
            u.resolved.ews_exchange_online = is_exchange_online_url(&u.connect_url);
        }
    }
    if u.requires_auth && u.auth == AuthKind::Basic {
        if u.username.is_empty() {
            return Err(bad(
                "username",
                "is required when requires_auth = true".into(),
            ));
        }
        if u.password.is_empty() {
            return Err(bad(
                "password",
                "is required when requires_auth = true (or password_env / password_file)".into(),
            ));
        }
    }
    if !u.tls_fingerprint.is_empty() {
        if !matches!(u.protocol, Protocol::Smtp | Protocol::Smtps) {
            return Err(bad(
                "tls_fingerprint",
                "pins an SMTP server's certificate; it applies to protocol = \"smtp\" or \"smtps\" only (use tls_ca_file for HTTP upstreams)".into(),
            ));
        }
        crate::tls::parse_fingerprint(&u.tls_fingerprint).map_err(|m| bad("tls_fingerprint", m))?;
    }
    if !u.tls_ca_file.is_empty() && !base.join(&u.tls_ca_file).is_file() {
        return Err(bad(
            "tls_ca_file",
            format!("`{}` is not a readable file", u.tls_ca_file),
        ));
    }
    let o = &mut u.oauth;
    o.client_secret = secret::resolve(
        &key("oauth.client_secret"),
        o.client_secret.expose(),
        &o.client_secret_env,
        &o.client_secret_file,
        base,
    )
    .map_err(|m| bad("oauth.client_secret", m))?;
    u.resolved.oauth = super::oauth::resolve(u, &key, base, spool, secure_url)?;
    let p = &mut u.proxy;
    p.password = secret::resolve(
        &key("proxy.password"),
        p.password.expose(),
        &p.password_env,
        &p.password_file,
        base,
    )
    .map_err(|m| bad("proxy.password", m))?;
    if !p.url.is_empty() && !p.url.starts_with("http://") {
        return Err(bad(
            "proxy.url",
            format!("`{}` is not an http:// proxy URL", p.url),
        ));
    }
    if u.timeout_secs < 1 {
        return Err(bad("timeout_secs", "must be at least 1".into()));
    }
    if !u.reply_to.is_empty() && !crate::address::is_valid_mailbox(&u.reply_to) {
        return Err(bad(
            "reply_to",
            format!("`{}` is not an email address", u.reply_to),
        ));
    }
    if !u.mailbox.is_empty() && !crate::address::is_valid_mailbox(&u.mailbox) {
        return Err(bad(
            "mailbox",
            format!("`{}` is not an email address", u.mailbox),
        ));
    }
    if u.sender_name.contains(['\r', '\n']) {
        return Err(bad("sender_name", "must be one line".into()));
    }
    Ok(())
}
