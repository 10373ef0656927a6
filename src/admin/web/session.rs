//! Admin page sign-in state: a bounded server-side table of sessions (random id in an HttpOnly, SameSite=Strict cookie, idle and absolute expiry), each with its CSRF token and the messages waiting to be shown.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};

/// The session cookie's name.
pub const COOKIE: &str = "mailbridge_session";
/// Sessions kept at once; signing in beyond that ends the oldest.
pub const MAX_SESSIONS: usize = 32;
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(60 * 60);
/// A session ends this long after sign-in, used or not.
pub const LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// Consent results kept for the page (one per sign-in started).
const MAX_CONSENTS: usize = 64;

/// A message shown once on the next page.
#[derive(Debug, Clone)]
pub struct Flash {
    /// Success (green) or failure (red).
    pub ok: bool,
    /// Plain text (escaped when shown).
    pub text: String,
}

struct Session {
    csrf: String,
    created: Instant,
    last_seen: Instant,
    flashes: Vec<Flash>,
    /// `state`s of the OAuth consents this session started.
    consents: Vec<String>,
}

/// What a handler learns about the caller's session.
#[derive(Debug, Clone)]
pub struct Current {
    /// The session id (the cookie's value).
    pub id: String,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
}

/// Every session of this process.
#[derive(Default)]
pub struct Sessions {
    table: Mutex<HashMap<String, Session>>,
    /// OAuth consent results by `state`, until the session that started it shows them.
    consents: Mutex<HashMap<String, (Instant, Flash)>>,
}

/// 32 random bytes, hex.
fn random_hex() -> String {
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Constant-time comparison of two strings.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len()
        && !a.is_empty()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session cookie's value in a request, if any.
pub fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
}

/// The `Set-Cookie` value for a new session.
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        LIFETIME.as_secs()
    )
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

impl Sessions {
    fn table(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Session>> {
        self.table.lock()
    }

    /// Start a session; returns its id (the oldest session ends when the table is full).
    pub fn create(&self) -> String {
        let mut t = self.table();
        let now = Instant::now();
        t.retain(|_, s| alive(s, now));
        while t.len() >= MAX_SESSIONS {
            let Some(oldest) = t
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            t.remove(&oldest);
        }
        let id = random_hex();
        t.insert(
            id.clone(),
            Session {
                csrf: random_hex(),
                created: now,
                last_seen: now,
                flashes: Vec::new(),
                consents: Vec::new(),
            },
        );
        id
    }

    /// The live session a request carries (its idle timer restarts).
    pub fn current(&self, headers: &HeaderMap) -> Option<Current> {
        let id = cookie_value(headers)?;
        let mut t = self.table();
        let now = Instant::now();
        let s = t.get_mut(&id)?;
        if !alive(s, now) {
            t.remove(&id);
            return None;
        }
        s.last_seen = now;
        Some(Current {
            csrf: s.csrf.clone(),
            id,
        })
    }

    /// End a session.
    pub fn remove(&self, id: &str) {
        self.table().remove(id);
    }

    /// Queue a message for the session's next page.
    pub fn flash(&self, id: &str, ok: bool, text: impl Into<String>) {
        if let Some(s) = self.table().get_mut(id) {
            s.flashes.truncate(8);
            s.flashes.push(Flash {
                ok,
                text: text.into(),
            });
        }
    }

    /// The messages waiting for the session, including the results of the
    /// OAuth consents it started (each shown once).
    pub fn take_flashes(&self, id: &str) -> Vec<Flash> {
        let mut t = self.table();
        let Some(s) = t.get_mut(id) else {
            return Vec::new();
        };
        let mut out = std::mem::take(&mut s.flashes);
        let mut results = self.consents.lock();
        s.consents.retain(|state| match results.remove(state) {
            Some((_, f)) => {
                out.push(f);
                false
            }
            None => true,
        });
        out
    }

    /// Remember that the session started the consent with this `state`.
    pub fn started_consent(&self, id: &str, state: &str) {
        if let Some(s) = self.table().get_mut(id) {
            if s.consents.len() >= 8 {
                s.consents.remove(0);
            }
            s.consents.push(state.to_string());
        }
    }

    /// True when a page session started the consent with this `state`.
    pub fn started_here(&self, state: &str) -> bool {
        !state.is_empty()
            && self
                .table()
                .values()
                .any(|s| s.consents.iter().any(|c| c == state))
    }

    /// The outcome of the consent with this `state`, for the session that started it.
    pub fn consent_result(&self, state: &str, ok: bool, text: impl Into<String>) {
        let mut r = self.consents.lock();
        r.retain(|_, (at, _)| at.elapsed() < IDLE);
        if r.len() >= MAX_CONSENTS
            && let Some(oldest) = r
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
        {
            r.remove(&oldest);
        }
        r.insert(
            state.to_string(),
            (
                Instant::now(),
                Flash {
                    ok,
                    text: text.into(),
                },
            ),
        );
    }

    /// Sessions alive now.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.table().values().filter(|s| alive(s, now)).count()
    }

    /// True when no session is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last_seen) < IDLE && now.duration_since(s.created) < LIFETIME
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, v.parse().unwrap());
        h
    }

    #[test]
    fn sessions_are_found_by_cookie_and_bounded() {
        let s = Sessions::default();
        let id = s.create();
        let cur = s
            .current(&with_cookie(&format!("other=1; {COOKIE}={id}")))
            .unwrap();
        assert_eq!(cur.id, id);
        assert_eq!(cur.csrf.len(), 64);
        assert_ne!(cur.csrf, id);
        assert!(s.current(&with_cookie(&format!("{COOKIE}=nope"))).is_none());
        assert!(s.current(&HeaderMap::new()).is_none());
        for _ in 0..MAX_SESSIONS + 5 {
            s.create();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        // The first one was the least recently used: it is gone.
        assert!(s.current(&with_cookie(&format!("{COOKIE}={id}"))).is_none());
    }

    #[test]
    fn flashes_and_consent_results_are_shown_once() {
        let s = Sessions::default();
        let id = s.create();
        s.flash(&id, true, "saved");
        s.started_consent(&id, "st-1");
        s.consent_result("st-1", false, "declined");
        s.consent_result("st-other", true, "not ours");
        let f = s.take_flashes(&id);
        let texts: Vec<&str> = f.iter().map(|f| f.text.as_str()).collect();
        assert_eq!(texts, ["saved", "declined"]);
        assert!(s.take_flashes(&id).is_empty());
    }

    #[test]
    fn comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", ""));
    }
}
