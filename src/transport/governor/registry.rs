//! The governors alive in one process, by upstream application, so that routes rebuilt by a reload find theirs again (pauses, budget windows and attempts in flight survive) and only changed limits apply.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::gate::lock;
use super::{Governor, GovernorStats, Limits, Shared, SharedState};

/// Governors by upstream application. Created once by `run` and handed to
/// every route build; a governor lives as long as some route (or attempt in
/// flight) uses it.
#[derive(Default)]
pub struct Governors {
    by_app: Mutex<HashMap<String, Weak<Governor>>>,
    /// The budget shared with other instances (`throttle.backend = "redis"`).
    shared: Option<Arc<Shared>>,
}

impl Governors {
    /// An empty registry whose governors keep their budgets in this process.
    pub fn new() -> Arc<Governors> {
        Arc::new(Governors::default())
    }

    /// An empty registry whose governors share their budgets through `shared`.
    pub fn with_shared(shared: Arc<Shared>) -> Arc<Governors> {
        Arc::new(Governors {
            by_app: Mutex::new(HashMap::new()),
            shared: Some(shared),
        })
    }

    /// The registry `[throttle]` asks for (Redis is not contacted yet).
    pub fn from_config(c: &crate::config::Config) -> Result<Arc<Governors>, String> {
        let t = &c.throttle;
        if t.backend == crate::config::throttle::Backend::Local {
            return Ok(Governors::new());
        }
        let lease = if t.lease_secs > 0 {
            t.lease_secs
        } else {
            2 * c.upstream.timeout_secs.max(1)
        };
        let shared = Shared::new(
            &t.redis_url,
            &t.redis_username,
            &t.redis_password,
            t.expected_instances,
            std::time::Duration::from_secs(lease),
        )?;
        Ok(Governors::with_shared(shared))
    }

    /// Where the shared budget stands (`None`: `throttle.backend = "local"`).
    pub fn shared_state(&self) -> Option<SharedState> {
        self.shared.as_ref().map(|s| s.state())
    }

    /// The governor of application `app` (e.g. Graph endpoint, tenant and
    /// client id; SMTP server and account), now enforcing `limits`: the one
    /// already alive, with its limits updated, else a new one.
    pub fn governor(&self, app: &str, limits: Limits) -> Arc<Governor> {
        let mut all = lock(&self.by_app);
        all.retain(|_, w| w.strong_count() > 0);
        if let Some(g) = all.get(app).and_then(Weak::upgrade) {
            g.set_limits(limits);
            return g;
        }
        let g = Arc::new(match &self.shared {
            Some(s) => Governor::shared(limits, s.clone(), app),
            None => Governor::new(limits),
        });
        all.insert(app.to_string(), Arc::downgrade(&g));
        g
    }

    /// The governor of application `app`, if one is alive.
    pub fn get(&self, app: &str) -> Option<Arc<Governor>> {
        lock(&self.by_app).get(app).and_then(Weak::upgrade)
    }

    /// Figures of every governor alive, by application, sorted.
    pub fn stats(&self) -> Vec<(String, GovernorStats)> {
        let mut out: Vec<(String, GovernorStats)> = lock(&self.by_app)
            .iter()
            .filter_map(|(k, w)| Some((k.clone(), w.upgrade()?.stats())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
