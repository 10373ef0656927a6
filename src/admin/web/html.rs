//! The admin page's HTML pieces: escaping, the page frame with its inline style, dates and ages as text, and the headers every page carries.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::session::Flash;

/// Escape text for HTML (control characters become spaces).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A Unix time as a date: `2026-12-01 23:30:41 UTC`.
pub fn date(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// A duration in seconds as words: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
pub fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..86400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86400, secs % 86400 / 3600),
    }
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222;line-height:1.45}\
header{background:#1f3a5f;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;align-items:center}\
header a{color:#fff;text-decoration:none}header b{margin-right:1em}\
header form{margin-left:auto}main{max-width:62em;margin:1.5em auto;padding:0 1em}\
section{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:1em 1.5em;margin-bottom:1.2em}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:0}\
.banner{padding:.7em 1em;border-radius:5px;margin:.6em 0}.warn{background:#fff4ce;border:1px solid #e0b400}\
.ok{background:#dff6dd;border:1px solid #6bb700}.err{background:#fde7e9;border:1px solid #d13438}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3em .5em;border-bottom:1px solid #e5e7eb;vertical-align:top}\
label{display:block;font-weight:600;margin-top:.7em}.help{color:#555;font-size:.9em;font-weight:normal}\
input[type=text],input[type=password],input[type=email],input[type=number],select{width:100%;max-width:32em;padding:.35em;box-sizing:border-box}\
button{padding:.4em .9em;border-radius:4px;border:1px solid #1f3a5f;background:#1f3a5f;color:#fff;cursor:pointer}\
button.plain{background:#fff;color:#1f3a5f}form.inline{display:inline}fieldset{border:1px solid #d8dce3;margin:1em 0}\
.field-error input,.field-error select{border:2px solid #d13438}code,pre{background:#f0f0f0;padding:0 .2em}pre{padding:.6em;overflow:auto}\
";

/// What goes around a page's body.
pub struct Frame<'a> {
    /// The `<title>` and `<h1>`.
    pub title: &'a str,
    /// The signed-in session's CSRF token (navigation and a log-out button), if any.
    pub csrf: Option<&'a str>,
    /// Messages to show above the body.
    pub flashes: &'a [Flash],
}

/// A complete page with the headers every admin page carries.
pub fn page(code: StatusCode, frame: Frame<'_>, body: &str) -> Response {
    let nav = match frame.csrf {
        Some(csrf) => format!(
            "<header><b>mailbridge</b><a href=\"/\">Dashboard</a><a href=\"/queue\">Queue</a>\
<a href=\"/settings\">Settings</a><form method=\"post\" action=\"/logout\">{}\
<button class=\"plain\" type=\"submit\">Log out</button></form></header>",
            csrf_field(csrf)
        ),
        None => "<header><b>mailbridge</b></header>".into(),
    };
    let flashes: String = frame
        .flashes
        .iter()
        .map(|f| {
            format!(
                "<div class=\"banner {}\" role=\"status\">{}</div>",
                if f.ok { "ok" } else { "err" },
                escape(&f.text)
            )
        })
        .collect();
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>mailbridge: {t}</title><style>{STYLE}</style></head><body>{nav}<main><h1>{t}</h1>{flashes}{body}</main></body></html>\n",
        t = escape(frame.title)
    );
    with_headers((code, Html(html)).into_response())
}

/// The hidden CSRF field of a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    )
}

/// `303 See Other` to `to` (after a form).
pub fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    with_headers(r)
}

/// Headers of every page: not cached, not framed, no script, no referrer.
pub fn with_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html() {
        assert_eq!(
            escape("<script>\"a\" & 'b'\n"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39; "
        );
    }

    #[test]
    fn dates_and_ages() {
        assert_eq!(date(1796150375), "2026-12-01 18:39:35 UTC");
        assert_eq!(age(42), "42 s");
        assert_eq!(age(3 * 60 + 5), "3 min");
        assert_eq!(age(2 * 3600 + 5 * 60), "2 h 5 min");
        assert_eq!(age(5 * 86400 + 3 * 3600), "5 d 3 h");
    }
}
