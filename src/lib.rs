//! mailbridge: a local SMTP relay that accepts mail from legacy software, spools it durably and delivers it upstream with modern authentication.
//!
//! The flow: [`inbound`] sessions hand accepted mail to the [`scheduler`],
//! which writes it to the [`spool`] before the client hears `250`, then
//! delivers it through the [`routing`] choice of [`transport`]. [`admin`]
//! serves status and control; [`cli`] is the command line.

pub mod address;
pub mod admin;
pub mod cli;
pub mod config;
pub mod http;
pub mod inbound;
pub mod listener;
pub mod maildrop;
pub mod message;
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

use config::{Config, Secret};

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
                spool::create_private_dir(dir)?;
            }
            spool::write_atomic(&path, token.as_bytes())?;
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

/// Run mailbridge until `shutdown` is cancelled: load the spool, start the
/// scheduler, serve SMTP and admin, and drain gracefully at the end.
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
    let (spool, loaded, corrupt) =
        tokio::task::spawn_blocking(move || spool::Spool::open(&dir, max))
            .await?
            .with_context(|| format!("spool.path: cannot open {}", spool_dir.display()))?;
    for c in &corrupt {
        tracing::error!(file = %c.name, reason = %c.reason, dir = %spool_dir.join("corrupt").display(), "moved unreadable spool entry aside");
    }
    tracing::info!(messages = loaded.len(), spool = %spool_dir.display(), "spool loaded");
    // One governor per upstream application for the life of the process:
    // routes rebuilt by a reload take theirs from here.
    let governors =
        transport::governor::Governors::from_config(&cfg).map_err(|e| anyhow::anyhow!(e))?;
    let router =
        Arc::new(routing::from_config_with(&cfg, &governors).map_err(|e| anyhow::anyhow!(e))?);
    for n in cfg.notices() {
        tracing::warn!("{n}");
    }
    for (label, server) in router.servers() {
        tracing::info!(route = label, %server, "upstream");
    }
    let policy = scheduler::Policy::from_config(&cfg);
    let (sched, sched_task) =
        scheduler::Scheduler::start(Arc::new(spool), router, policy, loaded, shutdown.clone());

    tracing::info!(address = %local, "listening for SMTP");
    let smtps_task = listeners.smtps.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!(address = %a, "listening for SMTP with implicit TLS");
        }
        tokio::spawn(inbound::serve_implicit_tls(
            l,
            settings.clone(),
            Arc::new(sched.clone()),
            shutdown.clone(),
        ))
    });
    let maildrop_task = tokio::spawn(maildrop::watch(
        maildrop::dir(&cfg),
        Arc::new(maildrop::import_settings(&settings)),
        Arc::new(sched.clone()),
        Duration::from_secs(MAILDROP_POLL_SECS),
        shutdown.clone(),
    ));
    let smtp_task = tokio::spawn(inbound::serve(
        listeners.smtp,
        settings,
        Arc::new(sched.clone()),
        shutdown.clone(),
    ));

    let reloader = config_path.map(|p| reload::Reloader::new(p, sched.clone(), governors.clone()));
    let admin_task = match listeners.admin {
        Some(l) => {
            let token =
                admin_token(&cfg, true).context("admin.token: cannot create spool/admin.token")?;
            tracing::info!(address = %l.local_addr()?, "admin endpoint");
            let state = Arc::new(admin::AdminState {
                scheduler: sched.clone(),
                token,
                started: std::time::SystemTime::now(),
                reloader: reloader.clone(),
            });
            let extras = admin::Extras::from_config(&cfg).map_err(|e| anyhow::anyhow!(e))?;
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
        cfg.upstream.failback_probe_secs,
        shutdown.clone(),
    ));
    let reload_task = reloader.map(|r| tokio::spawn(reload::on_sighup(r, shutdown.clone())));

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
    if let Some(t) = reload_task {
        t.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// While the alternate is active, probe the primary every `secs` seconds and
/// fail back when it answers. `secs = 0` disables this.
async fn failback_probe(sched: scheduler::Scheduler, secs: u64, shutdown: CancellationToken) {
    if secs == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
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
