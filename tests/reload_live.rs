//! Live reload in process, on paused time: the active route and its reason survive a reload, a new `failback_probe_secs` takes effect at once, inbound settings change for new connections, restart-only keys are reported, and a bad file or one that would open the relay changes nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mailbridge::common::BoxFuture;
use mailbridge::config::Config;
use mailbridge::inbound::Settings;
use mailbridge::reload::Reloader;
use mailbridge::routing::Router;
use mailbridge::scheduler::{Policy, Scheduler};
use mailbridge::spool::{Meta, Spool};
use mailbridge::transport::{Body, Delivery, Envelope, Failure, Transport};
use tokio_util::sync::CancellationToken;

/// A transport that always answers `answer`.
struct Fixed(&'static str, fn() -> Delivery);

impl Transport for Fixed {
    fn describe(&self) -> String {
        self.0.into()
    }
    fn deliver<'a>(&'a self, _: &'a Envelope, _: &'a Body) -> BoxFuture<'a, Delivery> {
        let r = (self.1)();
        Box::pin(async move { r })
    }
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async { Err(Failure::server("still down")) })
    }
}

fn write(dir: &Path, listen_extra: &str, probe_secs: u64) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "hostname = \"relay.test\"\n\
             [listen]\naddress = \"127.0.0.1:2525\"\n{listen_extra}\n\
             [spool]\npath = \"spool\"\n\
             [admin]\naddress = \"\"\n\
             [upstream]\nprotocol = \"file\"\noutbox = \"outbox\"\nfailback_probe_secs = {probe_secs}\n\
             [upstream.alternate]\nprotocol = \"file\"\noutbox = \"outbox-alt\"\n"
        ),
    )
    .unwrap();
    path
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} never happened");
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_the_route_applies_the_probe_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "", 0);
    let cfg = Config::load(&path).unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 100).unwrap();
    let spool = Arc::new(spool);
    let stop = CancellationToken::new();
    // The primary refuses connections: the first message fails over.
    let router = Router::new(
        Arc::new(Fixed("down://", || {
            Err(Failure::server("connection refused"))
        })),
        Some(Arc::new(Fixed("up://", || Ok(vec![Ok(())])))),
    );
    let (sched, _task) = Scheduler::start(
        spool.clone(),
        Arc::new(router),
        Policy::from_config(&cfg),
        stop.clone(),
    );
    let body = b"Subject: reload\r\n\r\nhi\r\n";
    let meta = Meta::new(
        "m1".into(),
        "a@b.test".into(),
        vec!["c@d.test".into()],
        body.len() as u64,
        0,
    );
    spool.store(&meta, body).unwrap();
    sched.enqueue(meta);
    until("the delivery through the alternate", || spool.is_empty()).await;
    let before = sched.router().state();
    assert_eq!(before.active, "alternate");
    assert!(before.reason.contains("connection refused"), "{before:?}");

    let settings = Arc::new(Settings::from_config(&cfg).unwrap());
    let oauth = Arc::new(mailbridge::oauth::Registries::new());
    let reloader = Reloader::new(
        Some(path.clone()),
        sched.clone(),
        cfg,
        settings,
        vec![],
        oauth.clone(),
        mailbridge::transport::governor::Governors::new(),
    )
    .unwrap();
    tokio::spawn(mailbridge::failback_probe(
        sched.clone(),
        reloader.probe_secs(),
        stop.clone(),
    ));

    // Unchanged file: nothing needs a restart, the route and its reason stay.
    let old_router = sched.router();
    let report = reloader.reload().unwrap();
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert!(
        !Arc::ptr_eq(&old_router, &sched.router()),
        "router replaced"
    );
    let after = sched.router().state();
    assert_eq!(after.active, "alternate");
    assert_eq!((after.since, &after.reason), (before.since, &before.reason));
    assert!(after.server.contains("outbox-alt"), "{after:?}");
    // The probe is off (0): an hour later mail still goes to the alternate.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(sched.router().state().active, "alternate");

    // A new probe interval, a sender policy and a new listen address.
    write(
        dir.path(),
        "allowed_sender_domains = [\"ok.test\"]\naddress2 = 0",
        30,
    );
    let err = reloader.reload().unwrap_err();
    assert!(err.contains("address2"), "{err}");
    assert_eq!(reloader.config().upstream.failback_probe_secs, 0);
    assert!(
        reloader
            .inbound_settings()
            .current()
            .listen
            .allowed_sender_domains
            .is_empty()
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "address = \"127.0.0.1:2525\"\nallowed_sender_domains = [\"ok.test\"]\naddress2 = 0",
        "address = \"127.0.0.1:2526\"\nallowed_sender_domains = [\"ok.test\"]",
    );
    std::fs::write(&path, text).unwrap();
    let report = reloader.reload().unwrap();
    assert_eq!(report.needs_restart, ["listen.address"]);
    assert_eq!(
        reloader
            .inbound_settings()
            .current()
            .listen
            .allowed_sender_domains,
        ["ok.test"]
    );
    assert_eq!(sched.router().state().active, "alternate");
    // The probe runs 30 s after the reload and finds the (file) primary.
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(sched.router().state().active, "alternate");
    until("the failback by the probe", || {
        sched.router().state().active == "primary"
    })
    .await;
    assert!(
        sched.router().state().reason.contains("probe"),
        "{:?}",
        sched.router().state()
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_would_open_the_relay_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "allow_clients = [\"192.0.2.0/24\"]", 0);
    let cfg = Config::load(&path).unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 100).unwrap();
    let stop = CancellationToken::new();
    let oauth = Arc::new(mailbridge::oauth::Registries::new());
    let (sched, _task) = Scheduler::start(
        Arc::new(spool),
        Arc::new(mailbridge::routing::from_config(&cfg, &oauth).unwrap()),
        Policy::from_config(&cfg),
        stop.clone(),
    );
    let settings = Arc::new(Settings::from_config(&cfg).unwrap());
    // As if the listener were bound beyond loopback.
    let listening = vec!["192.0.2.1:2525".parse().unwrap()];
    let reloader = Reloader::new(
        Some(path.clone()),
        sched.clone(),
        cfg,
        settings,
        listening,
        oauth.clone(),
        mailbridge::transport::governor::Governors::new(),
    )
    .unwrap();
    write(dir.path(), "allow_clients = [\"0.0.0.0/0\"]", 0);
    let err = reloader.reload().unwrap_err();
    assert!(err.contains("listen.allow_clients"), "{err}");
    let live = reloader.inbound_settings().current();
    assert_eq!(live.listen.allow_clients, ["192.0.2.0/24".parse().unwrap()]);
    stop.cancel();
}
