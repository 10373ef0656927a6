//! The local admin HTTP endpoint: health, status (active server and why, queue figures), failback and queue control; state-changing calls need the admin token.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::scheduler::Scheduler;

/// What the handlers need.
#[derive(Clone)]
pub struct AdminState {
    /// The running scheduler (queue, router).
    pub scheduler: Scheduler,
    /// Bearer token required for state-changing calls.
    pub token: Secret,
    /// When this process started.
    pub started: SystemTime,
}

/// The admin routes.
pub fn routes(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/failback", post(failback))
        .route("/queue/{id}/retry", post(retry))
        .route("/queue/{id}", delete(remove))
        .with_state(state)
}

/// Serve the admin endpoint on a bound listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    let app = routes(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}

fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let want = state.token.expose().as_bytes();
    let given = given.trim().as_bytes();
    // Compare in constant time so the token cannot be guessed byte by byte.
    want.len() == given.len()
        && !want.is_empty()
        && want
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
    })
}

async fn status(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(status_json(&state))
}

async fn failback(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let router = state.scheduler.router();
    let changed = router.failback("failback requested by operator");
    Json(json!({ "changed": changed, "route": router.state() })).into_response()
}

async fn retry(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if state.scheduler.retry_now(&id).await {
        Json(json!({ "id": id, "retry": "now" })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such message in the queue")
    }
}

async fn remove(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state.scheduler.delete(&id).await {
        Ok(true) => Json(json!({ "id": id, "deleted": true })).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "no such message in the queue"),
        Err(e) => error(StatusCode::CONFLICT, &e),
    }
}
