//! Chooses the server for each attempt: the primary first, the alternate when the primary is unreachable, and stays there until failback (the seed's "Secondary Mail Server for Outgoing Mails").

use std::sync::Arc;

use parking_lot::Mutex;

use serde::Serialize;

use crate::transport::governor::Governor;
use crate::transport::{Delivery, Envelope, Failure, Scope, Severity, Transport};

mod build;
pub use build::{from_config, from_config_with};

/// One configured server.
pub struct Route {
    /// `primary` or `alternate`.
    pub label: &'static str,
    /// How to reach it.
    pub transport: Arc<dyn Transport>,
}

/// The outcome of [`Router::deliver`] and the route that carried it (or,
/// when nothing was delivered, the route the attempt started on).
#[derive(Debug)]
pub struct Routed {
    /// What the transport answered.
    pub result: Delivery,
    /// `primary` or `alternate`.
    pub route: &'static str,
    /// That route's server, e.g. `smtp://smtp.office365.com:587`.
    pub server: String,
}

/// Which server is in use, since when and why (shown by `status`).
#[derive(Debug, Clone, Serialize)]
pub struct RouteState {
    /// `primary` or `alternate`.
    pub active: &'static str,
    /// The active server, e.g. `smtp://smtp.office365.com:587`.
    pub server: String,
    /// Unix seconds when it became active.
    pub since: u64,
    /// Why it became active.
    pub reason: String,
}

/// The primary and optional alternate route, with the sticky choice between them.
pub struct Router {
    routes: Vec<Route>,
    active: Mutex<(usize, RouteState)>,
    /// The throttle of each governed route, by label (for metrics).
    governors: Vec<(&'static str, Arc<Governor>)>,
    /// The governors behind its routes, for status.
    registry: Option<Arc<crate::transport::governor::Governors>>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Router {
    /// A router over `primary` and an optional `alternate`; starts on the primary.
    pub fn new(primary: Arc<dyn Transport>, alternate: Option<Arc<dyn Transport>>) -> Router {
        let state = RouteState {
            active: "primary",
            server: primary.describe(),
            since: now_unix(),
            reason: "started".into(),
        };
        let mut routes = vec![Route {
            label: "primary",
            transport: primary,
        }];
        if let Some(t) = alternate {
            routes.push(Route {
                label: "alternate",
                transport: t,
            });
        }
        Router {
            routes,
            active: Mutex::new((0, state)),
            governors: Vec::new(),
            registry: None,
        }
    }

    /// Name the registry of governors behind the routes, so status can show
    /// where the throttle budget is kept.
    pub fn with_registry(mut self, g: Arc<crate::transport::governor::Governors>) -> Router {
        self.registry = Some(g);
        self
    }

    /// The throttle for status and metrics: where the budget is kept
    /// (`local`, `redis`, or `fallback` while Redis is unreachable) and the
    /// figures of each upstream application's governor.
    pub fn throttle(&self) -> serde_json::Value {
        let Some(g) = &self.registry else {
            return serde_json::json!({ "backend": "local", "applications": [] });
        };
        let apps: Vec<serde_json::Value> = g
            .stats()
            .into_iter()
            .map(|(app, s)| serde_json::json!({ "application": app, "stats": s }))
            .collect();
        match g.shared_state() {
            None => serde_json::json!({ "backend": "local", "applications": apps }),
            Some(s) => serde_json::json!({
                "backend": "redis",
                "mode": s.mode,
                "expected_instances": s.expected_instances,
                "last_error": s.last_error,
                "applications": apps,
            }),
        }
    }

    /// Name the throttle in front of route `label` (for metrics).
    pub fn with_governor(mut self, label: &'static str, governor: Arc<Governor>) -> Router {
        self.governors.push((label, governor));
        self
    }

    /// The throttles in front of the routes, by route label.
    pub fn governors(&self) -> &[(&'static str, Arc<Governor>)] {
        &self.governors
    }

    /// The current choice.
    pub fn state(&self) -> RouteState {
        self.active.lock().1.clone()
    }

    /// The configured servers, primary first.
    pub fn servers(&self) -> Vec<(&'static str, String)> {
        self.routes
            .iter()
            .map(|r| (r.label, r.transport.describe()))
            .collect()
    }

    fn active_index(&self) -> usize {
        self.active.lock().0
    }

    fn switch(&self, to: usize, reason: String) {
        let mut g = self.active.lock();
        if g.0 == to {
            return;
        }
        let route = &self.routes[to];
        tracing::warn!(route = route.label, server = %route.transport.describe(), %reason, "switched upstream");
        *g = (
            to,
            RouteState {
                active: route.label,
                server: route.transport.describe(),
                since: now_unix(),
                reason,
            },
        );
    }

    /// Deliver through the active server; when it fails as a server (refused,
    /// timeout, TLS, 421, authentication), try the other one in the same
    /// attempt and, if that one answers, make it the active one. When a
    /// route cannot carry this message ([`Scope::Route`], e.g. too large for
    /// Graph), the next route is tried for this message only and the active
    /// route stays. The answer names the route that carried the message.
    pub async fn deliver(&self, env: &Envelope, message: &crate::transport::Body) -> Routed {
        let start = self.active_index();
        let mut last: Option<Failure> = None;
        let mut handed_over = false;
        let mut transient: Option<Failure> = None;
        for step in 0..self.routes.len() {
            let idx = (start + step) % self.routes.len();
            let route = &self.routes[idx];
            let result = route.transport.deliver(env, message).await;
            let skip = match &result {
                Err(f) if f.scope == Scope::Route => {
                    tracing::info!(id = %env.id, route = route.label, server = %route.transport.describe(), reason = %f, "this route cannot carry the message; trying the next one");
                    handed_over = true;
                    true
                }
                Err(f) if f.fails_over() => {
                    tracing::info!(id = %env.id, route = route.label, server = %route.transport.describe(), error = %f, "server unavailable");
                    true
                }
                _ => false,
            };
            if !skip {
                if let Err(f) = &result
                    && f.scope == Scope::MaybeDelivered
                {
                    let message_id = crate::message::header_value(message.head(), "message-id")
                        .map(|v| crate::message::clean_display_name(&v))
                        .unwrap_or_default();
                    tracing::warn!(id = %env.id, route = route.label, server = %route.transport.describe(), message_id = %message_id, error = %f, "possible_duplicate: the message was sent but not confirmed; retrying the same server later, not the other one");
                }
                if idx != start && !handed_over {
                    let why = last.as_ref().map(|f| f.text.clone()).unwrap_or_default();
                    self.switch(
                        idx,
                        format!("{} unavailable: {why}", self.routes[start].label),
                    );
                }
                return Routed {
                    result,
                    route: route.label,
                    server: route.transport.describe(),
                };
            }
            let Err(f) = result else { continue };
            if f.severity == Severity::Transient && transient.is_none() {
                transient = Some(f.clone());
            }
            last = Some(match last {
                None => f,
                Some(prev) => Failure {
                    text: format!("{}; {}: {}", prev.text, route.label, f.text),
                    ..f
                },
            });
        }
        let mut f = last.unwrap_or_else(|| Failure::server("no upstream configured"));
        // A route that cannot carry the message is final only when no route
        // failed in a way that may pass: retry later rather than bounce.
        if let Some(t) = transient
            && f.severity == Severity::Permanent
        {
            f = Failure { text: f.text, ..t };
        }
        if handed_over && f.scope != Scope::Route {
            // Not a reason to switch routes elsewhere: this message only.
            f.scope = Scope::Message;
        }
        Routed {
            result: Err(f),
            route: self.routes[start].label,
            server: self.routes[start].transport.describe(),
        }
    }

    /// Return to the primary (operator action, reload or successful probe).
    /// False when the primary was already active.
    pub fn failback(&self, reason: &str) -> bool {
        let was = self.active_index();
        self.switch(0, reason.to_string());
        was != 0
    }

    /// Take over the choice of the router this one replaces (configuration
    /// reload): the same route stays active with its `since` and reason. When
    /// the previously active route no longer exists (the alternate was
    /// removed) the primary becomes active and the reason says so.
    pub fn resume(&self, prev: &RouteState) {
        let idx = self.routes.iter().position(|r| r.label == prev.active);
        let mut g = self.active.lock();
        *g = match idx {
            Some(i) => (
                i,
                RouteState {
                    active: self.routes[i].label,
                    server: self.routes[i].transport.describe(),
                    since: prev.since,
                    reason: prev.reason.clone(),
                },
            ),
            None => (
                0,
                RouteState {
                    active: self.routes[0].label,
                    server: self.routes[0].transport.describe(),
                    since: now_unix(),
                    reason: format!(
                        "the {} server was removed from the configuration",
                        prev.active
                    ),
                },
            ),
        };
    }

    /// Probe the primary server.
    pub async fn probe_primary(&self) -> Result<(), Failure> {
        self.routes[0].transport.probe().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::BoxFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Scripted {
        name: &'static str,
        answer: fn() -> Delivery,
        calls: AtomicUsize,
    }

    impl Transport for Scripted {
        fn describe(&self) -> String {
            self.name.into()
        }
        fn deliver<'a>(
            &'a self,
            _: &'a Envelope,
            _: &'a crate::transport::Body,
        ) -> BoxFuture<'a, Delivery> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { (self.answer)() })
        }
        fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn t(name: &'static str, answer: fn() -> Delivery) -> Arc<Scripted> {
        Arc::new(Scripted {
            name,
            answer,
            calls: AtomicUsize::new(0),
        })
    }

    fn env() -> Envelope {
        Envelope {
            id: "1".into(),
            from: "a@b".into(),
            rcpts: vec!["c@d".into()],
            identity: None,
        }
    }

    #[tokio::test]
    async fn server_failure_fails_over_and_sticks() {
        let p = t("p", || Err(Failure::server("connection refused")));
        let a = t("a", || Ok(vec![Ok(())]));
        let r = Router::new(p.clone(), Some(a.clone()));
        assert!(
            r.deliver(&env(), &crate::transport::Body::from(b"x"))
                .await
                .result
                .is_ok()
        );
        assert_eq!(r.state().active, "alternate");
        assert!(r.state().reason.contains("connection refused"));
        assert!(
            r.deliver(&env(), &crate::transport::Body::from(b"x"))
                .await
                .result
                .is_ok()
        );
        assert_eq!(
            (
                p.calls.load(Ordering::SeqCst),
                a.calls.load(Ordering::SeqCst)
            ),
            (1, 2)
        );
        assert!(r.failback("operator"));
        assert_eq!(r.state().active, "primary");
        assert!(!r.failback("again"));
    }

    #[tokio::test]
    async fn permanent_and_message_failures_do_not_fail_over() {
        for answer in [
            (|| Err(Failure::permanent("550 5.7.60 no"))) as fn() -> Delivery,
            || Err(Failure::transient("451 4.3.0 later")),
            || Ok(vec![Err(Failure::permanent("550 no such user"))]),
            // Final dot sent, no reply: maybe delivered, never sent twice.
            || Err(Failure::maybe_delivered("timeout (after end of data)")),
        ] {
            let p = t("p", answer);
            let a = t("a", || Ok(vec![Ok(())]));
            let r = Router::new(p, Some(a.clone()));
            let _ = r.deliver(&env(), &crate::transport::Body::from(b"x")).await;
            assert_eq!(a.calls.load(Ordering::SeqCst), 0);
            assert_eq!(r.state().active, "primary");
        }
    }

    #[tokio::test]
    async fn a_route_that_cannot_carry_the_message_hands_it_on_without_switching() {
        let p = t("p", || Err(Failure::route("552 5.3.4 too large for p")));
        let a = t("a", || Ok(vec![Ok(())]));
        let r = Router::new(p.clone(), Some(a.clone()));
        let d = r.deliver(&env(), &crate::transport::Body::from(b"x")).await;
        assert!(d.result.is_ok());
        assert_eq!((d.route, d.server.as_str()), ("alternate", "a"));
        assert_eq!(r.state().active, "primary", "the active route stays");
        // The alternate down: retry later, no switch, no bounce.
        let down = t("a", || Err(Failure::server("refused")));
        let r = Router::new(p.clone(), Some(down));
        let f = r
            .deliver(&env(), &crate::transport::Body::from(b"x"))
            .await
            .result
            .unwrap_err();
        assert_eq!((f.severity, f.fails_over()), (Severity::Transient, false));
        assert!(
            f.text.contains("too large") && f.text.contains("refused"),
            "{f}"
        );
        assert_eq!(r.state().active, "primary");
        // Running on the alternate, which is down: the primary cannot carry
        // it either, but the alternate may come back: still transient.
        let r = Router::new(p.clone(), Some(t("a", || Err(Failure::server("refused")))));
        r.switch(1, "test".into());
        let f = r
            .deliver(&env(), &crate::transport::Body::from(b"x"))
            .await
            .result
            .unwrap_err();
        assert_eq!(f.severity, Severity::Transient, "{f}");
        // No other route: a bounce with the route's reason.
        let r = Router::new(p, None);
        let f = r
            .deliver(&env(), &crate::transport::Body::from(b"x"))
            .await
            .result
            .unwrap_err();
        assert_eq!(f.severity, Severity::Permanent);
        assert!(f.text.starts_with("552 5.3.4"), "{f}");
    }

    #[tokio::test]
    async fn the_answer_names_the_route_that_carried_it() {
        let r = Router::new(
            t("p", || Err(Failure::server("refused"))),
            Some(t("a", || Ok(vec![Ok(())]))),
        );
        let d = r.deliver(&env(), &crate::transport::Body::from(b"x")).await;
        assert_eq!((d.route, d.server.as_str()), ("alternate", "a"));
    }

    #[tokio::test]
    async fn a_replacement_router_keeps_the_route_and_its_reason() {
        let old = Router::new(
            t("p", || Err(Failure::server("refused"))),
            Some(t("a", || Ok(vec![Ok(())]))),
        );
        let _ = old
            .deliver(&env(), &crate::transport::Body::from(b"x"))
            .await;
        let before = old.state();
        assert_eq!(before.active, "alternate");
        let new = Router::new(
            t("p2", || Ok(vec![Ok(())])),
            Some(t("a2", || Ok(vec![Ok(())]))),
        );
        new.resume(&before);
        let after = new.state();
        assert_eq!((after.active, after.server.as_str()), ("alternate", "a2"));
        assert_eq!((after.since, &after.reason), (before.since, &before.reason));
        // The next delivery goes to the alternate, as before the reload.
        assert_eq!(
            new.deliver(&env(), &crate::transport::Body::from(b"x"))
                .await
                .route,
            "alternate"
        );
        // Without an alternate any more: the primary, and the reason says why.
        let alone = Router::new(t("p3", || Ok(vec![Ok(())])), None);
        alone.resume(&before);
        assert_eq!(alone.state().active, "primary");
        assert!(
            alone.state().reason.contains("removed"),
            "{:?}",
            alone.state()
        );
    }

    #[tokio::test]
    async fn both_down_reports_both() {
        let r = Router::new(
            t("p", || Err(Failure::server("refused"))),
            Some(t("a", || Err(Failure::server("timeout")))),
        );
        let e = r
            .deliver(&env(), &crate::transport::Body::from(b"x"))
            .await
            .result
            .unwrap_err();
        assert!(
            e.fails_over() && e.text.contains("refused") && e.text.contains("timeout"),
            "{e}"
        );
        assert_eq!(r.state().active, "primary");
    }
}
