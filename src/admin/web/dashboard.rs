//! The dashboard: the active server (with the seed's alternate-server message and "Return to the primary server"), the queue's figures and why mail waits, each OAuth identity with "Connect account", and "Send a sample mail".

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::html::{age, csrf_field, date, escape, see_other};
use super::{SignedForm, signed_in, signed_in_page};
use crate::admin::Ctx;

/// How many distinct reasons the dashboard lists.
const REASONS_SHOWN: usize = 8;
/// Messages (the oldest) whose metadata is read for the reasons.
const REASONS_READ: usize = 500;

pub(super) async fn show(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    let c = match signed_in(&ctx, &headers, "/") {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let mut body = String::new();
    body.push_str(&server_section(&ctx, &c.csrf));
    body.push_str(&queue_section(&ctx).await);
    body.push_str(&oauth_section(&ctx, &c.csrf));
    body.push_str(&format!(
        "<section><h2>Send a sample mail</h2>\
<p class=\"help\">Sends a short message through the active server now and shows the server's answer. \
It is tried once: if it fails, nothing stays in the queue.</p>\
<form method=\"post\" action=\"/ui/send-sample\">{}\
<label for=\"sample-to\">Email address</label><input type=\"email\" id=\"sample-to\" name=\"to\" required>\
<p><button type=\"submit\">Send a sample mail</button></p></form></section>",
        csrf_field(&c.csrf)
    ));
    signed_in_page(&ctx, &c, StatusCode::OK, "Outgoing mail", &body)
}

fn server_section(ctx: &Ctx, csrf: &str) -> String {
    let router = ctx.admin.scheduler.router();
    let st = router.state();
    let mut out = String::from("<section><h2>Mail server</h2>");
    if st.active == "alternate" {
        out.push_str(&format!(
            "<div class=\"banner warn\" id=\"alternate-notice\">Mail is being sent through the alternate server since {}, because {}.</div>\
<form method=\"post\" action=\"/ui/failback\">{}<button type=\"submit\">Return to the primary server</button></form>",
            escape(&date(st.since)),
            escape(st.reason.trim_end_matches('.')),
            csrf_field(csrf)
        ));
    }
    out.push_str("<table><tr><th></th><th>Server</th><th></th></tr>");
    for (label, server) in router.servers() {
        let active = if label == st.active {
            "<b>in use</b>"
        } else {
            ""
        };
        out.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td>{active}</td></tr>",
            escape(label),
            escape(&server)
        ));
    }
    out.push_str(&format!(
        "</table><p class=\"help\">In use since {} ({}).</p></section>",
        escape(&date(st.since)),
        escape(&st.reason)
    ));
    out
}

async fn queue_section(ctx: &Ctx) -> String {
    let stats = ctx.admin.scheduler.stats();
    let root = ctx.admin.scheduler.spool().root().to_path_buf();
    // The reasons of the oldest messages only: a large queue is not read
    // whole for a page.
    let listed = tokio::task::spawn_blocking(move || {
        let ids = crate::spool::Spool::list_ids(&root)?;
        crate::spool::Spool::read_metas(&root, &ids[..ids.len().min(REASONS_READ)])
    })
    .await;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    if let Ok(Ok(metas)) = &listed {
        for m in metas {
            let why = match (&m.last_error, m.bounce_undeliverable) {
                (_, true) => "undeliverable bounce, kept for an operator".to_string(),
                (Some(e), _) => e.clone(),
                (None, _) => "not attempted yet".to_string(),
            };
            *reasons.entry(why).or_default() += 1;
        }
    }
    let mut out = format!(
        "<section><h2>Queue</h2><p id=\"queue-count\">{} message{} waiting",
        stats.depth,
        if stats.depth == 1 { "" } else { "s" }
    );
    if stats.depth > 0 {
        out.push_str(&format!(
            "; the oldest arrived {} ({} ago)",
            escape(&date(stats.oldest_received_at)),
            escape(&age(stats.oldest_age_secs))
        ));
    }
    out.push_str(&format!(
        ". {} being delivered now, {} waiting for a retry.</p>",
        stats.in_flight, stats.deferred
    ));
    if stats.loading {
        out.push_str(&format!(
            "<p class=\"help\">Reading the queue found at start: {} message{} still to read.</p>",
            stats.to_load,
            if stats.to_load == 1 { "" } else { "s" }
        ));
    }
    if !reasons.is_empty() {
        let mut by_count: Vec<(String, usize)> = reasons.into_iter().collect();
        by_count.sort_by_key(|b| std::cmp::Reverse(b.1));
        let head = if stats.depth > REASONS_READ {
            format!("Why mail is waiting (the oldest {REASONS_READ})")
        } else {
            "Why mail is waiting".to_string()
        };
        out.push_str(&format!("<table><tr><th>{head}</th><th>Messages</th></tr>"));
        for (why, n) in by_count.into_iter().take(REASONS_SHOWN) {
            out.push_str(&format!("<tr><td>{}</td><td>{n}</td></tr>", escape(&why)));
        }
        out.push_str("</table>");
    }
    out.push_str("<p><a href=\"/queue\">Open the queue</a></p></section>");
    out
}

/// Words for an identity's state.
fn state_text(state: &str) -> &'static str {
    match state {
        "ok" => "connected",
        "idle" => "not used yet",
        "needs_login" => "not connected: sign in with Connect account",
        "reconsent_needed" => "consent expired or revoked: connect the account again",
        "unavailable" => "the token endpoint is unreachable; retrying",
        "config_error" => "the provider refuses the client settings",
        _ => "unknown",
    }
}

fn oauth_section(ctx: &Ctx, csrf: &str) -> String {
    let regs = ctx.oauth();
    if regs.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "<section><h2>OAuth accounts</h2><table><tr><th>Server</th><th>Account</th><th>State</th><th>Token valid until</th><th></th></tr>",
    );
    for (label, registry) in &regs {
        let status = registry.status();
        let browser = status["flow"] == "authorization_code";
        let idents = status["identities"].as_array().cloned().unwrap_or_default();
        for ident in idents {
            let name = ident["identity"].as_str().unwrap_or("");
            let state = ident["state"].as_str().unwrap_or("");
            let until = ident["access_token_expires_at"]
                .as_u64()
                .map(date)
                .unwrap_or_else(|| "-".into());
            let mut what = state_text(state).to_string();
            if let Some(e) = ident["last_error"].as_str() {
                what.push_str(&format!(" ({e})"));
            }
            let button = if browser {
                format!(
                    "<form method=\"post\" action=\"/ui/connect\">{}\
<input type=\"hidden\" name=\"upstream\" value=\"{}\"><input type=\"hidden\" name=\"identity\" value=\"{}\">\
<button type=\"submit\">Connect account</button></form>",
                    csrf_field(csrf),
                    escape(label),
                    escape(name)
                )
            } else {
                String::new()
            };
            out.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td class=\"oauth-state\" data-state=\"{}\">{}</td><td>{}</td><td>{button}</td></tr>",
                escape(label),
                escape(name),
                escape(state),
                escape(&what),
                escape(&until)
            ));
        }
    }
    out.push_str("</table></section>");
    out
}

pub(super) async fn failback(
    State(ctx): State<Arc<Ctx>>,
    SignedForm(c, _): SignedForm,
) -> Response {
    let router = ctx.admin.scheduler.router();
    if router.failback("failback requested on the admin page") {
        ctx.web.sessions.flash(
            &c.id,
            true,
            format!(
                "Mail goes through the primary server again ({}).",
                router.state().server
            ),
        );
    } else {
        ctx.web
            .sessions
            .flash(&c.id, true, "The primary server was already in use.");
    }
    see_other("/")
}

pub(super) async fn send_sample(
    State(ctx): State<Arc<Ctx>>,
    SignedForm(c, form): SignedForm,
) -> Response {
    let to = form.get("to").map(String::as_str).unwrap_or("");
    let (ok, text) = match crate::admin::send_test::send_sample(&ctx, to).await {
        Ok(r) if r.result == "delivered" => (
            true,
            format!("Sample mail to {}: sent ({}).", to.trim(), r.detail),
        ),
        Ok(r) if r.result == "pending" => {
            (false, format!("Sample mail to {}: {}", to.trim(), r.detail))
        }
        Ok(r) => (
            false,
            format!(
                "Sample mail to {}: not sent. The server answered: {} (nothing was left in the queue)",
                to.trim(),
                r.detail
            ),
        ),
        Err((_, e)) => (false, format!("Sample mail not sent: {e}")),
    };
    ctx.web.sessions.flash(&c.id, ok, text);
    see_other("/")
}

pub(super) async fn connect(
    State(ctx): State<Arc<Ctx>>,
    SignedForm(c, form): SignedForm,
) -> Response {
    let wanted = form
        .get("upstream")
        .map(String::as_str)
        .unwrap_or("upstream");
    let regs = ctx.oauth();
    let Some((_, registry)) = regs.iter().find(|(l, _)| *l == wanted) else {
        ctx.web
            .sessions
            .flash(&c.id, false, format!("No OAuth settings for {wanted}."));
        return see_other("/");
    };
    let identity = form
        .get("identity")
        .map(String::as_str)
        .filter(|s| !s.is_empty());
    match registry.start_login(identity) {
        Ok(url) => {
            let state = url::Url::parse(&url).ok().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "state")
                    .map(|(_, v)| v.into_owned())
            });
            if let Some(state) = state {
                ctx.web.sessions.started_consent(&c.id, &state);
            }
            // The provider's consent page; it sends the browser back to /oauth/callback.
            see_other(&url)
        }
        Err(e) => {
            ctx.web
                .sessions
                .flash(&c.id, false, format!("Cannot start the sign-in: {e}"));
            see_other("/")
        }
    }
}
