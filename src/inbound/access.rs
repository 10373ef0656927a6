//! Who may use the listener: the client allow-list, sender and recipient domain lists, per-IP connection counts, and the "never an open relay" startup check.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::Listen;

/// Whether `ip` is inside one of `allow` (IPv4-mapped IPv6 addresses count as IPv4).
/// An empty list allows nobody.
pub fn client_allowed(allow: &[ipnet::IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    allow.iter().any(|net| net.contains(&ip))
}

/// The default loopback test (`127.0.0.0/8`, `::1`, and IPv4-mapped loopback).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether the domain of `address` is in `domains` (exact match, ASCII
/// case-insensitive; subdomains must be listed themselves). An empty list
/// allows every address; the null sender `""` has no domain and is refused
/// by a non-empty list.
pub fn domain_allowed(domains: &[String], address: &str) -> bool {
    if domains.is_empty() {
        return true;
    }
    let Some((_, domain)) = address.rsplit_once('@') else {
        return false;
    };
    let domain = domain.trim_end_matches('.');
    domains
        .iter()
        .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
}

/// Refuse to serve a non-loopback address unless something stops strangers
/// relaying through it: required AUTH (with users), or an allow-list that is
/// not "everyone". `users` is whether any `[[users]]` exist. The rule lives in
/// the configuration ([`crate::config::checks::check_exposure`]) so `check`
/// refuses what `run` refuses.
pub fn check_exposure(local: SocketAddr, listen: &Listen, users: bool) -> Result<(), String> {
    crate::config::checks::check_exposure(local, listen, users)
}

/// Sessions per client IP, shared by the connections of one listener.
#[derive(Debug)]
pub struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// One counted session; the count drops when this is dropped.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// At most `max` sessions per IP (0 is taken as 1).
    pub fn new(max: usize) -> Arc<PerIp> {
        Arc::new(PerIp {
            counts: Mutex::new(HashMap::new()),
            max: max.max(1),
        })
    }

    /// Count one more session from `ip`, or `None` when it already has `max`.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        // A poisoned lock only means another task panicked mid-update of a counter.
        let mut counts = self.counts.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }

    /// Sessions currently counted for `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock();
        counts.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn allow_list() {
        let allow = nets(&["127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"]);
        assert!(client_allowed(&allow, "127.0.0.1".parse().unwrap()));
        assert!(!client_allowed(&allow, "127.0.0.2".parse().unwrap()));
        assert!(client_allowed(&allow, "10.9.8.7".parse().unwrap()));
        assert!(client_allowed(&allow, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(client_allowed(&allow, "2001:db8::1".parse().unwrap()));
        assert!(!client_allowed(&allow, "::1".parse().unwrap()));
        assert!(!client_allowed(&[], "127.0.0.1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.5".parse().unwrap()));
        assert!(!is_loopback("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn domains() {
        let list = vec!["Example.com".to_string(), "b.example.".to_string()];
        assert!(domain_allowed(&list, "a@example.COM"));
        assert!(domain_allowed(&list, "a@b.example"));
        assert!(domain_allowed(&list, "\"a@x\"@example.com"));
        assert!(!domain_allowed(&list, "a@sub.example.com"));
        assert!(!domain_allowed(&list, "a@example.com.evil"));
        assert!(!domain_allowed(&list, ""));
        assert!(domain_allowed(&[], ""));
        assert!(domain_allowed(&[], "a@anything"));
    }

    #[test]
    fn exposure() {
        let lo: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let public: SocketAddr = "192.0.2.1:25".parse().unwrap();
        let open = Listen {
            allow_clients: nets(&["0.0.0.0/0"]),
            ..Listen::default()
        };
        assert!(check_exposure(lo, &open, false).is_ok());
        let err = check_exposure(public, &open, false).unwrap_err();
        assert!(err.starts_with("listen.allow_clients: "), "{err}");
        // require_auth without users does not protect anything.
        let auth = Listen {
            require_auth: true,
            ..open.clone()
        };
        assert!(check_exposure(public, &auth, false).is_err());
        assert!(check_exposure(public, &auth, true).is_ok());
        let listed = Listen {
            allow_clients: nets(&["192.0.2.0/24"]),
            ..Listen::default()
        };
        assert!(check_exposure(public, &listed, false).is_ok());
        assert!(check_exposure(public, &Listen::default(), false).is_ok());
    }

    #[test]
    fn per_ip_counts() {
        let t = PerIp::new(2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let s1 = t.enter(a).unwrap();
        let s2 = t.enter(a).unwrap();
        assert!(t.enter(a).is_none());
        let s3 = t.enter(b).unwrap();
        assert_eq!((t.count(a), t.count(b)), (2, 1));
        drop(s1);
        let s4 = t.enter("::ffff:127.0.0.2".parse().unwrap()).unwrap();
        assert!(t.enter(a).is_none());
        drop((s2, s3, s4));
        assert_eq!((t.count(a), t.count(b)), (0, 0));
        assert!(t.counts.lock().is_empty());
    }
}
