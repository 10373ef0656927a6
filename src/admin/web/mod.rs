//! The admin web page (server-rendered HTML, usable without JavaScript): sign-in with the admin token into a server-side session, the dashboard, the queue and the Outgoing Mail Server settings; every form that changes something carries the session's CSRF token.

mod dashboard;
pub(crate) mod html;
mod queue;
pub(crate) mod session;
mod settings;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};

use super::Ctx;
use html::{Frame, escape, page, see_other};
use session::{Current, Flash, Sessions};

/// How long a wrong admin token holds up the next sign-in attempt; attempts
/// wait in line, so guessing runs at most one try per this interval.
pub const LOGIN_DELAY: Duration = Duration::from_secs(1);

/// The page's state inside the admin handlers' [`Ctx`].
#[derive(Default)]
pub struct Web {
    /// Signed-in browsers.
    pub sessions: Sessions,
    /// Held while a wrong token's delay runs (one guess at a time).
    login_gate: tokio::sync::Mutex<()>,
}

/// The page's routes (they need [`Ctx`]).
pub(crate) fn routes() -> Router<Arc<Ctx>> {
    Router::new()
        .route("/", get(dashboard::show))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/ui/failback", post(dashboard::failback))
        .route("/ui/send-sample", post(dashboard::send_sample))
        .route("/ui/connect", post(dashboard::connect))
        .route("/queue", get(queue::list))
        .route("/messages/{id}", get(queue::headers))
        .route("/ui/queue/retry", post(queue::retry))
        .route("/ui/queue/delete", post(queue::delete))
        .route("/ui/queue/retry-all", post(queue::retry_all))
        .route("/settings", get(settings::show).post(settings::save))
}

/// A form's fields.
pub(crate) type Fields = HashMap<String, String>;

/// The login form, with a message when the last try failed.
fn login_page(code: StatusCode, message: Option<&str>) -> Response {
    let flashes: Vec<Flash> = message
        .map(|m| Flash {
            ok: false,
            text: m.to_string(),
        })
        .into_iter()
        .collect();
    page(
        code,
        Frame {
            title: "Sign in",
            csrf: None,
            flashes: &flashes,
        },
        "<section><form method=\"post\" action=\"/login\">\
<label for=\"token\">Admin token <span class=\"help\">(the <code>admin.token</code> setting, or the file \
<code>admin.token</code> in the spool directory)</span></label>\
<input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" required autofocus>\
<p><button type=\"submit\">Sign in</button></p></form></section>",
    )
}

/// The signed-in session, or the response for a browser without one (the
/// login form on `/`, else a redirect there).
pub(crate) fn signed_in(
    ctx: &Ctx,
    headers: &HeaderMap,
    path: &str,
) -> Result<Current, Box<Response>> {
    match ctx.web.sessions.current(headers) {
        Some(c) => Ok(c),
        None if path == "/" => Err(Box::new(login_page(StatusCode::OK, None))),
        None => Err(Box::new(see_other("/"))),
    }
}

/// The session of a form post, checked for its CSRF token: without a
/// session the browser goes to the login form, with a wrong token it gets `403`.
pub(crate) fn form_session(
    ctx: &Ctx,
    headers: &HeaderMap,
    form: &Fields,
) -> Result<Current, Box<Response>> {
    let Some(c) = ctx.web.sessions.current(headers) else {
        return Err(Box::new(see_other("/")));
    };
    let given = form.get("csrf").map(String::as_str).unwrap_or("");
    if !session::same(given, &c.csrf) {
        tracing::warn!("admin page: form without a valid CSRF token refused");
        return Err(Box::new(page(
            StatusCode::FORBIDDEN,
            Frame {
                title: "Form refused",
                csrf: Some(&c.csrf),
                flashes: &[],
            },
            "<section><p>This form did not carry this session's security token (it may come from another site, \
or from a page opened before you signed in again). Nothing was changed.</p><p><a href=\"/\">Back to the dashboard</a></p></section>",
        )));
    }
    Ok(c)
}

/// A form post of a signed-in session whose CSRF token was checked (see
/// [`form_session`]); otherwise the request is answered as that says.
pub(crate) struct SignedForm(pub Current, pub Fields);

impl axum::extract::FromRequest<Arc<Ctx>> for SignedForm {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, ctx: &Arc<Ctx>) -> Result<Self, Response> {
        let headers = req.headers().clone();
        let Form(form) = Form::<Fields>::from_request(req, ctx)
            .await
            .map_err(IntoResponse::into_response)?;
        let c = form_session(ctx, &headers, &form).map_err(|r| *r)?;
        Ok(SignedForm(c, form))
    }
}

/// The page frame of a signed-in session, with its waiting messages.
pub(crate) fn signed_in_page(
    ctx: &Ctx,
    c: &Current,
    code: StatusCode,
    title: &str,
    body: &str,
) -> Response {
    let flashes = ctx.web.sessions.take_flashes(&c.id);
    page(
        code,
        Frame {
            title,
            csrf: Some(&c.csrf),
            flashes: &flashes,
        },
        body,
    )
}

async fn login(State(ctx): State<Arc<Ctx>>, Form(form): Form<Fields>) -> Response {
    let given = form.get("token").map(String::as_str).unwrap_or("");
    // One attempt at a time: a wrong token holds the gate for LOGIN_DELAY.
    let _gate = ctx.web.login_gate.lock().await;
    if !super::token_matches(&ctx.admin.token, given) {
        tracing::warn!("admin page: sign-in with a wrong token");
        tokio::time::sleep(LOGIN_DELAY).await;
        return login_page(
            StatusCode::UNAUTHORIZED,
            Some("That is not the admin token. Try again."),
        );
    }
    let id = ctx.web.sessions.create();
    tracing::info!("admin page: signed in");
    let mut r = see_other("/");
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(ctx): State<Arc<Ctx>>, SignedForm(c, _): SignedForm) -> Response {
    ctx.web.sessions.remove(&c.id);
    let mut r = see_other("/");
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A small `<p>` with escaped text (for page bodies).
pub(crate) fn para(text: &str) -> String {
    format!("<p>{}</p>", escape(text))
}

/// An error page for a signed-in session.
pub(crate) fn problem(ctx: &Ctx, c: &Current, code: StatusCode, text: &str) -> Response {
    signed_in_page(
        ctx,
        c,
        code,
        "Problem",
        &format!("<section>{}</section>", para(text)),
    )
    .into_response()
}
