//! The real binary: `/metrics` after real deliveries (values checked, text checked by `promtool` when installed), the alert rules checked by `promtool`, a SIGHUP reload that applies a sender policy and names a listen address change as needing a restart, and the readable `status`.

mod daemon;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use daemon::{Daemon, have, smtp_send, write_config};

/// `GET path` on the admin endpoint; (status, body).
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The chunked body of a `Connection: close` answer, joined.
fn unchunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The body as sent, or joined when it came in chunks.
fn unchunk_if_needed(body: String) -> String {
    if body.starts_with('#') {
        body
    } else {
        unchunk(&body)
    }
}

/// Samples by `name{labels}` as written (labels in the order written).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn token(d: &Daemon) -> String {
    std::fs::read_to_string(d.dir.join("spool/admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

const BODY: &str = "From: app@legacy.test\r\nSubject: metrics\r\n\r\nhello";

#[test]
fn metrics_after_real_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    for _ in 0..2 {
        let r = smtp_send(d.smtp, "app@legacy.test", &["a@x.test"], BODY);
        assert!(r.starts_with("250"), "{r}");
    }
    let outbox = dir.path().join("outbox");
    d.wait_for(30, "two delivered files", || {
        d.queued() == 0 && std::fs::read_dir(&outbox).map(|r| r.count()).unwrap_or(0) == 2
    });
    assert_eq!(get(d.admin, "/metrics", None).0, 401, "the token is needed");
    let (code, body) = get(d.admin, "/metrics", Some(&token(&d)));
    assert_eq!(code, 200, "{body}");
    let text = unchunk_if_needed(body);
    let m = samples(&text);
    let want = [
        ("mailbridge_inbound_accepted_total", 2.0),
        (
            "mailbridge_delivery_attempts_total{route=\"primary\",protocol=\"file\",outcome=\"delivered\"}",
            2.0,
        ),
        (
            "mailbridge_delivery_latency_seconds_count{route=\"primary\",protocol=\"file\"}",
            2.0,
        ),
        (
            "mailbridge_upstream_replies_total{route=\"primary\",protocol=\"file\",class=\"2xx\"}",
            2.0,
        ),
        ("mailbridge_queue_messages", 0.0),
        ("mailbridge_queue_oldest_message_age_seconds", 0.0),
        ("mailbridge_failovers_total", 0.0),
    ];
    for (k, v) in want {
        assert_eq!(m.get(k), Some(&v), "{k} in:\n{text}");
    }
    let active: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("mailbridge_route_active{route=\"primary\""))
        .collect();
    assert_eq!(active.len(), 1, "{text}");
    assert_eq!(*active[0].1, 1.0);
    if have("promtool") {
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_alert_rules_are_valid() {
    if !have("promtool") {
        return;
    }
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sighup_applies_a_sender_policy_and_names_a_listen_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let d = Daemon::start(dir.path());
    let r = smtp_send(d.smtp, "app@bad.test", &["a@x.test"], BODY);
    assert!(r.starts_with("250"), "before the reload: {r}");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[listen]\naddress = \"127.0.0.1:0\"\n",
        "[listen]\naddress = \"127.0.0.1:1\"\nallowed_sender_domains = [\"ok.test\"]\n",
    );
    std::fs::write(&path, text).unwrap();
    d.signal("HUP");
    d.wait_for(30, "the reload", || {
        d.log().contains("configuration reloaded")
    });
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("needs a restart") && l.contains("listen.address")),
        "{log}"
    );
    // The running listener stays where it is and applies the new policy.
    let r = smtp_send(d.smtp, "app@bad.test", &["a@x.test"], BODY);
    assert!(r.starts_with("550 5.7.1"), "after the reload: {r}");
    let r = smtp_send(d.smtp, "app@ok.test", &["a@x.test"], BODY);
    assert!(r.starts_with("250"), "{r}");
    let (_, body) = get(d.admin, "/metrics", Some(&token(&d)));
    let m = samples(&unchunk_if_needed(body));
    assert_eq!(
        m.get("mailbridge_inbound_rejected_total{reason=\"sender_domain\"}"),
        Some(&1.0)
    );
    assert_eq!(m.get("mailbridge_inbound_accepted_total"), Some(&2.0));

    // `status` reads as text with dates; `--json` is the document.
    let (code, out, err) = d.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Sending through: primary server"), "{out}");
    assert!(out.contains("because: started"), "{out}");
    let (code, json, err) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let since = doc["route"]["since"].as_u64().unwrap();
    assert!(!out.contains(&since.to_string()), "no epoch numbers: {out}");
    let year = chrono_year(since);
    assert!(out.contains(&format!("since {year}-")), "{out}");
    let (code, out, err) = d.cli(&["queue", "retry", "--all"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("will be retried now"), "{out}");
}

/// The (UTC or local, same year but on New Year's night) year of `unix`.
fn chrono_year(unix: u64) -> u64 {
    // Days since 1970 to a civil year (Howard Hinnant's algorithm).
    let z = unix / 86_400 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + u64::from(m <= 2)
}
