//! Prometheus metrics for `GET /metrics`: counters fed by inbound acceptance and the scheduler's attempt events, and figures read at scrape time from the queue, the router, the throttles and the OAuth identities.
//!
//! One [`Metrics`] is made by [`crate::run`] and handed to whoever records
//! into it (no global registry). Names start with `mailbridge_`; the text
//! is the Prometheus exposition format 0.0.4 ([`CONTENT_TYPE`]).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::common::BoxFuture;
use crate::inbound::{Incoming, MessageFile, Sink, SinkError};
use crate::reload::Reloader;
use crate::routing::RouteState;
use crate::scheduler::{AttemptEvent, AttemptOutcome, Scheduler};

/// The `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the delivery latency buckets: from a fast
/// relay (50 ms) to a message that waited a day for its upstream.
const LATENCY_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Attempt {
    route: &'static str,
    protocol: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Path {
    route: &'static str,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reply {
    route: &'static str,
    protocol: String,
    class: &'static str,
}

/// The metrics of one running relay.
pub struct Metrics {
    registry: Registry,
    accepted: Counter,
    rejected: Family<Reason, Counter>,
    attempts: Family<Attempt, Counter>,
    latency: Family<Path, Histogram>,
    replies: Family<Reply, Counter>,
    throttled: Family<Path, Counter>,
    lost_events: Counter,
    routes: Arc<RouteWatch>,
    live: Arc<OnceLock<Live>>,
}

/// Failover and failback counts, from changes of the active route.
#[derive(Debug, Default)]
struct RouteWatch {
    last: Mutex<Option<(&'static str, u64)>>,
    failovers: Counter,
    failbacks: Counter,
}

impl RouteWatch {
    /// Count a change of the active route since the last look.
    fn observe(&self, s: &RouteState) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = (s.active, s.since);
        match *last {
            Some((was, _)) if was != s.active => {
                if s.active == "primary" {
                    self.failbacks.inc();
                } else {
                    self.failovers.inc();
                }
            }
            // Away and back between two looks: both happened.
            Some((_, since)) if since != s.since => {
                self.failovers.inc();
                self.failbacks.inc();
            }
            _ => {}
        }
        *last = Some(now);
    }
}

/// What is read at scrape time.
struct Live {
    sched: Scheduler,
    reloader: Reloader,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Empty metrics; [`Metrics::watch`] adds the relay's figures.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let accepted = Counter::default();
        registry.register(
            "mailbridge_inbound_accepted",
            "Messages accepted from SMTP clients and the maildrop (stored in the spool)",
            accepted.clone(),
        );
        let rejected = Family::<Reason, Counter>::default();
        registry.register(
            "mailbridge_inbound_rejected",
            "Inbound refusals by reason: of a client (client_not_allowed, auth_failed, auth_required), a sender (sender_domain, sender_not_owned), a recipient (relay_denied, too_many_recipients) or a message (too_big, bare_line_ending, nul_byte, mail_loop, from_not_owned, queue_full, spool_error)",
            rejected.clone(),
        );
        let attempts = Family::<Attempt, Counter>::default();
        registry.register(
            "mailbridge_delivery_attempts",
            "Delivery attempts by route, protocol and outcome (delivered, deferred, bounced)",
            attempts.clone(),
        );
        let latency = Family::<Path, Histogram>::new_with_constructor(
            (|| Histogram::new(LATENCY_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "mailbridge_delivery_latency_seconds",
            "Time from acceptance to delivery of delivered messages",
            latency.clone(),
        );
        let replies = Family::<Reply, Counter>::default();
        registry.register(
            "mailbridge_upstream_replies",
            "Upstream answers to delivery attempts by class (2xx, 4xx, 5xx, none = no reply)",
            replies.clone(),
        );
        let throttled = Family::<Path, Counter>::default();
        registry.register(
            "mailbridge_upstream_throttled",
            "Attempts the upstream throttled (HTTP 429, server busy, SMTP 4.7.x rate limits)",
            throttled.clone(),
        );
        let lost_events = Counter::default();
        registry.register(
            "mailbridge_metrics_lost_events",
            "Attempt events the metrics missed because they fell behind",
            lost_events.clone(),
        );
        let routes = Arc::new(RouteWatch::default());
        registry.register(
            "mailbridge_failovers",
            "Switches from the primary to the alternate server",
            routes.failovers.clone(),
        );
        registry.register(
            "mailbridge_failbacks",
            "Returns to the primary server (probe, operator or reload)",
            routes.failbacks.clone(),
        );
        let live = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(Scrape {
            live: live.clone(),
            routes: routes.clone(),
        }));
        Metrics {
            registry,
            accepted,
            rejected,
            attempts,
            latency,
            replies,
            throttled,
            lost_events,
            routes,
            live,
        }
    }

    /// Read the queue, router, throttles and OAuth identities of `sched`
    /// and `reloader` at every scrape (the first call wins).
    pub fn watch(&self, sched: Scheduler, reloader: Reloader) {
        self.routes.observe(&sched.router().state());
        let _ = self.live.set(Live { sched, reloader });
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        if let Some(l) = self.live.get() {
            self.routes.observe(&l.sched.router().state());
        }
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }

    /// Count a message stored by the inbound side.
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// Count an inbound refusal, by a short reason (`relay_denied`,
    /// `queue_full`, …).
    pub fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    /// Count one attempt's outcome.
    pub fn attempt(&self, e: &AttemptEvent) {
        let protocol = self
            .live
            .get()
            .map(|l| protocol_of(&l.reloader.config(), e.route))
            .unwrap_or_default();
        let outcome = match e.outcome {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Deferred => "deferred",
            AttemptOutcome::Bounced => "bounced",
        };
        self.attempts
            .get_or_create(&Attempt {
                route: e.route,
                protocol: protocol.clone(),
                outcome,
            })
            .inc();
        let path = Path {
            route: e.route,
            protocol: protocol.clone(),
        };
        if e.outcome == AttemptOutcome::Delivered {
            self.latency
                .get_or_create(&path)
                .observe(e.age.as_secs_f64());
        }
        let class = match &e.failure {
            None => "2xx",
            Some(f) => match (f.reply_code, f.enhanced) {
                (Some(c), _) if (200..300).contains(&c) => "2xx",
                (Some(c), _) if (400..500).contains(&c) => "4xx",
                (Some(c), _) if (500..600).contains(&c) => "5xx",
                (_, Some(en)) if en.class == 4 => "4xx",
                (_, Some(en)) if en.class == 5 => "5xx",
                _ => "none",
            },
        };
        self.replies
            .get_or_create(&Reply {
                route: e.route,
                protocol,
                class,
            })
            .inc();
        if e.failure.as_ref().is_some_and(|f| f.throttled) {
            self.throttled.get_or_create(&path).inc();
        }
        if let Some(l) = self.live.get() {
            self.routes.observe(&l.sched.router().state());
        }
    }
}

/// The `protocol` setting of the table behind `route`.
fn protocol_of(cfg: &crate::config::Config, route: &str) -> String {
    let u = match (route, cfg.upstream.alternate.as_deref()) {
        ("alternate", Some(alt)) => alt,
        _ => &cfg.upstream,
    };
    serde_json::to_value(u.protocol)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Count every attempt event of `sched` into `metrics` until `shutdown`.
pub async fn record(metrics: Arc<Metrics>, sched: Scheduler, shutdown: CancellationToken) {
    let mut events = sched.subscribe();
    loop {
        let e = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.recv() => e,
        };
        match e {
            Ok(e) => metrics.attempt(&e),
            Err(RecvError::Lagged(n)) => {
                metrics.lost_events.inc_by(n);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// The inbound [`Sink`] that counts what it stores and refuses.
pub struct CountingSink {
    inner: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
}

impl CountingSink {
    /// Count what `inner` accepts and refuses into `metrics`.
    pub fn new(inner: Arc<dyn Sink>, metrics: Arc<Metrics>) -> CountingSink {
        CountingSink { inner, metrics }
    }
}

impl Sink for CountingSink {
    fn refused(&self, reason: &'static str) {
        self.metrics.rejected(reason);
        self.inner.refused(reason);
    }

    fn begin(&self, id: &str) -> Box<dyn MessageFile> {
        Box::new(CountingFile {
            inner: self.inner.begin(id),
            metrics: self.metrics.clone(),
        })
    }
}

/// A message file of [`CountingSink`]: its commit is counted.
struct CountingFile {
    inner: Box<dyn MessageFile>,
    metrics: Arc<Metrics>,
}

impl MessageFile for CountingFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write(bytes)
    }

    fn commit(self: Box<Self>, msg: Incoming) -> BoxFuture<'static, Result<(), SinkError>> {
        let CountingFile { inner, metrics } = *self;
        Box::pin(async move {
            let r = inner.commit(msg).await;
            match &r {
                Ok(()) => metrics.accepted(),
                Err(SinkError::Full) => metrics.rejected("queue_full"),
                Err(SinkError::Io) => metrics.rejected("spool_error"),
            }
            r
        })
    }
}

/// The figures read at scrape time.
#[derive(Debug)]
struct Scrape {
    live: Arc<OnceLock<Live>>,
    routes: Arc<RouteWatch>,
}

type Labels = Vec<(&'static str, String)>;

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Every state an identity can be in (`GET /status` names them alike).
const IDENTITY_STATES: [&str; 6] = [
    "idle",
    "ok",
    "needs_login",
    "reconsent_needed",
    "unavailable",
    "config_error",
];

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(live) = self.live.get() else {
            return Ok(());
        };
        let q = live.sched.stats();
        let none = Labels::new;
        gauge(
            &mut enc,
            "mailbridge_queue_messages",
            "Messages in the queue",
            &[(none(), q.depth as i64)],
        )?;
        gauge(
            &mut enc,
            "mailbridge_queue_deferred_messages",
            "Queued messages that failed at least one attempt",
            &[(none(), q.deferred as i64)],
        )?;
        gauge(
            &mut enc,
            "mailbridge_queue_in_flight",
            "Delivery attempts running",
            &[(none(), q.in_flight as i64)],
        )?;
        gauge(
            &mut enc,
            "mailbridge_queue_bounce_undeliverable_messages",
            "Bounces that could not be delivered, held for an operator",
            &[(none(), q.bounce_undeliverable as i64)],
        )?;
        gauge(
            &mut enc,
            "mailbridge_queue_loading_messages",
            "Messages found in the spool at start and not read yet (0 once loaded)",
            &[(none(), q.to_load as i64)],
        )?;
        gauge(
            &mut enc,
            "mailbridge_queue_oldest_message_age_seconds",
            "Age of the oldest queued message (0 when the queue is empty)",
            &[(none(), q.oldest_age_secs as i64)],
        )?;
        let router = live.sched.router();
        let state = router.state();
        self.routes.observe(&state);
        let rows: Vec<(Labels, i64)> = router
            .servers()
            .into_iter()
            .map(|(label, server)| {
                (
                    vec![("route", label.to_string()), ("server", server)],
                    i64::from(label == state.active),
                )
            })
            .collect();
        gauge(
            &mut enc,
            "mailbridge_route_active",
            "1 for the server mail goes through now, 0 for the other",
            &rows,
        )?;
        gauge(
            &mut enc,
            "mailbridge_route_active_since_seconds",
            "When the active server became active (Unix time)",
            &[(
                vec![("route", state.active.to_string())],
                state.since as i64,
            )],
        )?;
        let govs = router.governors();
        let stats: Vec<_> = govs.iter().map(|(l, g)| (*l, g.stats())).collect();
        let by_route = |f: &dyn Fn(&crate::transport::governor::GovernorStats) -> u64| {
            stats
                .iter()
                .map(|(l, s)| (vec![("route", l.to_string())], f(s)))
                .collect::<Vec<_>>()
        };
        counter(
            &mut enc,
            "mailbridge_throttle_pauses",
            "Pauses of a mailbox after the upstream asked to wait (Retry-After, back-off)",
            &by_route(&|s| s.throttled),
        )?;
        gauge(
            &mut enc,
            "mailbridge_throttle_paused_mailboxes",
            "Mailboxes paused by the throttle right now",
            &by_route(&|s| s.paused_keys),
        )?;
        gauge(
            &mut enc,
            "mailbridge_throttle_in_flight",
            "Attempts holding a throttle slot right now",
            &by_route(&|s| s.in_flight),
        )?;
        let mut states: Vec<(Labels, i64)> = Vec::new();
        let mut requests: Vec<(Labels, u64)> = Vec::new();
        for (upstream, registry) in live.reloader.oauth() {
            let doc = registry.status();
            let ids = doc["identities"].as_array().cloned().unwrap_or_default();
            for id in ids {
                let name = id["identity"].as_str().unwrap_or("").to_string();
                let now = id["state"].as_str().unwrap_or("");
                for s in IDENTITY_STATES {
                    let labels = vec![
                        ("upstream", upstream.to_string()),
                        ("identity", name.clone()),
                        ("state", s.to_string()),
                    ];
                    states.push((labels, i64::from(s == now)));
                }
                for outcome in ["ok", "unavailable", "config_error", "reconsent_needed"] {
                    let n = id["token_requests"][outcome].as_u64().unwrap_or(0);
                    let labels = vec![
                        ("upstream", upstream.to_string()),
                        ("identity", name.clone()),
                        ("outcome", outcome.to_string()),
                    ];
                    requests.push((labels, n));
                }
            }
        }
        gauge(
            &mut enc,
            "mailbridge_oauth_identity_state",
            "1 for the state each OAuth identity is in, 0 for the others",
            &states,
        )?;
        counter(
            &mut enc,
            "mailbridge_oauth_token_requests",
            "Answers of the token endpoint to refresh and client-credentials requests, by outcome",
            &requests,
        )?;
        gauge(
            &mut enc,
            "mailbridge_build_info",
            "The running version",
            &[(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                1i64,
            )],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(active: &'static str, since: u64) -> RouteState {
        RouteState {
            active,
            server: String::new(),
            since,
            reason: String::new(),
        }
    }

    #[test]
    fn route_changes_count_failovers_and_failbacks() {
        let w = RouteWatch::default();
        w.observe(&state("primary", 1));
        w.observe(&state("primary", 1));
        assert_eq!((w.failovers.get(), w.failbacks.get()), (0, 0));
        w.observe(&state("alternate", 5));
        assert_eq!((w.failovers.get(), w.failbacks.get()), (1, 0));
        w.observe(&state("primary", 9));
        assert_eq!((w.failovers.get(), w.failbacks.get()), (1, 1));
        // Away and back between two looks.
        w.observe(&state("primary", 12));
        assert_eq!((w.failovers.get(), w.failbacks.get()), (2, 2));
    }

    #[test]
    fn attempt_events_count_by_outcome_reply_class_and_throttling() {
        use crate::transport::Failure;
        let m = Metrics::new();
        let event = |outcome, failure: Option<Failure>| AttemptEvent {
            id: "x".into(),
            outcome,
            detail: String::new(),
            route: "alternate",
            age: std::time::Duration::from_millis(300),
            failure,
        };
        m.attempt(&event(AttemptOutcome::Delivered, None));
        let mut busy = Failure::transient("429 Too Many Requests");
        busy.throttled = true;
        m.attempt(&event(AttemptOutcome::Deferred, Some(busy)));
        let mut refused = Failure::permanent("550 5.7.1 no");
        refused.reply_code = Some(550);
        m.attempt(&event(AttemptOutcome::Bounced, Some(refused)));
        m.accepted();
        m.rejected("queue_full");
        let text = m.render();
        for line in [
            "mailbridge_inbound_accepted_total 1",
            "mailbridge_inbound_rejected_total{reason=\"queue_full\"} 1",
            "mailbridge_delivery_attempts_total{route=\"alternate\",protocol=\"\",outcome=\"delivered\"} 1",
            "mailbridge_delivery_attempts_total{route=\"alternate\",protocol=\"\",outcome=\"bounced\"} 1",
            "mailbridge_upstream_replies_total{route=\"alternate\",protocol=\"\",class=\"2xx\"} 1",
            "mailbridge_upstream_replies_total{route=\"alternate\",protocol=\"\",class=\"5xx\"} 1",
            "mailbridge_upstream_replies_total{route=\"alternate\",protocol=\"\",class=\"none\"} 1",
            "mailbridge_upstream_throttled_total{route=\"alternate\",protocol=\"\"} 1",
            "mailbridge_delivery_latency_seconds_bucket{route=\"alternate\",protocol=\"\",le=\"0.5\"} 1",
            "mailbridge_delivery_latency_seconds_bucket{route=\"alternate\",protocol=\"\",le=\"0.25\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
