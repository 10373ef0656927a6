//! mailbridge: a local SMTP relay that accepts mail from legacy software, spools it durably and delivers it upstream with modern authentication.
//!
//! The flow: [`inbound`] sessions hand accepted mail to the [`scheduler`],
//! which writes it to the [`spool`] before the client hears `250`, then
//! delivers it through the [`routing`] choice of [`transport`]. [`admin`]
//! serves status and control; [`cli`] is the command line.

pub mod address;
pub mod admin;
pub mod cli;
pub mod common;
pub mod config;
pub mod http;
pub mod inbound;
pub mod listener;
pub mod maildrop;
pub mod message;
pub mod metrics;
pub mod oauth;
pub mod outcome;
pub mod reload;
pub mod routing;
pub mod scheduler;
pub mod spool;
pub mod text;
pub mod tls;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use common::Secret;
use config::Config;

/// The admin token: the configured one, else the one in `<spool>/admin.token`,
/// created (mode 0600) when `create` is true and it does not exist yet.
pub fn admin_token(cfg: &Config, create: bool) -> std::io::Result<Secret> {
    if !cfg.admin.token.is_empty() {
        return Ok(cfg.admin.token.clone());
    }
    let path = cfg.path(&cfg.spool.path).join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(Secret::new(t.trim())),
        Err(e) if !create => Err(e),
        _ if !create => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "admin.token is empty",
        )),
        _ => {
            let token: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            if let Some(dir) = path.parent() {
                common::fs::create_private_dir(dir)?;
            }
            common::fs::write_atomic(&path, token.as_bytes())?;
            Ok(Secret::new(token))
        }
    }
}

/// Seconds between two looks into the maildrop (`mailbridge sendmail`
/// writes there while the daemon is down; it is also read at start).
pub const MAILDROP_POLL_SECS: u64 = 5;

/// Everything `run` needs besides the configuration.
pub struct Listeners {
    /// The SMTP listener, already bound (tests bind port 0).
    pub smtp: TcpListener,
    /// The admin listener, if enabled.
    pub admin: Option<TcpListener>,
    /// The implicit-TLS SMTP listener (`listen.implicit_tls_address`), if any.
    pub smtps: Option<TcpListener>,
}

/// Run mailbridge until `shutdown` is cancelled: open the spool, start the
/// scheduler (which loads the queued entries in the background), serve SMTP
/// and admin, and drain gracefully at the end.
/// `config_path`, when given, is re-read on SIGHUP (which also fails back to
/// the primary server).
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local = listeners.smtp.local_addr().context("SMTP listener")?;
    let settings = Arc::new(inbound::Settings::from_config(&cfg).map_err(|e| anyhow::anyhow!(e))?);
    // Never an open relay: a listener beyond loopback needs AUTH or a real allow-list.
    settings
        .check_exposure(local)
        .map_err(|e| anyhow::anyhow!(e))?;
    if let Some(l) = &listeners.smtps {
        settings
            .check_exposure(l.local_addr().context("implicit-TLS listener")?)
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    let spool_dir = cfg.path(&cfg.spool.path);
    let max = cfg.spool.max_messages;
    let dir = spool_dir.clone();
    // Only the lock, tmp/ and a listing of queue/: the entries are read in
    // the background once the scheduler runs, while mail is accepted.
    let spool = tokio::task::spawn_blocking(move || spool::Spool::open(&dir, max))
        .await?
        .with_context(|| format!("spool.path: cannot open {}", spool_dir.display()))?;
    tracing::info!(messages = spool.len(), spool = %spool_dir.display(), "spool opened; loading the queue in the background");
    // One set of OAuth registries for the process: routing, the admin
    // endpoint and each reload share one token manager per identity.
    let oauth = Arc::new(oauth::Registries::new());
    // One governor per upstream application for the life of the process:
    // routes rebuilt by a reload take theirs from here.
    let governors =
        transport::governor::Governors::from_config(&cfg).map_err(|e| anyhow::anyhow!(e))?;
    let router = Arc::new(
        routing::from_config_with(&cfg, &oauth, &governors).map_err(|e| anyhow::anyhow!(e))?,
    );
    for n in cfg.notices() {
        tracing::warn!("{n}");
    }
    for (label, server) in router.servers() {
        tracing::info!(route = label, %server, "upstream");
    }
    let policy = scheduler::Policy::from_config(&cfg);
    let (sched, sched_task) =
        scheduler::Scheduler::start(Arc::new(spool), router, policy, shutdown.clone());

    let mut listening = vec![local];
    if let Some(l) = &listeners.smtps {
        listening.extend(l.local_addr().ok());
    }
    let has_file = config_path.is_some();
    // Also without a file: it holds the settings in force for the listeners,
    // the failback probe and the metrics.
    let reloader = reload::Reloader::new(
        config_path,
        sched.clone(),
        cfg.clone(),
        settings.clone(),
        listening,
        oauth.clone(),
        governors.clone(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.watch(sched.clone(), reloader.clone());
    let metrics_task = tokio::spawn(metrics::record(
        metrics.clone(),
        sched.clone(),
        shutdown.clone(),
    ));
    let sink: Arc<dyn inbound::Sink> = Arc::new(metrics::CountingSink::new(
        Arc::new(sched.clone()),
        metrics.clone(),
    ));

    tracing::info!(address = %local, "listening for SMTP");
    let smtps_task = listeners.smtps.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!(address = %a, "listening for SMTP with implicit TLS");
        }
        tokio::spawn(inbound::serve_implicit_tls(
            l,
            reloader.inbound_settings(),
            sink.clone(),
            shutdown.clone(),
        ))
    });
    let maildrop_task = tokio::spawn(maildrop::watch(
        maildrop::dir(&cfg),
        reloader.inbound_settings(),
        sink.clone(),
        Duration::from_secs(MAILDROP_POLL_SECS),
        shutdown.clone(),
    ));
    let smtp_task = tokio::spawn(inbound::serve(
        listeners.smtp,
        reloader.inbound_settings(),
        sink,
        shutdown.clone(),
    ));

    let admin_task = match listeners.admin {
        Some(l) => {
            let token =
                admin_token(&cfg, true).context("admin.token: cannot create spool/admin.token")?;
            tracing::info!(address = %l.local_addr()?, "admin endpoint");
            let state = Arc::new(admin::AdminState {
                scheduler: sched.clone(),
                token,
                started: std::time::SystemTime::now(),
                reloader: has_file.then(|| reloader.clone()),
            });
            let mut extras =
                admin::Extras::from_config(&cfg, &oauth).map_err(|e| anyhow::anyhow!(e))?;
            extras.metrics = Some(metrics.clone());
            Some(tokio::spawn(admin::serve_with(
                l,
                state,
                extras,
                shutdown.clone(),
            )))
        }
        None => None,
    };

    let probe_task = tokio::spawn(failback_probe(
        sched.clone(),
        reloader.probe_secs(),
        shutdown.clone(),
    ));
    let reload_task =
        has_file.then(|| tokio::spawn(reload::on_sighup(reloader.clone(), shutdown.clone())));

    notify_systemd("READY=1");
    shutdown.cancelled().await;
    notify_systemd("STOPPING=1");
    tracing::info!("shutting down");
    let _ = smtp_task.await;
    if let Some(t) = smtps_task {
        let _ = t.await;
    }
    let _ = sched_task.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    probe_task.abort();
    maildrop_task.abort();
    metrics_task.abort();
    if let Some(t) = reload_task {
        t.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// While the alternate is active, probe the primary every `secs` seconds and
/// fail back when it answers. `secs = 0` disables this. A reload that
/// changes `secs` takes effect at once (the next probe is `secs` from then).
pub async fn failback_probe(
    sched: scheduler::Scheduler,
    mut secs: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    // False once the reloader is gone: the last value stays.
    let mut open = true;
    loop {
        let every = *secs.borrow_and_update();
        if every == 0 && !open {
            return;
        }
        let wait = async {
            if every == 0 {
                std::future::pending::<()>().await
            }
            tokio::time::sleep(Duration::from_secs(every)).await
        };
        let watching = open;
        let changed = async {
            if !watching {
                std::future::pending::<()>().await
            }
            secs.changed().await.is_ok()
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            still = changed => {
                open = still;
                continue;
            }
            _ = wait => {}
        }
        let router = sched.router();
        if router.state().active == "primary" {
            continue;
        }
        match router.probe_primary().await {
            Ok(()) => {
                router.failback("primary answered the automatic probe");
            }
            Err(f) => tracing::debug!(error = %f, "primary still unavailable"),
        }
    }
}

/// Tell systemd (`Type=notify`) about our state through `NOTIFY_SOCKET`, if
/// it is set: a path, or `@name` for an abstract socket.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = UnixDatagram::unbound()
        .and_then(|s| addr.and_then(|a| s.send_to_addr(state.as_bytes(), &a)));
    if let Err(e) = sent {
        tracing::warn!(socket = %path, error = %e, "cannot notify systemd");
    }
}
