//! `mailbridge status`: the running relay's state as text people read (dates, ages, the active server and why, the queue, the OAuth identities), or its JSON document for scripts.

use std::process::ExitCode;

use super::{AdminAnswer, FAILED, admin_call, admin_failed, admin_request, age};
use crate::config::Config;

/// `mailbridge status`: text for people, or the JSON document with `--json`.
pub fn command(cfg: &Config, json: bool) -> ExitCode {
    if json {
        return admin_call(cfg, "GET", "/status", true);
    }
    match admin_request(cfg, "GET", "/status", true) {
        AdminAnswer::Reply(200, body) => match serde_json::from_str(&body) {
            Ok(doc) => {
                out!("{}", status_text(&doc, crate::scheduler::now_unix()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mailbridge: the admin endpoint answered something else than JSON: {e}");
                ExitCode::from(FAILED)
            }
        },
        other => admin_failed(other),
    }
}

/// A Unix time as a local date and time, e.g. `2026-12-01 09:30:00 +01:00`.
pub fn date(unix: u64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_opt(unix as i64, 0) {
        chrono::LocalResult::Single(t) => t.format("%Y-%m-%d %H:%M:%S %:z").to_string(),
        _ => unix.to_string(),
    }
}

/// The status document as text: what an operator reads first comes first.
/// Every value from the relay is escaped for the terminal.
pub fn status_text(doc: &serde_json::Value, now: u64) -> String {
    use std::fmt::Write as _;
    let t = |v: &serde_json::Value| crate::text::for_log(v.as_str().unwrap_or("")).into_owned();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut o = String::new();
    let route = &doc["route"];
    let since = n(&route["since"]);
    let _ = writeln!(
        o,
        "Sending through: {} server {} since {} ({} ago)",
        t(&route["active"]),
        t(&route["server"]),
        date(since),
        age(now.saturating_sub(since))
    );
    let _ = writeln!(o, "  because: {}", t(&route["reason"]));
    for s in doc["servers"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {:<10} {}", t(&s["label"]), t(&s["server"]));
    }
    let q = &doc["queue"];
    let depth = n(&q["depth"]);
    let _ = write!(
        o,
        "Queue: {depth} message(s), {} waiting for a retry, {} in flight",
        n(&q["deferred"]),
        n(&q["in_flight"])
    );
    if depth > 0 {
        let _ = write!(o, ", oldest {}", age(n(&q["oldest_age_secs"])));
    }
    let _ = writeln!(o);
    if q["loading"].as_bool() == Some(true) {
        let _ = writeln!(
            o,
            "  reading the queue found at start: {} message(s) still to read",
            n(&q["to_load"])
        );
    }
    if n(&q["bounce_undeliverable"]) > 0 {
        let _ = writeln!(
            o,
            "  {} undeliverable bounce(s) held for an operator (mailbridge queue list)",
            n(&q["bounce_undeliverable"])
        );
    }
    if let Some(e) = q["last_error"].as_str() {
        let _ = writeln!(o, "  last error: {}", crate::text::for_log(e));
    }
    for up in doc["oauth"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "OAuth ({}, {} {}):",
            t(&up["upstream"]),
            t(&up["provider"]),
            t(&up["flow"])
        );
        for id in up["identities"].as_array().into_iter().flatten() {
            let mut line = format!("  {:<32} {}", t(&id["identity"]), t(&id["state"]));
            if let Some(exp) = id["access_token_expires_at"].as_u64() {
                let _ = write!(line, ", token valid until {}", date(exp));
            }
            if let Some(e) = id["last_error"].as_str() {
                let _ = write!(line, ", last error: {}", crate::text::for_log(e));
            }
            let _ = writeln!(o, "{line}");
        }
    }
    let c = &doc["corrupt"];
    if n(&c["count"]) > 0 {
        let _ = writeln!(
            o,
            "Corrupt spool entries moved aside: {} (newest {})",
            n(&c["count"]),
            t(&c["newest"]["name"])
        );
    }
    let _ = writeln!(
        o,
        "mailbridge {}, up {}",
        t(&doc["version"]),
        age(n(&doc["uptime_secs"]))
    );
    o
}
