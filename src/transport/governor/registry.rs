//! The governors alive in one process, by upstream application, so that routes rebuilt by a reload find theirs again (pauses, budget windows and attempts in flight survive) and only changed limits apply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::gate::lock;
use super::{Governor, GovernorStats, Limits};

/// Governors by upstream application. Created once by `run` and handed to
/// every route build; a governor lives as long as some route (or attempt in
/// flight) uses it.
#[derive(Default)]
pub struct Governors {
    by_app: Mutex<HashMap<String, Weak<Governor>>>,
}

impl Governors {
    /// An empty registry.
    pub fn new() -> Arc<Governors> {
        Arc::new(Governors::default())
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
        let g = Arc::new(Governor::new(limits));
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
