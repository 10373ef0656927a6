//! Builds the routes a configuration describes: one transport per upstream table, behind the per-mailbox throttle its service needs.

use std::sync::Arc;

use super::Router;
use crate::config::{Config, Flow, Protocol, Provider, Server, Upstream};
use crate::oauth::Registries;
use crate::transport::Transport;
use crate::transport::governor::{Governed, Governor, Governors, Limits};

/// A transport and the throttle in front of it, if any.
type Built = (Arc<dyn Transport>, Option<Arc<Governor>>);

/// Build the transport for one server of an upstream table (`server` is
/// the resolved `server` or `alternate_server`; `None` for HTTP and file
/// upstreams), behind the governor of its application (the one in
/// `governors` if alive), and that governor.
fn transport_for(
    c: &Config,
    u: &Upstream,
    server: Option<&Server>,
    oauth: &Registries,
    governors: &Governors,
) -> Result<Built, String> {
    let t = ungoverned(c, u, server, oauth)?;
    Ok(match limits_for(u, server) {
        Some(limits) => {
            let governor = governors.governor(&application(u, server), limits);
            let governed = Governed::with_governor(t, governor.clone());
            (Arc::new(governed), Some(governor))
        }
        None => (t, None),
    })
}

/// What identifies the upstream application whose limits a governor keeps:
/// Microsoft counts per app (the OAuth client) and mailbox, so the
/// protocol, the service address, the tenant and the client id (or the
/// account signing in). The mailboxes are the governor's keys.
fn application(u: &Upstream, server: Option<&Server>) -> String {
    let service = match u.protocol {
        Protocol::Graph => u.graph_endpoint.clone(),
        Protocol::Ews => u.connect_url.clone(),
        _ => server.map(|s| s.addr.to_string()).unwrap_or_default(),
    };
    let account = if u.uses_oauth() {
        format!("{}/{}", u.oauth.tenant, u.oauth.client_id)
    } else {
        u.username.clone()
    };
    format!("{:?} {service} {account}", u.protocol).to_ascii_lowercase()
}

/// The per-mailbox throttle an upstream gets: Graph 4 in flight, 10,000
/// requests per 10 minutes, 150 MB per 5 minutes and 10,000 recipients a
/// day; EWS 27 in flight (in Exchange Online also 30 per minute and 10,000
/// recipients a day); Exchange Online SMTP 3 connections, 30 messages per
/// minute and 10,000 recipients a day; other servers only what is configured.
fn limits_for(u: &Upstream, server: Option<&Server>) -> Option<Limits> {
    let mailbox = u.effective_mailbox();
    match u.protocol {
        Protocol::File => None,
        Protocol::Graph => Some(Limits::graph(u.max_in_flight, mailbox)),
        Protocol::Ews => {
            let online = u.resolved.ews_exchange_online;
            let in_flight = if u.max_in_flight == 0 {
                crate::transport::ews::DEFAULT_MAX_IN_FLIGHT
            } else {
                u.max_in_flight
            };
            Some(Limits::ews(
                in_flight,
                u.messages_per_minute,
                online,
                mailbox,
            ))
        }
        Protocol::Smtp | Protocol::Smtps => {
            let office365 = server.is_some_and(|s| s.exchange_online)
                || (u.uses_oauth() && u.oauth.provider == Provider::Office365);
            if office365 {
                Some(Limits::exchange_smtp(
                    u.max_in_flight,
                    u.messages_per_minute,
                    mailbox,
                ))
            } else if u.max_in_flight > 0 || u.messages_per_minute > 0 {
                Some(Limits {
                    max_in_flight: u.max_in_flight,
                    messages_per_minute: u.messages_per_minute,
                    default_key: mailbox.to_string(),
                    ..Limits::none()
                })
            } else {
                None
            }
        }
    }
}

/// The transport itself, before any throttle.
fn ungoverned(
    c: &Config,
    u: &Upstream,
    server: Option<&Server>,
    oauth: &Registries,
) -> Result<Arc<dyn Transport>, String> {
    use crate::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
    match u.protocol {
        Protocol::File => Ok(Arc::new(crate::transport::file::FileTransport::new(
            c.path(&u.outbox),
        ))),
        Protocol::Smtp | Protocol::Smtps => {
            let server = server
                .map(|s| s.addr.clone())
                .ok_or("server: the configuration was not validated")?;
            let auth = if u.uses_oauth() {
                // Shared with the admin endpoint and across reloads: one
                // token manager (and one refresh in flight) per identity.
                let registry = oauth.shared(c, u)?;
                SmtpAuth::XOAuth2 {
                    user: u.effective_mailbox().to_string(),
                    tokens: registry.manager(""),
                    identities: Some(registry),
                }
            } else if u.requires_auth {
                SmtpAuth::Basic {
                    username: u.username.clone(),
                    password: u.password.clone(),
                }
            } else {
                SmtpAuth::None
            };
            let settings = SmtpSettings {
                server,
                implicit_tls: u.protocol == Protocol::Smtps,
                starttls: u.protocol == Protocol::Smtp && u.tls,
                ca_file: (!u.tls_ca_file.is_empty())
                    .then(|| c.path(std::path::Path::new(&u.tls_ca_file))),
                auth,
                hostname: c.effective_hostname(),
                timeout: std::time::Duration::from_secs(u.timeout_secs),
            };
            Ok(Arc::new(
                SmtpTransport::new(settings)?
                    .with_idle_connections(c.delivery.concurrency)
                    .with_proxy(&u.proxy)?
                    .with_tls_fingerprint(
                        (!u.tls_fingerprint.is_empty()).then_some(u.tls_fingerprint.as_str()),
                    )?,
            ))
        }
        Protocol::Ews => {
            use crate::transport::ews::{
                DEFAULT_SERVER_VERSION, EwsAuth, EwsSettings, EwsTransport,
            };
            let auth = if u.uses_oauth() {
                let registry = oauth.shared(c, u)?;
                let app_only = u.oauth.flow == Flow::ClientCredentials;
                // Delegated tokens are per mailbox; an app-only token impersonates any.
                let per_mailbox = if app_only {
                    Default::default()
                } else {
                    c.users
                        .iter()
                        .filter(|usr| !usr.mailbox.is_empty())
                        .map(|usr| {
                            let m: Arc<dyn crate::oauth::TokenSource> =
                                registry.manager(&usr.mailbox);
                            (usr.mailbox.to_ascii_lowercase(), m)
                        })
                        .collect()
                };
                EwsAuth::Bearer {
                    tokens: registry.manager(""),
                    per_mailbox,
                }
            } else {
                EwsAuth::Basic {
                    username: u.username.clone(),
                    password: u.password.clone(),
                }
            };
            let settings = EwsSettings {
                connect_url: u.connect_url.clone(),
                impersonate: u.uses_oauth() && u.oauth.flow == Flow::ClientCredentials,
                auth,
                mailbox: u.effective_mailbox().to_string(),
                save_to_sent_items: u.save_to_sent_items,
                server_version: DEFAULT_SERVER_VERSION.to_string(),
                ca_file: (!u.tls_ca_file.is_empty())
                    .then(|| c.path(std::path::Path::new(&u.tls_ca_file))),
                proxy: u.proxy.clone(),
                timeout: std::time::Duration::from_secs(u.timeout_secs),
            };
            Ok(Arc::new(EwsTransport::new(settings)?))
        }
        Protocol::Graph => {
            use crate::transport::graph::{GraphSettings, GraphTransport};
            let registry = oauth.shared(c, u)?;
            let ca =
                (!u.tls_ca_file.is_empty()).then(|| c.path(std::path::Path::new(&u.tls_ca_file)));
            let client = crate::http::client(
                ca.as_deref(),
                &u.proxy,
                std::time::Duration::from_secs(u.timeout_secs),
            )?;
            let mut settings = GraphSettings::new(
                &u.graph_endpoint,
                u.effective_mailbox(),
                registry.manager(""),
                client,
            );
            settings.identity_tokens = Some(registry);
            settings.save_to_sent_items = u.save_to_sent_items;
            settings.large_messages = u.large_messages;
            Ok(Arc::new(GraphTransport::new(settings)?))
        }
    }
}

/// The router a configuration describes, with governors of its own (see
/// [`from_config_with`] to keep them across reloads).
pub fn from_config(c: &Config, oauth: &Registries) -> Result<Router, String> {
    from_config_with(c, oauth, &Governors::new())
}

/// The router a validated configuration describes: `[upstream]` as
/// primary, and as alternate either `[upstream.alternate]` (any protocol) or
/// `upstream.alternate_server` with the primary's settings. OAuth
/// identities come from `oauth`, shared with the admin endpoint and reloads.
/// Each governed route takes its application's governor from `governors`: a
/// reload that keeps the application keeps its pauses, budget windows and
/// attempts in flight, under the new limits.
pub fn from_config_with(
    c: &Config,
    oauth: &Registries,
    governors: &Arc<Governors>,
) -> Result<Router, String> {
    let u = &c.upstream;
    let alternate = if let Some(alt) = u.alternate.as_deref() {
        Some(
            transport_for(c, alt, alt.resolved.server.as_ref(), oauth, governors)
                .map_err(|e| format!("upstream.alternate: {e}"))?,
        )
    } else if let Some(server) = u.resolved.alternate_server.as_ref()
        && matches!(u.protocol, Protocol::Smtp | Protocol::Smtps)
    {
        Some(
            transport_for(c, u, Some(server), oauth, governors)
                .map_err(|e| format!("upstream.alternate_server: {e}"))?,
        )
    } else {
        None
    };
    let (primary, primary_gov) = transport_for(c, u, u.resolved.server.as_ref(), oauth, governors)
        .map_err(|e| format!("upstream: {e}"))?;
    let (alternate, alternate_gov) = match alternate {
        Some((t, g)) => (Some(t), g),
        None => (None, None),
    };
    let mut router = Router::new(primary, alternate).with_registry(governors.clone());
    for (label, g) in [("primary", primary_gov), ("alternate", alternate_gov)] {
        if let Some(g) = g {
            router = router.with_governor(label, g);
        }
    }
    Ok(router)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn exchange_online(per_minute: u32, server: &str) -> crate::config::Config {
        let text = format!(
            "[upstream]\nprotocol = \"smtp\"\nserver = \"{server}\"\nport = 587\nrequires_auth = true\nusername = \"desk@contoso.com\"\npassword = \"pw\"\nmessages_per_minute = {per_minute}\n"
        );
        crate::config::Config::from_toml(&text, "t.toml", std::path::Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebuild_keeps_the_governor_of_the_same_application_with_new_limits() {
        let governors = Governors::new();
        let oauth = Registries::new();
        let first = from_config_with(
            &exchange_online(30, "smtp.office365.com"),
            &oauth,
            &governors,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let stats = governors.stats();
        assert_eq!(stats.len(), 1, "{stats:?}");
        let app = stats[0].0.clone();
        let g = governors.get(&app).unwrap_or_else(|| panic!("no governor"));
        assert_eq!(g.limits().messages_per_minute, 30);
        // Exchange paused the mailbox; then the configuration is reloaded.
        g.pause("desk@contoso.com", Duration::from_secs(120));
        let second = from_config_with(
            &exchange_online(20, "smtp.office365.com"),
            &oauth,
            &governors,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        drop(first);
        let again = governors
            .get(&app)
            .unwrap_or_else(|| panic!("governor lost"));
        assert!(Arc::ptr_eq(&g, &again));
        assert_eq!(
            again.limits().messages_per_minute,
            20,
            "the new limit applies"
        );
        assert!(
            again.paused_for("desk@contoso.com").is_some(),
            "the pause survives"
        );
        // Another server is another application: a governor of its own, and
        // the old one goes with the last route that used it.
        drop(g);
        drop(again);
        let third = from_config_with(
            &exchange_online(20, "smtp-2.office365.com"),
            &oauth,
            &governors,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        drop(second);
        let names: Vec<String> = governors.stats().into_iter().map(|s| s.0).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_ne!(names[0], app);
        drop(third);
        // Without a shared registry (`from_config`), nothing is kept.
        let alone = from_config(&exchange_online(30, "smtp.office365.com"), &oauth);
        assert!(alone.is_ok());
        assert!(governors.stats().is_empty());
    }
}
