//! The browser side of the authorization code flow: `POST /oauth/start` (admin token in the `Authorization` header, never in the URL; answers with a redirect to the provider with state and a PKCE challenge, which `mailbridge auth login` prints) and `GET /oauth/callback` (redeems the code, readable HTML pages for success and every error; a consent started on the admin page returns there with the outcome).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::Ctx;
use crate::common::Secret;

/// `POST /oauth/start` parameters (the query string; the token is a header).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct StartQuery {
    /// The mailbox to sign in for; default: the upstream's mailbox.
    #[serde(default)]
    identity: Option<String>,
    /// `upstream` (default) or `alternate`.
    #[serde(default)]
    upstream: Option<String>,
}

/// `GET /oauth/callback` parameters (RFC 6749 §4.1.2).
#[derive(Deserialize, Default)]
pub(super) struct CallbackQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

use super::web::html::escape;

/// A small self-contained page; `body` is already escaped HTML.
fn page(code: StatusCode, title: &str, body: &str) -> Response {
    page_back(code, title, body, false)
}

/// Like [`page`]; with `back` the browser returns to the admin page at once
/// (the consent was started there, and that page shows the outcome).
fn page_back(code: StatusCode, title: &str, body: &str, back: bool) -> Response {
    let (refresh, link) = if back {
        (
            "<meta http-equiv=\"refresh\" content=\"0;url=/\">",
            "<p><a href=\"/\">Back to the mailbridge page</a></p>",
        )
    } else {
        ("", "")
    };
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}<title>mailbridge: {t}</title>\
<style>body{{font-family:sans-serif;max-width:40em;margin:3em auto;line-height:1.5}}code{{background:#eee;padding:0 .2em}}</style>\
</head><body><h1>{t}</h1>{body}{link}</body></html>\n",
        t = escape(title)
    );
    (
        code,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(html),
    )
        .into_response()
}

fn error_page(code: StatusCode, what: &str, detail: &str) -> Response {
    page(
        code,
        "Sign-in failed",
        &format!(
            "<p>{}</p><p>Nothing was stored. Start again with <code>mailbridge auth login</code> \
(or <code>mailbridge auth login --device</code> on a headless server).</p>",
            escape(&format!("{what}: {detail}"))
        ),
    )
}

pub(super) async fn start(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    Query(q): Query<StartQuery>,
) -> Response {
    if !super::authorized(&ctx.admin, &headers) {
        return page(
            StatusCode::UNAUTHORIZED,
            "Admin token required",
            "<p>Run <code>mailbridge auth login</code> and open the URL it prints. \
(This request needs <code>Authorization: Bearer &lt;admin token&gt;</code>; the token never goes in a URL.)</p>",
        );
    }
    let wanted = q.upstream.as_deref().unwrap_or("upstream");
    let regs = ctx.oauth();
    let registry = regs
        .iter()
        .find(|(label, _)| *label == wanted || label.strip_prefix("upstream.") == Some(wanted))
        .or_else(|| (q.upstream.is_none()).then(|| regs.first()).flatten());
    let Some((_, registry)) = registry else {
        return page(
            StatusCode::NOT_FOUND,
            "OAuth is not configured",
            &format!(
                "<p>No upstream named <code>{}</code> uses <code>auth = \"oauth\"</code> \
(with <code>requires_auth = true</code>).</p>",
                escape(wanted)
            ),
        );
    };
    match registry.start_login(q.identity.as_deref()) {
        Ok(url) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, url),
                (header::CACHE_CONTROL, "no-store".to_string()),
                (header::REFERRER_POLICY, "no-referrer".to_string()),
            ],
        )
            .into_response(),
        Err(e) => error_page(StatusCode::BAD_REQUEST, "Cannot start the sign-in", &e),
    }
}

pub(super) async fn callback(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let state = q.state.clone().unwrap_or_default();
    let from_page = ctx.web.sessions.started_here(&state);
    let (ok, title, text, response) = redeem(&ctx, &state, q).await;
    if !from_page {
        return response;
    }
    // Back to the page that started it, which shows the outcome.
    ctx.web.sessions.consent_result(&state, ok, text.clone());
    page_back(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        },
        title,
        &format!("<p>{}</p>", escape(&text)),
        true,
    )
}

/// Handle the provider's answer: (success, title, outcome as text, the page for a browser not sent by the admin page).
async fn redeem(
    ctx: &Ctx,
    state: &str,
    q: CallbackQuery,
) -> (bool, &'static str, String, Response) {
    let failed = |what: &str, detail: &str| {
        (
            false,
            "Sign-in failed",
            format!("Connect account failed: {what}: {detail}"),
            error_page(StatusCode::BAD_REQUEST, what, detail),
        )
    };
    if let Some(error) = q.error.as_deref() {
        // Whatever the provider said, this sign-in is over.
        for (_, r) in &ctx.oauth() {
            r.cancel_login(state);
        }
        tracing::warn!(error = %crate::text::for_log(error), description = %crate::text::for_log(q.error_description.as_deref().unwrap_or("")), "OAuth sign-in refused by the provider");
        let detail = q.error_description.as_deref().unwrap_or("");
        return failed(
            &format!("The provider answered `{error}`"),
            detail.lines().next().unwrap_or(""),
        );
    }
    let regs = ctx.oauth();
    let Some(registry) = regs
        .iter()
        .map(|(_, r)| r)
        .find(|r| !state.is_empty() && r.has_login(state))
    else {
        return failed(
            "Unknown sign-in",
            "this link was already used, has expired (10 minutes), or was not started by this mailbridge",
        );
    };
    let Some(code) = q.code.filter(|c| !c.is_empty()) else {
        registry.cancel_login(state);
        return failed(
            "No authorization code",
            "the provider sent neither a code nor an error",
        );
    };
    match registry.finish_login(state, &Secret::new(code)).await {
        Ok(identity) => (
            true,
            "Signed in",
            format!(
                "Connected {identity}: mailbridge holds a token for it and stored its refresh token."
            ),
            page(
                StatusCode::OK,
                "Signed in",
                &format!(
                    "<p>mailbridge now holds a token for <b>{}</b> and stored its refresh token \
(mode 0600). Mail waiting for this identity will be delivered at its next attempt.</p>\
<p>You can close this window.</p>",
                    escape(&identity)
                ),
            ),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "OAuth code exchange failed");
            failed("The code could not be redeemed", &e)
        }
    }
}
