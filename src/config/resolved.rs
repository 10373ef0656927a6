//! What validation derives from the strings of the file, so no later layer parses them again: host and port of each server, the socket addresses, whether a service is Exchange Online, and the OAuth settings.

use std::net::SocketAddr;

use super::oauth::OAuthSettings;

/// A server as `host` and `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parse `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn parse_host_port(s: &str, default_port: u16) -> Result<HostPort, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("has `[` without `]`")?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("unexpected `{after}` after `]`")),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').ok_or("bad host")?;
        (h, Some(p))
    } else {
        (s, None)
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("`{s}` is not a host name or IP address"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(format!("`{p}` is not a port number"))?,
        None => default_port,
    };
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

/// A server of an upstream table (`server`, `alternate_server`), parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Host and port (the table's `port` when the value names none).
    pub addr: HostPort,
    /// The host is Exchange Online (see [`is_exchange_online`]).
    pub exchange_online: bool,
}

impl Server {
    fn parse(s: &str, default_port: u16) -> Result<Server, String> {
        let addr = parse_host_port(s, default_port)?;
        Ok(Server {
            exchange_online: is_exchange_online(&addr.host),
            addr,
        })
    }
}

/// What validation derived from one upstream table; empty until the
/// configuration is validated (`Config::load_unchecked` leaves it so).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    /// `server`, for `smtp` and `smtps`.
    pub server: Option<Server>,
    /// `alternate_server`, for `smtp` and `smtps`, when set.
    pub alternate_server: Option<Server>,
    /// `connect_url` (EWS) points at Exchange Online.
    pub ews_exchange_online: bool,
    /// The OAuth settings, when the table uses OAuth.
    pub oauth: Option<OAuthSettings>,
}

impl Resolved {
    /// Parse the servers of a table; `Err` is `(key, message)` with the key
    /// relative to the table (`server`, `alternate_server`).
    pub(super) fn servers(
        server: &str,
        alternate_server: &str,
        port: u16,
    ) -> Result<(Server, Option<Server>), (&'static str, String)> {
        let primary = Server::parse(server, port).map_err(|m| ("server", m))?;
        let alternate = if alternate_server.is_empty() {
            None
        } else {
            Some(Server::parse(alternate_server, port).map_err(|m| ("alternate_server", m))?)
        };
        Ok((primary, alternate))
    }
}

/// The listener and admin addresses, parsed once (empty until validated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sockets {
    /// `listen.address`.
    pub listen: Option<SocketAddr>,
    /// `listen.implicit_tls_address`, when set.
    pub implicit_tls: Option<SocketAddr>,
    /// `admin.address`, when set (empty disables the endpoint).
    pub admin: Option<SocketAddr>,
}

/// The domains of Exchange Online, commercial and national clouds: SMTP
/// (`smtp.office365.com`, `smtp-mail.outlook.com`, `smtp.office365.us`,
/// `partner.outlook.cn`) and EWS (`outlook.office365.com`,
/// `outlook.office.com`, `outlook.office365.us`, `webmail.apps.mil`,
/// `outlook.office.de`). A host is Exchange Online when it is one of them
/// or a name below one.
const EXCHANGE_ONLINE_DOMAINS: &[&str] = &[
    "office365.com",
    "office365.us",
    "outlook.com",
    "outlook.office.com",
    "partner.outlook.cn",
    "outlook.office.de",
    "webmail.apps.mil",
];

/// The one Exchange Online rule: true when `host` (a name, case and a
/// trailing dot ignored) belongs to Exchange Online, whose SMTP AUTH
/// limits, Basic-authentication retirement and EWS retirement apply.
pub fn is_exchange_online(host: &str) -> bool {
    let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
    EXCHANGE_ONLINE_DOMAINS
        .iter()
        .any(|d| h == *d || h.strip_suffix(d).is_some_and(|rest| rest.ends_with('.')))
}

/// [`is_exchange_online`] for the host of a URL (`connect_url`).
pub fn is_exchange_online_url(url: &str) -> bool {
    url::Url::parse(url.trim())
        .ok()
        .and_then(|u| u.host_str().map(is_exchange_online))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("a.example", 587).unwrap(),
            HostPort {
                host: "a.example".into(),
                port: 587
            }
        );
        assert_eq!(parse_host_port("a.example:25", 587).unwrap().port, 25);
        assert_eq!(
            parse_host_port("[::1]:26", 587).unwrap(),
            HostPort {
                host: "::1".into(),
                port: 26
            }
        );
        assert_eq!(parse_host_port("::1", 587).unwrap().host, "::1");
        assert!(parse_host_port("a:0", 1).is_err());
    }

    #[test]
    fn exchange_online_is_one_rule_for_smtp_and_ews_hosts() {
        for h in [
            "smtp.office365.com",
            "SMTP.Office365.com.",
            "smtp-mail.outlook.com",
            "smtp.office365.us",
            "partner.outlook.cn",
            "outlook.office365.com",
            "outlook.office.com",
            "webmail.apps.mil",
            "outlook.office.de",
        ] {
            assert!(is_exchange_online(h), "{h}");
        }
        for h in [
            "mail.contoso.com",
            "notoffice365.com",
            "office365.com.evil.example",
            "",
        ] {
            assert!(!is_exchange_online(h), "{h}");
        }
        assert!(is_exchange_online_url(
            "https://outlook.office365.com/EWS/Exchange.asmx"
        ));
        assert!(!is_exchange_online_url(
            "https://mail.contoso.com/EWS/Exchange.asmx"
        ));
        assert!(!is_exchange_online_url("not a url"));
    }

    #[test]
    fn servers_parse_once_with_the_table_port() {
        let (p, a) = Resolved::servers("smtp.office365.com", "[::1]:26", 587).unwrap();
        assert_eq!(p.addr.port, 587);
        assert!(p.exchange_online);
        let a = a.unwrap();
        assert_eq!(
            (a.addr.host.as_str(), a.addr.port, a.exchange_online),
            ("::1", 26, false)
        );
        assert_eq!(
            Resolved::servers("a", "b c", 25).unwrap_err().0,
            "alternate_server"
        );
        assert_eq!(Resolved::servers("", "", 25).unwrap_err().0, "server");
    }
}
