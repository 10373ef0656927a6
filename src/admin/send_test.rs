//! `POST /send-test` (the seed's "Send a sample mail"): a small message goes through the spool and the real route once, the answer carries that attempt's result and the upstream's text, and the message leaves the queue whatever the outcome.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::{Ctx, error, unauthorized};
use crate::scheduler::submit::Submission;
use crate::scheduler::{AttemptEvent, AttemptOutcome};
use crate::spool::{Meta, SpoolError};

/// `{"to": "addr"}`.
#[derive(Deserialize)]
pub(super) struct SendTest {
    to: String,
}

/// The sample message (CRLF line endings).
pub(crate) fn sample(from: &str, to: &str, id: &str, hostname: &str) -> Vec<u8> {
    let date = chrono::Utc::now().to_rfc2822();
    format!(
        "From: mailbridge <{from}>\r\n\
To: <{to}>\r\n\
Subject: mailbridge test message\r\n\
Date: {date}\r\n\
Message-ID: <{id}.test@{hostname}>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
This is a test message sent by mailbridge on {hostname} (send-test).\r\n\
If you can read it, delivery through the configured upstream works.\r\n"
    )
    .into_bytes()
}

/// The outcome of one sample mail.
pub(crate) struct SampleResult {
    /// Queue id it had.
    pub id: String,
    /// `delivered`, `deferred`, `bounced` or `pending` (no answer in time).
    pub result: &'static str,
    /// The upstream's answer (its code and text), or where it went.
    pub detail: String,
}

/// Store a sample mail to `to`, hand it to the scheduler and wait for its
/// first (and only) attempt. It is never retried: whatever the outcome it
/// leaves the queue, so a failed one is not delivered days later.
pub(crate) async fn send_sample(ctx: &Ctx, to: &str) -> Result<SampleResult, (StatusCode, String)> {
    let to = to.trim().to_string();
    if !crate::address::is_valid_mailbox(&to) {
        return Err((
            StatusCode::BAD_REQUEST,
            "`to` is not an email address".into(),
        ));
    }
    let x = ctx.sample();
    let id = crate::spool::new_id();
    let message = sample(&x.from, &to, &id, &x.hostname);
    let mut meta = Meta::new(
        id.clone(),
        x.from.clone(),
        vec![to.clone()],
        message.len() as u64,
        crate::scheduler::now_unix(),
    );
    meta.message_id = Some(format!("<{id}.test@{}>", x.hostname));
    meta.client = "admin send-test".into();
    meta.sample = true;
    let scheduler = ctx.admin.scheduler.clone();
    // Subscribe before the message can be attempted, so no event is missed.
    let mut events = scheduler.subscribe();
    let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, e);
    let sub = Submission::in_memory(&scheduler, meta, message);
    match scheduler.submit(sub).await {
        Ok(_) => {}
        Err(SpoolError::Full(why)) => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("queue full: {why}"),
            ));
        }
        Err(e) => return Err(internal(e.to_string())),
    }
    tracing::info!(id = %id, to = %crate::text::for_log(&to), "queued sample mail");
    let wait = x.wait;
    let first = tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Ok(AttemptEvent {
                    id: got,
                    outcome,
                    detail,
                    ..
                }) if got == id => return Some((outcome, detail)),
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    })
    .await;
    match first {
        Ok(Some((outcome, detail))) => Ok(SampleResult {
            id,
            result: match outcome {
                AttemptOutcome::Delivered => "delivered",
                AttemptOutcome::Deferred => "deferred",
                AttemptOutcome::Bounced => "bounced",
            },
            detail,
        }),
        Ok(None) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler stopped".into(),
        )),
        Err(_) => Ok(SampleResult {
            detail: format!(
                "no answer from the upstream within {}s; the attempt goes on and the sample mail is removed when it ends (it is not retried)",
                wait.as_secs()
            ),
            id,
            result: "pending",
        }),
    }
}

pub(super) async fn send_test(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    body: Option<Json<SendTest>>,
) -> Response {
    if !super::authorized(&ctx.admin, &headers) {
        return unauthorized();
    }
    let Some(Json(req)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"to\": \"address\"}",
        );
    };
    match send_sample(&ctx, &req.to).await {
        Ok(r) => {
            let code = if r.result == "pending" {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (
                code,
                Json(json!({ "id": r.id, "result": r.result, "detail": r.detail })),
            )
                .into_response()
        }
        Err((code, message)) => error(code, &message),
    }
}
