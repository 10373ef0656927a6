//! `POST /send-test` (the seed's "Send a sample mail"): a small message goes through the spool and the real route like any other, and the answer carries the first attempt's result and the upstream's text.

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
    let to = req.to.trim().to_string();
    if !crate::address::is_valid_mailbox(&to) {
        return error(StatusCode::BAD_REQUEST, "`to` is not an email address");
    }
    let x = &ctx.extras;
    let id = crate::spool::new_id();
    let message = sample(&x.send_test_from, &to, &id, &x.hostname);
    let mut meta = Meta::new(
        id.clone(),
        x.send_test_from.clone(),
        vec![to.clone()],
        message.len() as u64,
        crate::scheduler::now_unix(),
    );
    meta.message_id = Some(format!("<{id}.test@{}>", x.hostname));
    meta.client = "admin send-test".into();
    let scheduler = ctx.admin.scheduler.clone();
    // Subscribe before the message can be attempted, so no event is missed.
    let mut events = scheduler.subscribe();
    let sub = Submission::in_memory(&scheduler, meta, message);
    match scheduler.submit(sub).await {
        Ok(_) => {}
        Err(SpoolError::Full(why)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("queue full: {why}"),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
    tracing::info!(id = %id, to = %crate::text::for_log(&to), "queued test message");
    let wait = x.send_test_wait;
    let first = tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Ok(AttemptEvent {
                    id: got,
                    outcome,
                    detail,
                }) if got == id => return Some((outcome, detail)),
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    })
    .await;
    match first {
        Ok(Some((outcome, detail))) => {
            let result = match outcome {
                AttemptOutcome::Delivered => "delivered",
                AttemptOutcome::Deferred => "deferred",
                AttemptOutcome::Bounced => "bounced",
            };
            Json(json!({ "id": id, "result": result, "detail": detail })).into_response()
        }
        Ok(None) => error(StatusCode::SERVICE_UNAVAILABLE, "the scheduler stopped"),
        Err(_) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "id": id,
                "result": "pending",
                "detail": format!("no result within {}s; the message stays queued (see `mailbridge queue show {id}`)", wait.as_secs()),
            })),
        )
            .into_response(),
    }
}
