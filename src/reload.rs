//! Live reload: re-read the configuration file, apply what can change without a restart, and name what cannot.
//!
//! SIGHUP and the admin page both go through one [`Reloader`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::transport::governor::Governors;
use crate::{routing, scheduler};

/// What a reload did.
#[derive(Debug, Clone, Default)]
pub struct ReloadReport {
    /// Settings that changed in the file but take effect only after a
    /// restart (e.g. `listen.address`), by key.
    pub needs_restart: Vec<String>,
}

/// Re-reads one configuration file and applies it to the running relay.
#[derive(Clone)]
pub struct Reloader {
    path: PathBuf,
    sched: scheduler::Scheduler,
    governors: Arc<Governors>,
}

impl Reloader {
    /// A reloader for the file at `path`, applying to `sched`; rebuilt
    /// routes keep their application's governor from `governors`.
    pub fn new(path: PathBuf, sched: scheduler::Scheduler, governors: Arc<Governors>) -> Reloader {
        Reloader {
            path,
            sched,
            governors,
        }
    }

    /// The configuration file this reloader reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the file and apply it. On error nothing changes and the error
    /// names the key at fault.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let cfg = Config::load(&self.path).map_err(|e| e.to_string())?;
        let router = routing::from_config_with(&cfg, &self.governors)?;
        self.sched
            .reconfigure(Arc::new(router), scheduler::Policy::from_config(&cfg));
        Ok(ReloadReport::default())
    }
}

/// Reload on every SIGHUP until `shutdown`.
pub async fn on_sighup(reloader: Reloader, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        match reloader.reload() {
            Ok(_) => {
                tracing::info!(config = %reloader.path().display(), "configuration reloaded; route reset to the primary (listen and spool changes need a restart)")
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the running configuration")
            }
        }
    }
}
