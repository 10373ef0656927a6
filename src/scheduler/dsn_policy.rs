//! Who may receive a delivery status notification (`delivery.dsn_to`), so that mailbridge cannot be used to send backscatter through the organisation's upstream.

use crate::config::DsnTo;
use crate::spool::Meta;

/// The DSN policy: `delivery.dsn_to` and the sender domains it may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsnPolicy {
    /// `delivery.dsn_to`.
    pub to: DsnTo,
    /// `listen.allowed_sender_domains` (for `allowed_domains`).
    pub sender_domains: Vec<String>,
}

impl DsnPolicy {
    /// The policy a configuration asks for.
    pub fn from_config(c: &crate::config::Config) -> DsnPolicy {
        DsnPolicy {
            to: c.delivery.dsn_to,
            sender_domains: c.listen.allowed_sender_domains.clone(),
        }
    }

    /// DSNs to every sender but `<>` (the behaviour before `dsn_to`; for tests of other things).
    pub fn any() -> DsnPolicy {
        DsnPolicy {
            to: DsnTo::Any,
            sender_domains: Vec::new(),
        }
    }
}

/// Whether the sender of `meta` may get a DSN; `Err` says why not (logged).
/// `<>` and DSNs themselves are the caller's business (never a DSN).
///
/// - `local`: the client authenticated, or connected from loopback;
/// - `allowed_domains` (default): as `local`, or the sender's domain is in
///   a non-empty `listen.allowed_sender_domains`;
/// - `any`: always.
pub fn dsn_allowed(policy: &DsnPolicy, meta: &Meta) -> Result<(), &'static str> {
    if policy.to == DsnTo::Any {
        return Ok(());
    }
    if meta.auth_user.is_some() {
        return Ok(());
    }
    let loopback = meta
        .client
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().to_canonical().is_loopback());
    if loopback {
        return Ok(());
    }
    match policy.to {
        DsnTo::Local => Err(
            "delivery.dsn_to = \"local\": the sender neither authenticated nor connected from loopback",
        ),
        _ if !policy.sender_domains.is_empty()
            && crate::inbound::access::domain_allowed(&policy.sender_domains, &meta.from) =>
        {
            Ok(())
        }
        _ => Err(
            "delivery.dsn_to = \"allowed_domains\": the sender neither authenticated, nor connected from loopback, nor is in listen.allowed_sender_domains",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(from: &str, client: &str, user: Option<&str>) -> Meta {
        let mut m = Meta::new("id".into(), from.into(), vec!["r@x.test".into()], 1, 0);
        m.client = client.into();
        m.auth_user = user.map(str::to_string);
        m
    }

    #[test]
    fn policies() {
        let local = DsnPolicy {
            to: DsnTo::Local,
            sender_domains: vec!["corp.test".into()],
        };
        let allowed = DsnPolicy {
            to: DsnTo::AllowedDomains,
            ..local.clone()
        };
        let allowed_empty = DsnPolicy::default();
        let remote_forged = meta("victim@elsewhere.test", "198.51.100.7:4000", None);
        let remote_corp = meta("app@CORP.test", "198.51.100.7:4000", None);
        let remote_auth = meta("victim@elsewhere.test", "198.51.100.7:4000", Some("app"));
        let loopback = meta("victim@elsewhere.test", "127.0.0.1:4000", None);
        let loopback6 = meta("victim@elsewhere.test", "[::1]:4000", None);
        let unknown = meta("victim@elsewhere.test", "", None);
        for (p, m, ok) in [
            (&local, &remote_forged, false),
            (&local, &remote_corp, false),
            (&local, &remote_auth, true),
            (&local, &loopback, true),
            (&local, &loopback6, true),
            (&local, &unknown, false),
            (&allowed, &remote_forged, false),
            (&allowed, &remote_corp, true),
            (&allowed, &remote_auth, true),
            (&allowed, &loopback, true),
            (&allowed_empty, &remote_forged, false),
            (&allowed_empty, &remote_corp, false),
            (&allowed_empty, &loopback, true),
            (&DsnPolicy::any(), &remote_forged, true),
            (&DsnPolicy::any(), &unknown, true),
        ] {
            assert_eq!(dsn_allowed(p, m).is_ok(), ok, "{p:?} {m:?}");
        }
    }
}
