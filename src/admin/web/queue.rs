//! The queue page: every queued message (id, sender, recipients, age, attempts, last error) with retry and delete, "retry all", and one message's headers.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::html::{age, csrf_field, date, escape, see_other};
use super::{SignedForm, problem, signed_in, signed_in_page};
use crate::admin::Ctx;
use crate::spool::{Meta, RcptStatus};

/// Rows shown at most (the oldest first).
const MAX_ROWS: usize = 500;
/// Header bytes shown at most.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How many messages are queued, and the metadata of the oldest
/// `MAX_ROWS` (ids sort by arrival), read from disk: a large queue is never
/// read whole for a page.
async fn oldest(ctx: &Ctx) -> Result<(usize, Vec<Meta>), String> {
    let root = ctx.admin.scheduler.spool().root().to_path_buf();
    let (total, mut metas) = tokio::task::spawn_blocking(move || {
        let ids = crate::spool::Spool::list_ids(&root)?;
        let page = crate::spool::Spool::read_metas(&root, &ids[..ids.len().min(MAX_ROWS)])?;
        Ok::<_, std::io::Error>((ids.len(), page))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read the queue: {e}"))?;
    metas.sort_by(|a, b| a.received_at.cmp(&b.received_at).then(a.id.cmp(&b.id)));
    Ok((total, metas))
}

pub(super) async fn list(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    let c = match signed_in(&ctx, &headers, "/queue") {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let (total, metas) = match oldest(&ctx).await {
        Ok(m) => m,
        Err(e) => return problem(&ctx, &c, StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let now = crate::scheduler::now_unix();
    let mut body = format!(
        "<section><p id=\"queue-count\">{} message{} in the queue.</p>",
        total,
        if total == 1 { "" } else { "s" }
    );
    if ctx.admin.scheduler.is_loading() {
        body.push_str("<p class=\"help\">The queue found at start is still being read; its messages are delivered as they are read.</p>");
    }
    if !metas.is_empty() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/ui/queue/retry-all\">{}<button type=\"submit\">Retry all now</button></form>",
            csrf_field(&c.csrf)
        ));
        body.push_str("<table><tr><th>Id</th><th>Sender</th><th>Recipients</th><th>Received</th><th>Attempts</th><th>Last error</th><th></th></tr>");
        for m in &metas {
            let rcpts: Vec<String> = m
                .rcpts
                .iter()
                .map(|r| {
                    let mark = match r.status {
                        RcptStatus::Pending => "",
                        RcptStatus::Delivered => " (delivered)",
                        RcptStatus::Failed => " (failed)",
                    };
                    format!("{}{mark}", escape(&r.addr))
                })
                .collect();
            let next = if m.bounce_undeliverable {
                "held for an operator".to_string()
            } else if m.next_attempt > now {
                format!("next try {}", date(m.next_attempt))
            } else {
                "due now".to_string()
            };
            let id = escape(&m.id);
            body.push_str(&format!(
                "<tr><td><a href=\"/messages/{id}\"><code>{id}</code></a></td><td>{}</td><td>{}</td>\
<td>{}<br><span class=\"help\">{} ago</span></td><td>{}<br><span class=\"help\">{}</span></td><td>{}</td>\
<td><form method=\"post\" action=\"/ui/queue/retry\">{csrf}<input type=\"hidden\" name=\"id\" value=\"{id}\"><button type=\"submit\">Retry</button></form>\
<form method=\"post\" action=\"/ui/queue/delete\">{csrf}<input type=\"hidden\" name=\"id\" value=\"{id}\"><button class=\"plain\" type=\"submit\">Delete</button></form></td></tr>",
                escape(if m.from.is_empty() { "<>" } else { &m.from }),
                rcpts.join("<br>"),
                escape(&date(m.received_at)),
                escape(&age(now.saturating_sub(m.received_at))),
                m.attempts,
                escape(&next),
                escape(m.last_error.as_deref().unwrap_or("")),
                csrf = csrf_field(&c.csrf),
            ));
        }
        body.push_str("</table>");
        if total > MAX_ROWS {
            body.push_str(&format!("<p class=\"help\">The oldest {MAX_ROWS} are shown; <code>mailbridge queue list</code> lists all.</p>"));
        }
    }
    body.push_str("</section>");
    signed_in_page(&ctx, &c, StatusCode::OK, "Queue", &body)
}

pub(super) async fn headers(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let c = match signed_in(&ctx, &headers, "/messages") {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if !crate::spool::is_valid_id(&id) {
        return problem(
            &ctx,
            &c,
            StatusCode::NOT_FOUND,
            "No such message in the queue.",
        );
    }
    let spool = ctx.admin.scheduler.spool().clone();
    let i = id.clone();
    let read =
        tokio::task::spawn_blocking(move || (spool.read_meta(&i), spool.read_body(&i))).await;
    let Ok((Ok(meta), Ok(body))) = read else {
        return problem(
            &ctx,
            &c,
            StatusCode::NOT_FOUND,
            "No such message in the queue (it may have been delivered).",
        );
    };
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len())
        .min(MAX_HEADER_BYTES);
    let head = String::from_utf8_lossy(&body[..end]).replace("\r\n", "\n");
    let page = format!(
        "<section><p>From <code>{}</code> to <code>{}</code>, received {}, {} attempt(s), {} bytes.</p>\
<h2>Headers</h2><pre>{}</pre><p><a href=\"/queue\">Back to the queue</a></p></section>",
        escape(&meta.from),
        escape(&meta.pending().join(", ")),
        escape(&date(meta.received_at)),
        meta.attempts,
        meta.size,
        escape_keep_lines(&head)
    );
    signed_in_page(&ctx, &c, StatusCode::OK, &format!("Message {id}"), &page)
}

/// Escape each line (control characters inside a line become spaces).
fn escape_keep_lines(text: &str) -> String {
    text.lines().map(escape).collect::<Vec<_>>().join("\n")
}

pub(super) async fn retry(
    State(ctx): State<Arc<Ctx>>,
    SignedForm(c, form): SignedForm,
) -> Response {
    let id = form.get("id").cloned().unwrap_or_default();
    if ctx.admin.scheduler.retry_now(&id).await {
        ctx.web
            .sessions
            .flash(&c.id, true, format!("Message {id} will be tried now."));
    } else {
        ctx.web.sessions.flash(
            &c.id,
            false,
            format!("Message {id} is no longer in the queue."),
        );
    }
    see_other("/queue")
}

pub(super) async fn delete(
    State(ctx): State<Arc<Ctx>>,
    SignedForm(c, form): SignedForm,
) -> Response {
    let id = form.get("id").cloned().unwrap_or_default();
    let (ok, text) = match ctx.admin.scheduler.delete(&id).await {
        Ok(true) => (
            true,
            format!("Message {id} was deleted without being delivered."),
        ),
        Ok(false) => (false, format!("Message {id} is no longer in the queue.")),
        Err(e) => (false, format!("Message {id} was not deleted: {e}")),
    };
    ctx.web.sessions.flash(&c.id, ok, text);
    see_other("/queue")
}

pub(super) async fn retry_all(
    State(ctx): State<Arc<Ctx>>,
    SignedForm(c, _): SignedForm,
) -> Response {
    let n = ctx.admin.scheduler.retry_all().await;
    ctx.web
        .sessions
        .flash(&c.id, true, format!("{n} message(s) will be tried now."));
    see_other("/queue")
}
