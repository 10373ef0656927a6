//! The Outgoing Mail Server settings page: the seed's form for SMTP/SMTPS, EWS and Graph (Basic or OAuth, alternate server, sender name and reply-to, proxy), checked by the same loader as `mailbridge check`, written to `config.toml` atomically with its comments kept, then applied with the [`crate::reload::Reloader`].

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use toml_edit::{DocumentMut, Item, Value};

use super::html::{csrf_field, escape, see_other};
use super::{Fields, SignedForm, signed_in, signed_in_page};
use crate::admin::Ctx;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    Bool,
    /// Never shown; empty keeps the stored one.
    Secret,
    Select(&'static [&'static str]),
}

/// Which protocols or authentication a field belongs to (a CSS class: the
/// page hides the others with `:has()`, no script).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    All,
    Smtp,
    Ews,
    Graph,
    Basic,
    OAuth,
    Proxy,
}

struct Field {
    /// The key under `[upstream]`, dotted for sub-tables (`oauth.client_id`).
    key: &'static str,
    label: &'static str,
    kind: Kind,
    group: Group,
    help: &'static str,
}

const fn f(
    key: &'static str,
    label: &'static str,
    kind: Kind,
    group: Group,
    help: &'static str,
) -> Field {
    Field {
        key,
        label,
        kind,
        group,
        help,
    }
}

use Group::*;
use Kind::*;

const FIELDS: &[Field] = &[
    f(
        "protocol",
        "Protocol",
        Select(&["smtp", "smtps", "ews", "graph", "file"]),
        All,
        "SMTP (STARTTLS), SMTPS (implicit TLS), Exchange Web Services, Microsoft Graph, or file (testing).",
    ),
    f(
        "server",
        "Server Name / IP Address",
        Text,
        Smtp,
        "The server all mail is sent through (host or host:port).",
    ),
    f(
        "alternate_server",
        "Alternate Server Name / IP Address",
        Text,
        Smtp,
        "Used when the primary server is unavailable; mail stays there until you return to the primary.",
    ),
    f(
        "port",
        "Port",
        Number,
        Smtp,
        "For a server given without a port (587 for SMTP, 465 for SMTPS).",
    ),
    f(
        "tls",
        "TLS Enabled",
        Bool,
        Smtp,
        "SMTP: STARTTLS is required, never downgraded. SMTPS is always TLS.",
    ),
    f(
        "connect_url",
        "Connect URL",
        Text,
        Ews,
        "The EWS URL, e.g. https://mail.contoso.com/EWS/Exchange.asmx.",
    ),
    f(
        "graph_endpoint",
        "Graph Endpoint",
        Text,
        Graph,
        "https://graph.microsoft.com, or your national cloud's endpoint.",
    ),
    f(
        "sender_name",
        "Sender Name",
        Text,
        All,
        "The name shown on mail sent through mailbridge.",
    ),
    f(
        "reply_to",
        "Reply to",
        Text,
        All,
        "When set, mail is sent from this address; the original sender becomes Reply-To.",
    ),
    f(
        "requires_auth",
        "Requires Authentication",
        Bool,
        All,
        "Sign in to the server before sending.",
    ),
    f(
        "auth",
        "Authentication",
        Select(&["basic", "oauth"]),
        All,
        "Basic (username and password) or OAuth.",
    ),
    f(
        "username",
        "Username",
        Text,
        All,
        "The mailbox to sign in as.",
    ),
    f(
        "password",
        "Password",
        Secret,
        Basic,
        "Leave empty to keep the stored password.",
    ),
    f(
        "oauth.provider",
        "Provider",
        Select(&["office365", "gmail", "custom"]),
        OAuth,
        "Which provider's defaults apply.",
    ),
    f(
        "oauth.tenant",
        "Tenant",
        Text,
        OAuth,
        "Entra ID tenant (GUID or domain); empty for organizations.",
    ),
    f(
        "oauth.client_id",
        "Client ID",
        Text,
        OAuth,
        "Of the application registered with the authorization server.",
    ),
    f(
        "oauth.client_secret",
        "Client Secret",
        Secret,
        OAuth,
        "Leave empty to keep the stored secret.",
    ),
    f(
        "oauth.authorization_url",
        "Authorization URL",
        Text,
        OAuth,
        "Empty: the provider's.",
    ),
    f(
        "oauth.token_url",
        "Token URL",
        Text,
        OAuth,
        "Empty: the provider's.",
    ),
    f(
        "oauth.scope",
        "Scope",
        Text,
        OAuth,
        "Empty: the default for the provider and protocol (e.g. https://outlook.office365.com/SMTP.Send offline_access).",
    ),
    f(
        "oauth.redirect_url",
        "Redirect URL",
        Text,
        OAuth,
        "Register this URL with the provider; it must reach this page's /oauth/callback with the same host you use here.",
    ),
    f(
        "proxy.url",
        "Proxy server",
        Text,
        Proxy,
        "http://host:port; empty: no proxy.",
    ),
    f("proxy.username", "Proxy username", Text, Proxy, ""),
    f(
        "proxy.password",
        "Proxy password",
        Secret,
        Proxy,
        "Leave empty to keep the stored password.",
    ),
];

const PAGE_STYLE: &str = "<style>\
form:has(#f-protocol option[value=ews]:checked) .g-smtp,form:has(#f-protocol option[value=graph]:checked) .g-smtp,\
form:has(#f-protocol option[value=file]:checked) .g-smtp,form:not(:has(#f-protocol option[value=ews]:checked)) .g-ews,\
form:not(:has(#f-protocol option[value=graph]:checked)) .g-graph,form:has(#f-auth option[value=oauth]:checked) .g-basic,\
form:not(:has(#f-auth option[value=oauth]:checked)) .g-oauth{display:none}</style>";

/// The item at `upstream.<key>` in the document.
fn item<'a>(doc: &'a DocumentMut, key: &str) -> Option<&'a Item> {
    let mut cur = doc.get("upstream")?;
    for part in key.split('.') {
        cur = cur.get(part)?;
    }
    Some(cur)
}

/// The shown value of a field (secrets: whether one is stored).
fn current(doc: &DocumentMut, field: &Field) -> String {
    let defaults = crate::config::Upstream::default();
    let v = item(doc, field.key).and_then(Item::as_value);
    match v {
        Some(Value::String(s)) => s.value().clone(),
        Some(Value::Integer(i)) => i.value().to_string(),
        Some(Value::Boolean(b)) => b.value().to_string(),
        Some(other) => other.to_string().trim().to_string(),
        None => match field.key {
            "protocol" => "file".into(),
            "port" => defaults.port.to_string(),
            "tls" => defaults.tls.to_string(),
            "requires_auth" => defaults.requires_auth.to_string(),
            "auth" => "basic".into(),
            "graph_endpoint" => defaults.graph_endpoint,
            "oauth.provider" => "office365".into(),
            "oauth.redirect_url" => defaults.oauth.redirect_url,
            _ => String::new(),
        },
    }
}

fn group_class(g: Group) -> &'static str {
    match g {
        All => "g-all",
        Smtp => "g-smtp",
        Ews => "g-ews",
        Graph => "g-graph",
        Basic => "g-basic",
        OAuth => "g-oauth",
        Proxy => "g-proxy",
    }
}

/// The form, filled from `doc` (or from the submitted `form`, after an error).
fn form_html(
    doc: &DocumentMut,
    submitted: Option<&Fields>,
    csrf: &str,
    error_key: Option<&str>,
) -> String {
    let mut out = format!(
        "{PAGE_STYLE}<form method=\"post\" action=\"/settings\" id=\"settings\">{}",
        csrf_field(csrf)
    );
    let mut open_group: Option<Group> = None;
    for field in FIELDS {
        let heading = match field.group {
            OAuth => Some("Authorization Server Details (OAuth)"),
            Proxy => Some("Enable proxy server"),
            _ => None,
        };
        if open_group != Some(field.group) && heading.is_some() {
            if open_group.is_some_and(|g| g == OAuth || g == Proxy) {
                out.push_str("</fieldset>");
            }
            out.push_str(&format!(
                "<fieldset class=\"{}\"><legend>{}</legend>",
                group_class(field.group),
                heading.unwrap_or("")
            ));
        }
        open_group = Some(field.group);
        let name = format!("upstream.{}", field.key);
        let id = format!("f-{}", field.key.replace('.', "-"));
        let value = match submitted {
            Some(form) if field.kind != Secret => match field.kind {
                Bool => {
                    if form.contains_key(&name) {
                        "true".into()
                    } else {
                        "false".into()
                    }
                }
                _ => form.get(&name).cloned().unwrap_or_default(),
            },
            _ => current(doc, field),
        };
        let err = error_key.is_some_and(|k| k == name);
        let class = format!(
            "{}{}",
            group_class(field.group),
            if err { " field-error" } else { "" }
        );
        let input = match field.kind {
            Text => format!(
                "<input type=\"text\" id=\"{id}\" name=\"{name}\" value=\"{}\">",
                escape(&value)
            ),
            Number => format!(
                "<input type=\"text\" inputmode=\"numeric\" id=\"{id}\" name=\"{name}\" value=\"{}\">",
                escape(&value)
            ),
            Bool => format!(
                "<input type=\"checkbox\" id=\"{id}\" name=\"{name}\"{}>",
                if value == "true" { " checked" } else { "" }
            ),
            Secret => {
                let stored = !current(doc, field).is_empty();
                format!(
                    "<input type=\"password\" id=\"{id}\" name=\"{name}\" value=\"\" autocomplete=\"new-password\" placeholder=\"{}\">",
                    if stored {
                        "stored: leave empty to keep"
                    } else {
                        "not set"
                    }
                )
            }
            Select(options) => {
                let opts: String = options
                    .iter()
                    .map(|o| {
                        format!(
                            "<option value=\"{o}\"{}>{o}</option>",
                            if *o == value { " selected" } else { "" }
                        )
                    })
                    .collect();
                format!("<select id=\"{id}\" name=\"{name}\">{opts}</select>")
            }
        };
        out.push_str(&format!(
            "<div class=\"{class}\"><label for=\"{id}\">{} <span class=\"help\">{}</span></label>{input}</div>",
            escape(field.label),
            escape(field.help)
        ));
    }
    if open_group.is_some_and(|g| g == OAuth || g == Proxy) {
        out.push_str("</fieldset>");
    }
    out.push_str("<p><button type=\"submit\">Save</button></p></form>");
    out
}

fn read_doc(path: &Path) -> Result<(String, DocumentMut), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let doc = text
        .parse::<DocumentMut>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((text, doc))
}

const READ_ONLY: &str = "<section><p id=\"read-only\">Settings are read-only: this relay was started without a configuration file. \
Start it with <code>--config /path/config.toml</code> to edit the settings here.</p></section>";

pub(super) async fn show(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    let c = match signed_in(&ctx, &headers, "/settings") {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let Some(reloader) = ctx.admin.reloader.as_ref() else {
        return signed_in_page(
            &ctx,
            &c,
            StatusCode::OK,
            "Outgoing Mail Server Settings",
            READ_ONLY,
        );
    };
    let path = reloader.path().to_path_buf();
    match tokio::task::spawn_blocking(move || read_doc(&path)).await {
        Ok(Ok((_, doc))) => {
            let body = format!(
                "{}<section>{}</section>",
                intro(reloader.path()),
                form_html(&doc, None, &c.csrf, None)
            );
            signed_in_page(
                &ctx,
                &c,
                StatusCode::OK,
                "Outgoing Mail Server Settings",
                &body,
            )
        }
        Ok(Err(e)) => super::problem(&ctx, &c, StatusCode::INTERNAL_SERVER_ERROR, &e),
        Err(e) => super::problem(&ctx, &c, StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn intro(path: &Path) -> String {
    format!(
        "<p class=\"help\">Saved to <code>{}</code> (its comments are kept) and applied at once; \
settings that need a restart are named after saving. An alternate upstream of another protocol \
(<code>[upstream.alternate]</code>) and the other sections are edited in the file.</p>",
        escape(&path.display().to_string())
    )
}

/// Set `upstream.<key>` to `value`, keeping the comments around an existing value.
fn set(doc: &mut DocumentMut, key: &str, value: Value) {
    let mut cur: &mut Item = doc.as_item_mut();
    let parts: Vec<&str> = std::iter::once("upstream").chain(key.split('.')).collect();
    let (last, tables) = parts.split_last().unwrap_or((&"", &[]));
    for part in tables {
        if cur.get(part).is_none_or(|i| !i.is_table_like()) {
            cur[*part] = toml_edit::table();
        }
        cur = &mut cur[*part];
    }
    match cur.get_mut(last).and_then(Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = value;
            *old.decor_mut() = decor;
        }
        None => cur[*last] = Item::Value(value),
    }
}

/// Remove `upstream.<key>` (back to its default).
fn unset(doc: &mut DocumentMut, key: &str) {
    let mut cur: &mut Item = doc.as_item_mut();
    let parts: Vec<&str> = std::iter::once("upstream").chain(key.split('.')).collect();
    let (last, tables) = parts.split_last().unwrap_or((&"", &[]));
    for part in tables {
        match cur.get_mut(part) {
            Some(i) => cur = i,
            None => return,
        }
    }
    if let Some(t) = cur.as_table_like_mut() {
        t.remove(last);
    }
}

/// Apply the submitted form to the document; `Err((key, message))` for a value that is not even of the right type.
fn apply_form(doc: &mut DocumentMut, form: &Fields) -> Result<(), (String, String)> {
    for field in FIELDS {
        let name = format!("upstream.{}", field.key);
        let given = form
            .get(&name)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let before = current(doc, field);
        match field.kind {
            Bool => {
                let on = form.contains_key(&name);
                if on.to_string() != before || item(doc, field.key).is_some() {
                    set(doc, field.key, Value::from(on));
                }
            }
            Secret => {
                if !given.is_empty() {
                    set(doc, field.key, Value::from(given));
                }
            }
            Number => {
                if given.is_empty() {
                    unset(doc, field.key);
                } else if given != before {
                    let n: u16 = given.parse().map_err(|_| {
                        (
                            name.clone(),
                            format!("`{given}` is not a number from 0 to 65535"),
                        )
                    })?;
                    set(doc, field.key, Value::from(i64::from(n)));
                }
            }
            Text | Select(_) => {
                if given.is_empty() {
                    if item(doc, field.key).is_some() {
                        unset(doc, field.key);
                    }
                } else if given != before {
                    if let Select(options) = field.kind
                        && !options.contains(&given.as_str())
                    {
                        return Err((
                            name,
                            format!("`{given}` is not one of {}", options.join(", ")),
                        ));
                    }
                    set(doc, field.key, Value::from(given));
                }
            }
        }
    }
    Ok(())
}

/// Check `text` exactly as `mailbridge check` checks a file at `path`.
fn validate(text: &str, path: &Path) -> Result<(), String> {
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| ".".into());
    let vars = crate::config::env::process_vars();
    let cfg = crate::config::Config::from_toml_env(text, &path.display().to_string(), &base, &vars)
        .map_err(|e| e.to_string())?;
    cfg.check_environment()
}

/// Write `text` to `path` atomically: a temporary file beside it (same
/// mode), fsync, rename over, fsync the directory.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", crate::spool::new_id()));
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The key an error message names (`upstream.server` in "…: upstream.server: …").
fn named_key(message: &str) -> Option<String> {
    FIELDS
        .iter()
        .map(|f| format!("upstream.{}", f.key))
        .filter(|k| message.contains(k.as_str()))
        .max_by_key(|k| k.len())
}

/// Why a form was not saved, with the document as it was (to show the form again).
struct Refused {
    doc: Option<DocumentMut>,
    message: String,
}

/// Apply the form to the file, validate, write it atomically and reload.
/// The outer error: nothing was saved; the inner one: saved, not applied.
fn save_file(
    path: &Path,
    form: &Fields,
    reloader: &crate::reload::Reloader,
) -> Result<Result<crate::reload::ReloadReport, String>, Box<Refused>> {
    let (before, mut doc) =
        read_doc(path).map_err(|message| Box::new(Refused { doc: None, message }))?;
    let original = doc.clone();
    let refused = |message: String| {
        Box::new(Refused {
            doc: Some(original.clone()),
            message,
        })
    };
    apply_form(&mut doc, form).map_err(|(k, m)| refused(format!("{k}: {m}")))?;
    let text = doc.to_string();
    validate(&text, path).map_err(&refused)?;
    if text != before {
        write_atomic(path, &text)
            .map_err(|e| refused(format!("cannot write {}: {e}", path.display())))?;
    }
    // The reloader also replaces the OAuth registries that Connect account
    // and the identities shown use.
    let report = reloader.reload();
    Ok(report)
}

pub(super) async fn save(State(ctx): State<Arc<Ctx>>, SignedForm(c, form): SignedForm) -> Response {
    let Some(reloader) = ctx.admin.reloader.clone() else {
        return signed_in_page(
            &ctx,
            &c,
            StatusCode::CONFLICT,
            "Outgoing Mail Server Settings",
            READ_ONLY,
        );
    };
    let path = reloader.path().to_path_buf();
    let submitted = form.clone();
    let outcome =
        tokio::task::spawn_blocking(move || save_file(&path, &submitted, &reloader)).await;
    match outcome {
        Ok(Ok(Ok(report))) => {
            let mut text = "Settings saved and applied.".to_string();
            if !report.needs_restart.is_empty() {
                text.push_str(&format!(
                    " These take effect after a restart (needs a restart): {}.",
                    report.needs_restart.join(", ")
                ));
            }
            tracing::info!(needs_restart = ?report.needs_restart, "settings saved on the admin page and reloaded");
            ctx.web.sessions.flash(&c.id, true, text);
            see_other("/settings")
        }
        Ok(Ok(Err(e))) => {
            ctx.web.sessions.flash(
                &c.id,
                false,
                format!(
                    "Settings saved, but applying them failed (the running settings stay): {e}"
                ),
            );
            see_other("/settings")
        }
        Ok(Err(refused)) => {
            let Refused { doc, message: e } = *refused;
            let key = named_key(&e);
            let body = format!(
                "<div class=\"banner err\" role=\"alert\" id=\"settings-error\">Not saved: {}</div><section>{}</section>",
                escape(&e),
                doc.as_ref()
                    .map(|d| form_html(d, Some(&form), &c.csrf, key.as_deref()))
                    .unwrap_or_default()
            );
            signed_in_page(
                &ctx,
                &c,
                StatusCode::BAD_REQUEST,
                "Outgoing Mail Server Settings",
                &body,
            )
        }
        Err(e) => super::problem(&ctx, &c, StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
