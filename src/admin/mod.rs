//! The local admin HTTP endpoint: the admin web page, health and readiness probes, status (active server and why, queue figures, OAuth token state), Prometheus metrics, failback, queue control, OAuth sign-in and a sample mail; everything but `/healthz`, `/readyz`, the login form and the provider's OAuth callback needs the admin token (in a header, never in a URL) or a signed-in page session, and a request for another `Host` gets `421`.

mod oauth;
mod send_test;
pub mod server;
pub mod web;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::Secret;
use crate::config::Config;
use crate::oauth::{Registries, Registry};
use crate::scheduler::Scheduler;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// What the handlers need.
#[derive(Clone)]
pub struct AdminState {
    /// The running scheduler (queue, router).
    pub scheduler: Scheduler,
    /// Bearer token required for state-changing calls.
    pub token: Secret,
    /// When this process started.
    pub started: SystemTime,
    /// Applies the configuration file again (absent when the relay runs
    /// without a file, as in tests).
    pub reloader: Option<crate::reload::Reloader>,
}

/// What the OAuth and send-test routes need besides [`AdminState`].
#[derive(Clone, Default)]
pub struct Extras {
    /// OAuth registries by upstream table (`upstream`, `upstream.alternate`).
    pub oauth: Vec<(&'static str, Arc<Registry>)>,
    /// How long `POST /send-test` waits for the first attempt's result.
    pub send_test_wait: Duration,
    /// Envelope sender and `From` of the sample mail.
    pub send_test_from: String,
    /// Our host name (the sample's `Message-ID`).
    pub hostname: String,
    /// `Host` names served besides loopback ones: `admin.hostnames` and the
    /// host of each `redirect_url`; other names get `421`.
    pub hostnames: Vec<String>,
    /// What `GET /metrics` shows (absent: `404`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Extras {
    /// The extras a configuration asks for, with its OAuth registries taken
    /// from `oauth` (the set routing uses, so both see the same identities).
    pub fn from_config(cfg: &Config, oauth: &Registries) -> Result<Extras, String> {
        let sample = Sample::from_config(cfg);
        Ok(Extras {
            oauth: oauth.for_config(cfg)?,
            send_test_wait: sample.wait,
            send_test_from: sample.from,
            hostname: sample.hostname,
            hostnames: allowed_hostnames(cfg),
            metrics: None,
        })
    }
}

/// What a sample mail is sent with.
pub(crate) struct Sample {
    /// Envelope sender and `From`.
    pub from: String,
    /// Our host name (its `Message-ID`).
    pub hostname: String,
    /// How long to wait for the first attempt's result.
    pub wait: Duration,
}

impl Sample {
    fn from_config(cfg: &Config) -> Sample {
        let hostname = cfg.effective_hostname();
        let mailbox = cfg.upstream.effective_mailbox();
        Sample {
            from: if mailbox.is_empty() {
                format!("mailbridge@{hostname}")
            } else {
                mailbox.to_string()
            },
            wait: Duration::from_secs(cfg.upstream.timeout_secs.max(1) * 2),
            hostname,
        }
    }
}

/// `admin.hostnames`, the hosts of the `redirect_url`s (the provider sends
/// the browser there), and a specific non-loopback `admin.address`.
fn allowed_hostnames(cfg: &Config) -> Vec<String> {
    let mut out = cfg.admin.hostnames.clone();
    let mut ups = vec![&cfg.upstream];
    if let Some(a) = cfg.upstream.alternate.as_deref() {
        ups.push(a);
    }
    for u in ups {
        if let Ok(url) = url::Url::parse(&u.oauth.redirect_url)
            && let Some(h) = url.host_str()
        {
            out.push(h.trim_start_matches('[').trim_end_matches(']').to_string());
        }
    }
    if let Ok(a) = cfg.admin.address.parse::<std::net::SocketAddr>()
        && !a.ip().is_unspecified()
    {
        out.push(a.ip().to_string());
    }
    out.sort();
    out.dedup();
    out
}

/// Handler state of the routes that need [`Extras`].
pub(crate) struct Ctx {
    admin: Arc<AdminState>,
    extras: Extras,
    web: web::Web,
}

impl Ctx {
    /// The sample mail's settings in force: from the reloaded configuration
    /// when the relay reloads its file, else the ones given at start.
    pub(crate) fn sample(&self) -> Sample {
        match &self.admin.reloader {
            Some(r) => Sample::from_config(&r.config()),
            None => Sample {
                from: self.extras.send_test_from.clone(),
                hostname: self.extras.hostname.clone(),
                wait: self.extras.send_test_wait,
            },
        }
    }

    /// The OAuth registries in force: the reloaded ones when the relay
    /// reloads its file, else the ones given at start.
    pub(crate) fn oauth(&self) -> Vec<(&'static str, Arc<Registry>)> {
        current_oauth(&self.admin, &self.extras)
    }
}

fn current_oauth(state: &AdminState, extras: &Extras) -> Vec<(&'static str, Arc<Registry>)> {
    match &state.reloader {
        Some(r) => r.oauth(),
        None => extras.oauth.clone(),
    }
}

/// The admin routes without OAuth and send-test (see [`routes_with`]).
pub fn routes(state: Arc<AdminState>) -> Router {
    routes_with(state, Extras::default())
}

/// Every admin route: health, status, failback, queue control, and
/// `/oauth/start`, `/oauth/callback`, `/send-test`.
pub fn routes_with(state: Arc<AdminState>, extras: Extras) -> Router {
    let hostnames = Arc::new(extras.hostnames.clone());
    let ctx = Arc::new(Ctx {
        admin: state.clone(),
        extras,
        web: web::Web::default(),
    });
    // `/status` and `/metrics` show mailboxes, servers and errors: the token
    // (or a signed-in page session) is needed. Prometheus sends the token
    // from `authorization.credentials_file`.
    let with_extras = web::routes()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/oauth/start", post(oauth::start))
        .route("/oauth/callback", get(oauth::callback));
    let with_extras = with_extras.route("/send-test", post(send_test::send_test));
    // State-changing calls need the admin token.
    let protected = Router::new()
        .route("/failback", post(failback))
        .route("/queue/{id}/retry", post(retry))
        .route("/queue/retry-all", post(retry_all))
        .route("/queue/{id}", delete(remove))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state)
        .merge(with_extras.with_state(ctx))
        .layer(axum::middleware::from_fn_with_state(
            hostnames,
            server::check_host,
        ))
}

/// Serve the admin endpoint on a bound listener until `shutdown` (without
/// OAuth and send-test; see [`serve_with`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    serve_with(listener, state, Extras::default(), shutdown).await
}

/// Serve every admin route on a bound listener until `shutdown`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    extras: Extras,
    shutdown: CancellationToken,
) {
    // A connection may carry the slowest request, `POST /send-test`.
    let lifetime = (extras.send_test_wait + Duration::from_secs(60)).max(Duration::from_secs(120));
    let app = routes_with(state, extras);
    server::serve(listener, app, lifetime, shutdown).await
}

/// Refuse a request without the admin token.
async fn require_token(
    State(state): State<Arc<AdminState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !authorized(&state, req.headers()) {
        return unauthorized();
    }
    next.run(req).await
}

fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    token_matches(&state.token, given)
}

/// `given` equals the admin token, compared in constant time (`subtle`) so
/// the token cannot be guessed byte by byte. An empty token matches nothing.
fn token_matches(token: &Secret, given: &str) -> bool {
    let want = token.expose().as_bytes();
    !want.is_empty() && bool::from(want.ct_eq(given.trim().as_bytes()))
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin token (Authorization: Bearer …)",
    )
}

/// The status document (never contains a secret).
pub fn status_json(state: &AdminState) -> serde_json::Value {
    let router = state.scheduler.router();
    let uptime = SystemTime::now()
        .duration_since(state.started)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": uptime,
        "route": router.state(),
        "servers": router.servers().into_iter().map(|(label, server)| json!({"label": label, "server": server})).collect::<Vec<_>>(),
        "queue": state.scheduler.stats(),
        "throttle": router.throttle(),
        "corrupt": corrupt_json(&state.scheduler.spool().corrupt_summary()),
    })
}

/// `corrupt/` in the status: how many entries were moved aside and the newest.
fn corrupt_json(c: &crate::spool::CorruptSummary) -> serde_json::Value {
    json!({
        "count": c.count,
        "newest": c.newest.as_ref().map(|(name, at)| json!({"name": name, "moved_at": at})),
    })
}

/// The status document with the OAuth token state of every identity
/// (`"oauth"`: one entry per upstream table; never a token).
pub fn status_json_with(state: &AdminState, extras: &Extras) -> serde_json::Value {
    let mut doc = status_json(state);
    let registries = current_oauth(state, extras);
    if !registries.is_empty()
        && let Some(obj) = doc.as_object_mut()
    {
        let oauth: Vec<serde_json::Value> = registries
            .iter()
            .map(|(label, r)| {
                let mut v = r.status();
                if let Some(o) = v.as_object_mut() {
                    o.insert("upstream".into(), json!(label));
                }
                v
            })
            .collect();
        obj.insert("oauth".into(), json!(oauth));
    }
    doc
}

async fn status(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    if !authorized(&ctx.admin, &headers) && ctx.web.sessions.current(&headers).is_none() {
        return unauthorized();
    }
    Json(status_json_with(&ctx.admin, &ctx.extras)).into_response()
}

async fn metrics(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    if !authorized(&ctx.admin, &headers) && ctx.web.sessions.current(&headers).is_none() {
        return unauthorized();
    }
    match &ctx.extras.metrics {
        Some(m) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            m.render(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "metrics are not enabled"),
    }
}

async fn failback(State(state): State<Arc<AdminState>>) -> Response {
    let router = state.scheduler.router();
    let changed = router.failback("failback requested by operator");
    Json(json!({ "changed": changed, "route": router.state() })).into_response()
}

async fn retry(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    if state.scheduler.retry_now(&id).await {
        Json(json!({ "id": id, "retry": "now" })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such message in the queue")
    }
}

async fn retry_all(State(state): State<Arc<AdminState>>) -> Response {
    let n = state.scheduler.retry_all().await;
    Json(json!({ "retried": n })).into_response()
}

async fn remove(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    match state.scheduler.delete(&id).await {
        Ok(true) => Json(json!({ "id": id, "deleted": true })).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "no such message in the queue"),
        Err(e) => error(StatusCode::CONFLICT, &e),
    }
}

/// Whether mail can be accepted now: the scheduler runs, the spool takes a
/// write, the queue is under `spool.max_messages`. Upstream trouble does not
/// count (it shows in `status`): an unready sidecar would be restarted and
/// stop accepting mail that it could keep until the upstream is back.
pub async fn readiness(state: &AdminState) -> (bool, serde_json::Value) {
    let sched = &state.scheduler;
    let spool = sched.spool().clone();
    let (depth, max) = (spool.len(), spool.max_messages());
    let writable = tokio::task::spawn_blocking(move || {
        let probe = spool
            .root()
            .join("tmp")
            .join(format!(".readyz-{}", crate::spool::new_id()));
        let r = std::fs::write(&probe, b"ready?\n");
        let _ = std::fs::remove_file(&probe);
        r.map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let running = sched.is_running();
    let under_limit = depth < max;
    let ready = running && writable.is_ok() && under_limit;
    (
        ready,
        json!({
            "ready": ready,
            "scheduler_running": running,
            "spool_writable": writable.is_ok(),
            "spool_error": writable.err(),
            "queue_depth": depth,
            "queue_limit": max,
        }),
    )
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let (ready, doc) = readiness(&state).await;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(doc)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_matches_only_itself() {
        let t = Secret::new("s3cret-token");
        assert!(token_matches(&t, "s3cret-token"));
        assert!(token_matches(&t, " s3cret-token "));
        for wrong in [
            "",
            "s3cret-toke",
            "s3cret-token2",
            "S3cret-token",
            "x3cret-token",
        ] {
            assert!(!token_matches(&t, wrong), "{wrong}");
        }
        assert!(!token_matches(&Secret::new(""), ""));
    }
}
