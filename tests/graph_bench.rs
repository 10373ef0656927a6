//! Benchmark (ignored by default; run by `bench/graph/run.sh`): the seed's three Graph load scenarios through the real pipeline (SMTP in, spool, scheduler, router, governor, Graph transport) against the fake Graph with 2–3 s per request and 4 in flight, time-scaled.
//!
//! Settings (environment): `GRAPH_BENCH_SCALE` (default 20: 2.5 s of Graph
//! latency become 125 ms, and the inflow is compressed the same way),
//! `GRAPH_BENCH_SCENARIOS` (default `1,2,3`), `GRAPH_BENCH_BASELINE=1` to
//! add scenario 3 without the governor, `GRAPH_BENCH_S1_MINUTES` (default
//! 60) to shorten scenario 1. Figures are printed in real-world units (the
//! scaled times multiplied back), except DATA→250, which is measured as is:
//! under the compressed inflow, i.e. `scale` times harsher than real life.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::fake_graph::{FakeGraph, GraphConfig};
use mailbridge::config::{Listen, Secret};
use mailbridge::oauth::StaticToken;
use mailbridge::routing::Router;
use mailbridge::scheduler::governor::{Governed, Limits};
use mailbridge::scheduler::{Policy, Scheduler};
use mailbridge::transport::Transport;
use mailbridge::transport::graph::{GraphSettings, GraphTransport};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MAILBOX: &str = "desk@contoso.com";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One scenario of the seed's load simulation.
struct Scenario {
    name: &'static str,
    /// Ticket requests created, evenly over `over`.
    requests: usize,
    /// Real-world duration of the inflow.
    over: Duration,
    /// Through the governor (else straight to Graph, scheduler concurrency 16).
    governed: bool,
    /// A surge (the N·L/4 bound applies) rather than a steady state.
    surge: bool,
    seed: &'static str,
}

/// What one message went through.
struct Sample {
    /// SMTP `250` after DATA.
    t250: Instant,
    /// End of DATA to `250`.
    data_to_250: Duration,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A notification: HTML with `images` inline images of ~15 KB.
fn notification(seq: usize, images: usize) -> String {
    let mut m = format!(
        "From: Service Desk <{MAILBOX}>\r\nTo: user{seq}@example.com\r\nSubject: Request {} updated\r\nX-Bench-Seq: {seq}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=REL\r\n\r\n--REL\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Your request was updated.</p>",
        seq / 3
    );
    for i in 0..images {
        m.push_str(&format!("<img src=\"cid:i{i}\">"));
    }
    m.push_str("\r\n");
    for i in 0..images {
        let bytes: Vec<u8> = (0..15_000u32)
            .map(|k| {
                (k.wrapping_mul(2_654_435_761)
                    .wrapping_add((seq * 7 + i) as u32)
                    >> 13) as u8
            })
            .collect();
        m.push_str(&format!(
            "--REL\r\nContent-Type: image/png\r\nContent-ID: <i{i}>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ));
        for line in B64.encode(&bytes).as_bytes().chunks(76) {
            m.push_str(&String::from_utf8_lossy(line));
            m.push_str("\r\n");
        }
    }
    m.push_str("--REL--\r\n");
    m
}

async fn reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<String, String> {
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(line);
        }
    }
}

async fn expect(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    code: &str,
) -> Result<(), String> {
    let l = reply(r).await?;
    if l.starts_with(code) {
        Ok(())
    } else {
        Err(format!("expected {code}, got {l:?}"))
    }
}

/// Send one message like an application does; time DATA→250.
async fn smtp_send(addr: SocketAddr, rcpt: &str, data: &str) -> Result<Sample, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    expect(&mut r, "220").await?;
    for (cmd, code) in [
        ("EHLO app.local\r\n".to_string(), "250"),
        (format!("MAIL FROM:<{MAILBOX}>\r\n"), "250"),
        (format!("RCPT TO:<{rcpt}>\r\n"), "250"),
        ("DATA\r\n".to_string(), "354"),
    ] {
        w.write_all(cmd.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        expect(&mut r, code).await?;
    }
    w.write_all(data.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    w.write_all(b".\r\n").await.map_err(|e| e.to_string())?;
    expect(&mut r, "250").await?;
    let t250 = Instant::now();
    let _ = w.write_all(b"QUIT\r\n").await;
    let _ = reply(&mut r).await;
    Ok(Sample {
        t250,
        data_to_250: t250 - t0,
    })
}

struct Figures {
    n: usize,
    mean: f64,
    p95: f64,
    max: f64,
    bound: f64,
    request_mean: f64,
    throttled: usize,
    lost: usize,
    duplicated: usize,
    data_p50_ms: f64,
    data_p99_ms: f64,
    data_max_ms: f64,
    smtp_errors: usize,
}

async fn run(sc: &Scenario, scale: f64) -> Figures {
    let lat = |ms: u64| Duration::from_secs_f64(ms as f64 / 1000.0 / scale);
    let fake = FakeGraph::start(GraphConfig {
        latency: (lat(2000), lat(3000)),
        ..GraphConfig::default()
    })
    .await;
    let client = mailbridge::http::client(None, &Default::default(), Duration::from_secs(120))
        .expect("http client");
    let tokens = Arc::new(StaticToken {
        token: Secret::new("token-1"),
        identity: MAILBOX.into(),
    });
    let graph: Arc<dyn Transport> = Arc::new(
        GraphTransport::new(GraphSettings::new(fake.endpoint(), MAILBOX, tokens, client))
            .expect("graph"),
    );
    let (transport, concurrency): (Arc<dyn Transport>, usize) = if sc.governed {
        (
            Arc::new(Governed::new(graph, Limits::graph(4, MAILBOX))),
            64,
        )
    } else {
        (graph, 16)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, loaded, _) = mailbridge::spool::Spool::open(dir.path(), 100_000).expect("spool");
    let policy = Policy {
        retry_initial: Duration::from_secs_f64(60.0 / scale),
        retry_max: Duration::from_secs_f64(3600.0 / scale),
        give_up_after: Duration::from_secs(86_400),
        concurrency,
        hostname: "bench.local".into(),
        sender_name: String::new(),
        reply_to: String::new(),
        identities: HashMap::new(),
        dsn: mailbridge::scheduler::dsn_policy::DsnPolicy::any(),
    };
    let shutdown = CancellationToken::new();
    let (sched, sched_task) = Scheduler::start(
        Arc::new(spool),
        Arc::new(Router::new(transport, None)),
        policy,
        loaded,
        shutdown.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = Arc::new(mailbridge::inbound::Settings::new(
        "bench.local",
        Listen {
            max_connections: 5000,
            max_connections_per_ip: 5000,
            ..Listen::default()
        },
    ));
    let smtp_task = tokio::spawn(mailbridge::inbound::serve(
        listener,
        settings,
        Arc::new(sched.clone()),
        shutdown.clone(),
    ));

    // Inflow: each request makes 3 notifications at once; 10 images per 3.
    let n = sc.requests * 3;
    let gap = sc.over.as_secs_f64() / sc.requests as f64 / scale;
    // Messages are built first, so building them does not delay the inflow.
    let messages: Vec<(usize, usize, String)> = (0..sc.requests)
        .flat_map(|req| (0..3).map(move |k| (req, k)))
        .map(|(req, k)| (req, req * 3 + k, notification(req * 3 + k, [3, 3, 4][k])))
        .collect();
    let start = Instant::now() + Duration::from_millis(100);
    let mut senders = tokio::task::JoinSet::new();
    for (req, seq, data) in messages {
        let at = start + Duration::from_secs_f64(gap * req as f64);
        senders.spawn(async move {
            tokio::time::sleep_until(at).await;
            (
                seq,
                smtp_send(addr, &format!("user{seq}@example.com"), &data).await,
            )
        });
    }
    let mut samples: HashMap<usize, Sample> = HashMap::new();
    let mut smtp_errors = 0;
    while let Some(r) = senders.join_next().await {
        match r {
            Ok((seq, Ok(s))) => {
                samples.insert(seq, s);
            }
            Ok((seq, Err(e))) => {
                smtp_errors += 1;
                eprintln!("message {seq}: {e}");
            }
            Err(e) => {
                smtp_errors += 1;
                eprintln!("sender task: {e}");
            }
        }
    }
    // Wait for Graph to have everything (bounded).
    let limit =
        Instant::now() + Duration::from_secs_f64((n as f64 * 3.0 / 4.0 * 3.0 + 600.0) / scale);
    while fake.sent().len() < samples.len() && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    let _ = smtp_task.await;
    let _ = sched_task.await;

    let sent = fake.sent();
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut delays = Vec::new();
    let mut request_times = Vec::new();
    for s in &sent {
        request_times.push((s.done - s.arrived).as_secs_f64() * scale);
        let seq = s
            .mime
            .as_deref()
            .and_then(|m| mailbridge::message::header_value(m, "X-Bench-Seq"))
            .and_then(|v| v.parse::<usize>().ok());
        let Some(seq) = seq else { continue };
        *seen.entry(seq).or_default() += 1;
        if let Some(sample) = samples.get(&seq) {
            delays.push(s.done.saturating_duration_since(sample.t250).as_secs_f64() * scale);
        }
    }
    delays.sort_by(f64::total_cmp);
    let mut data: Vec<f64> = samples
        .values()
        .map(|s| s.data_to_250.as_secs_f64() * 1000.0)
        .collect();
    data.sort_by(f64::total_cmp);
    let throttled = fake.requests().iter().filter(|r| r.status == 429).count();
    Figures {
        n,
        mean: delays.iter().sum::<f64>() / delays.len().max(1) as f64,
        p95: percentile(&delays, 0.95),
        max: delays.last().copied().unwrap_or(0.0),
        // The physical bound of a surge: N messages, 2.5 s each, 4 at a time.
        bound: n as f64 * 2.5 / 4.0,
        request_mean: request_times.iter().sum::<f64>() / request_times.len().max(1) as f64,
        throttled,
        lost: samples.keys().filter(|k| !seen.contains_key(k)).count(),
        duplicated: seen.values().map(|c| c.saturating_sub(1)).sum(),
        data_p50_ms: percentile(&data, 0.5),
        data_p99_ms: percentile(&data, 0.99),
        data_max_ms: data.last().copied().unwrap_or(0.0),
        smtp_errors,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run bench/graph/run.sh"]
async fn graph_scenarios() {
    let scale: f64 = env_or("GRAPH_BENCH_SCALE", 20.0);
    let which: String = env_or("GRAPH_BENCH_SCENARIOS", "1,2,3".to_string());
    let s1_minutes: u64 = env_or("GRAPH_BENCH_S1_MINUTES", 60);
    let mut scenarios = Vec::new();
    if which.split(',').any(|s| s.trim() == "1") {
        scenarios.push(Scenario {
            name: "1: 600 req/h steady",
            requests: (10 * s1_minutes) as usize,
            over: Duration::from_secs(60 * s1_minutes),
            governed: true,
            surge: false,
            seed: "2–3 s avg, no delays",
        });
    }
    if which.split(',').any(|s| s.trim() == "2") {
        scenarios.push(Scenario {
            name: "2: surge 100 req/min",
            requests: 100,
            over: Duration::from_secs(60),
            governed: true,
            surge: true,
            seed: "~3 s avg, little delay",
        });
    }
    if which.split(',').any(|s| s.trim() == "3") {
        scenarios.push(Scenario {
            name: "3: surge 200 req/min",
            requests: 200,
            over: Duration::from_secs(60),
            governed: true,
            surge: true,
            seed: "8–9 s avg, max 10 min",
        });
    }
    if env_or("GRAPH_BENCH_BASELINE", 0) == 1 {
        scenarios.push(Scenario {
            name: "3 without governor",
            requests: 200,
            over: Duration::from_secs(60),
            governed: false,
            surge: true,
            seed: "(baseline)",
        });
    }
    println!(
        "\nGraph benchmark: fake Graph 2–3 s per request (uniform), 4 in flight per mailbox enforced; time scale 1/{scale}"
    );
    println!(
        "delays in real-world seconds (scaled back); DATA→250 in real milliseconds under the {scale}x compressed inflow\n"
    );
    println!(
        "| scenario | msgs | delay mean | p95 | max | bound N·L/4 | max/bound | Graph request mean | 429s | lost | dup | DATA→250 p50 / p99 / max (ms) | SMTP errors | seed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for sc in &scenarios {
        let f = run(sc, scale).await;
        println!(
            "| {} | {} | {:.1} s | {:.1} s | {:.1} s | {} | {} | {:.2} s | {} | {} | {} | {:.1} / {:.1} / {:.1} | {} | {} |",
            sc.name,
            f.n,
            f.mean,
            f.p95,
            f.max,
            if sc.surge {
                format!("{:.1} s", f.bound)
            } else {
                "—".into()
            },
            if sc.surge {
                format!("{:.2}", f.max / f.bound)
            } else {
                "—".into()
            },
            f.request_mean,
            f.throttled,
            f.lost,
            f.duplicated,
            f.data_p50_ms,
            f.data_p99_ms,
            f.data_max_ms,
            f.smtp_errors,
            sc.seed
        );
    }
}
