//! The command line: `run`, `check`, `status`, `failback` and `queue …`, with exit codes scripts can rely on (0 ok, 1 failed or not found, 2 bad usage or configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// `println!` for the CLI's output: a reader that went away (`… | head -1`)
/// ends the command quietly with exit 0 instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the CLI's output (see [`outln!`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

pub mod auth;
pub mod sendmail;
pub mod status;

/// Write to stdout; a closed pipe ends the process with exit 0 (the reader
/// has all it wanted), any other write error with exit 1.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("mailbridge: cannot write the output: {e}");
        std::process::exit(i32::from(FAILED));
    }
}

use crate::config::Config;
use crate::spool::{RcptStatus, Spool};

/// mailbridge: a local SMTP relay for legacy software, delivering upstream over SMTP/SMTPS with failover.
#[derive(Debug, Parser)]
#[command(name = "mailbridge", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "MAILBRIDGE_CONFIG",
        default_value = "config.toml"
    )]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (SMTP listener, delivery, admin endpoint) until SIGTERM/SIGINT; SIGHUP reloads.
    Run,
    /// Validate the configuration and print it with secrets masked.
    Check,
    /// Show the running relay's status: the active server and why, the
    /// queue, the OAuth identities (`--json`: the admin endpoint's document).
    Status {
        /// Print the JSON document instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Return delivery to the primary server.
    Failback,
    /// Inspect and control the queue.
    Queue {
        /// What to do with the queue.
        #[command(subcommand)]
        action: QueueAction,
    },
    /// OAuth sign-in and token state: `auth login [--device]`, `auth status`, `auth logout`.
    Auth {
        /// What to do.
        #[command(subcommand)]
        action: auth::AuthAction,
    },
    /// Send a sample mail through the running relay and show the upstream's answer.
    SendTest {
        /// Recipient address.
        #[arg(long)]
        to: String,
    },
    /// Read a password (without echo on a terminal; else one line on stdin) and print its argon2id hash for `[[users]] password_hash`.
    HashPassword,
    /// Read a message on stdin and send it, as `/usr/sbin/sendmail` does
    /// (`-t`, `-i`, `-f`, `-F`, `-v`, recipients); also how the binary acts
    /// when called as `sendmail`.
    #[command(disable_help_flag = true)]
    Sendmail {
        /// sendmail options and recipients.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Exit 0 when the running relay is ready to accept mail (`/readyz`), else 1.
    Health,
}

/// Queue subcommands.
#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// One line per queued message.
    List,
    /// A message's metadata and headers.
    Show {
        /// Queue id.
        id: String,
    },
    /// Try a message again now (`--all`: every queued message).
    Retry {
        /// Queue id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every message in the queue.
        #[arg(long)]
        all: bool,
    },
    /// Remove a message without delivering it.
    Delete {
        /// Queue id.
        id: String,
    },
}

/// Exit code: failure or not found.
const FAILED: u8 = 1;
/// Exit code: bad usage or configuration.
const BAD_CONFIG: u8 = 2;

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("mailbridge: {e}");
        ExitCode::from(BAD_CONFIG)
    })
}

/// Parse the command line and run it.
pub fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    let called_as = argv
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if called_as == "sendmail" {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let args: Vec<String> = argv.map(|a| a.to_string_lossy().into_owned()).collect();
        return sendmail::main(&args, None);
    }
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Command::Sendmail { args } = &cli.command {
        // `--config` only when given (sendmail's default is /etc/mailbridge).
        let given = (matches.value_source("config")
            != Some(clap::parser::ValueSource::DefaultValue))
        .then(|| cli.config.clone());
        return sendmail::main(args, given);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Command::HashPassword = cli.command {
        // Needs no configuration.
        return auth::hash_password_command();
    }
    let cfg = match load(&cli.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Command::Run => {
            if let Err(e) = cfg.check_environment() {
                eprintln!("mailbridge: {}: {e}", cli.config.display());
                return ExitCode::from(FAILED);
            }
            run(cfg, cli.config)
        }
        Command::Check => {
            if let Err(e) = cfg.check_environment() {
                eprintln!("mailbridge: {}: {e}", cli.config.display());
                return ExitCode::from(BAD_CONFIG);
            }
            out!("{}", cfg.to_masked_toml());
            for n in cfg.notices() {
                eprintln!("mailbridge: notice: {n}");
            }
            for f in &cfg.from_env {
                eprintln!("mailbridge: {} = {} (from {})", f.key, f.shown, f.var);
            }
            if cli.config.exists() {
                eprintln!("mailbridge: {} is valid", cli.config.display());
            } else {
                eprintln!(
                    "mailbridge: the configuration is valid (no file {}: environment only)",
                    cli.config.display()
                );
            }
            ExitCode::SUCCESS
        }
        Command::Status { json } => status::command(&cfg, json),
        Command::Failback => admin_call(&cfg, "POST", "/failback", true),
        Command::Queue { action } => queue(&cfg, action),
        Command::Auth { action } => auth::auth_command(&cfg, action),
        Command::SendTest { to } => auth::send_test_command(&cfg, &to),
        Command::HashPassword => auth::hash_password_command(),
        Command::Sendmail { .. } => ExitCode::from(BAD_CONFIG),
        Command::Health => health(&cfg),
    }
}

fn init_logging(level: &str, format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        // One object per line; every string is JSON-escaped, so no field
        // (a client's AUTH name, header text) can start a new line.
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        crate::config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("mailbridge: cannot start the runtime: {e}");
            ExitCode::from(FAILED)
        })
}

fn run(cfg: Config, path: PathBuf) -> ExitCode {
    init_logging(&cfg.log_level, cfg.log_format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let result = rt.block_on(async move {
        let smtp = tokio::net::TcpListener::bind(&cfg.listen.address)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "listen.address: cannot listen on {}: {e}",
                    cfg.listen.address
                )
            })?;
        let admin = if cfg.admin.address.is_empty() {
            None
        } else {
            Some(
                tokio::net::TcpListener::bind(&cfg.admin.address)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "admin.address: cannot listen on {}: {e}",
                            cfg.admin.address
                        )
                    })?,
            )
        };
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            s.cancel();
        });
        let smtps = if cfg.listen.implicit_tls_address.is_empty() {
            None
        } else {
            Some(
                tokio::net::TcpListener::bind(&cfg.listen.implicit_tls_address)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "listen.implicit_tls_address: cannot listen on {}: {e}",
                            cfg.listen.implicit_tls_address
                        )
                    })?,
            )
        };
        crate::run(
            cfg,
            Some(path),
            crate::Listeners { smtp, admin, smtps },
            shutdown,
        )
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("mailbridge: {e:#}");
            ExitCode::from(FAILED)
        }
    }
}

/// A client for the local admin endpoint: never through a proxy, no
/// redirects followed (the OAuth start answers with one to read).
pub(crate) fn admin_client(timeout: std::time::Duration) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

/// What to tell the operator when an admin request failed.
pub(crate) fn admin_error(cfg: &Config, e: &reqwest::Error) -> String {
    if e.is_connect() {
        format!(
            "mailbridge is not running (nothing answers at {})",
            cfg.admin.address
        )
    } else {
        e.to_string()
    }
}

/// A single-threaded runtime for one CLI command.
pub(crate) fn cli_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// The answer of an admin call: HTTP status and body.
pub(crate) enum AdminAnswer {
    Reply(u16, String),
    Unreachable(String),
}

pub(crate) fn admin_request(cfg: &Config, method: &str, path: &str, auth: bool) -> AdminAnswer {
    if cfg.admin.address.is_empty() {
        return AdminAnswer::Unreachable(
            "the admin endpoint is disabled (admin.address is empty)".into(),
        );
    }
    let token = if auth {
        match crate::admin_token(cfg, false) {
            Ok(t) => Some(t),
            Err(e) => {
                return AdminAnswer::Unreachable(format!(
                    "no admin token (admin.token, or spool/admin.token: {e}); is mailbridge running?"
                ));
            }
        }
    } else {
        None
    };
    let rt = match cli_runtime() {
        Ok(rt) => rt,
        Err(e) => return AdminAnswer::Unreachable(e),
    };
    let url = format!("http://{}{}", cfg.admin.address, path);
    rt.block_on(async move {
        let client = match admin_client(std::time::Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => return AdminAnswer::Unreachable(e),
        };
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = client.request(method, &url);
        if let Some(t) = token {
            req = req.bearer_auth(t.expose());
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                AdminAnswer::Reply(status, resp.text().await.unwrap_or_default())
            }
            Err(e) => AdminAnswer::Unreachable(admin_error(cfg, &e)),
        }
    })
}

pub(crate) fn pretty(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.to_string())
}

pub(crate) fn admin_call(cfg: &Config, method: &str, path: &str, auth: bool) -> ExitCode {
    match admin_request(cfg, method, path, auth) {
        AdminAnswer::Reply(200, body) => {
            outln!("{}", pretty(&body));
            ExitCode::SUCCESS
        }
        other => admin_failed(other),
    }
}

/// Report an answer other than `200` (or no answer) on stderr.
pub(crate) fn admin_failed(answer: AdminAnswer) -> ExitCode {
    match answer {
        AdminAnswer::Reply(code, body) => {
            eprintln!(
                "mailbridge: admin endpoint answered {code}: {}",
                pretty(&body)
            );
        }
        AdminAnswer::Unreachable(why) => eprintln!("mailbridge: {why}"),
    }
    ExitCode::from(FAILED)
}

pub(crate) fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Entries `queue list` reads from disk at a time.
const LIST_PAGE: usize = 500;

fn queue(cfg: &Config, action: QueueAction) -> ExitCode {
    let root = cfg.path(&cfg.spool.path);
    match action {
        QueueAction::List => {
            // Read a page at a time: a large queue is never held in memory whole.
            let ids = match Spool::list_ids(&root) {
                Ok(ids) => ids,
                Err(e) => {
                    eprintln!(
                        "mailbridge: spool.path: cannot read {}: {e}",
                        root.display()
                    );
                    return ExitCode::from(FAILED);
                }
            };
            let now = crate::scheduler::now_unix();
            outln!(
                "{:<24} {:>5} {:>8} {:>7} {:<20} {:<30} LAST ERROR",
                "ID",
                "AGE",
                "ATTEMPTS",
                "PENDING",
                "STATE",
                "FROM"
            );
            let mut listed = 0;
            for page in ids.chunks(LIST_PAGE) {
                let metas = match Spool::read_metas(&root, page) {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!(
                            "mailbridge: spool.path: cannot read {}: {e}",
                            root.display()
                        );
                        return ExitCode::from(FAILED);
                    }
                };
                listed += metas.len();
                for m in &metas {
                    let pending = m
                        .rcpts
                        .iter()
                        .filter(|r| r.status == RcptStatus::Pending)
                        .count();
                    let from = if m.from.is_empty() { "<>" } else { &m.from };
                    let from = crate::text::for_log(from);
                    outln!(
                        "{:<24} {:>5} {:>8} {:>7} {:<20} {:<30} {}",
                        m.id,
                        age(now.saturating_sub(m.received_at)),
                        m.attempts,
                        format!("{pending}/{}", m.rcpts.len()),
                        m.state(),
                        from,
                        crate::text::for_log(m.last_error.as_deref().unwrap_or("-"))
                    );
                }
            }
            eprintln!("{listed} message(s) queued in {}", root.display());
            ExitCode::SUCCESS
        }
        QueueAction::Show { id } => {
            if !crate::spool::is_valid_id(&id) {
                eprintln!("mailbridge: `{id}` is not a queue id");
                return ExitCode::from(BAD_CONFIG);
            }
            match crate::spool::read_entry(&root, &id) {
                Ok((meta, body)) => {
                    // Escaped: a header (or a tampered file) must not drive the terminal.
                    let meta = serde_json::to_string_pretty(&meta).unwrap_or_default();
                    outln!("{}", crate::text::for_terminal(&meta));
                    let (_, end) = crate::message::fields(&body);
                    let head = String::from_utf8_lossy(&body[..end]);
                    outln!("\n{}", crate::text::for_terminal(head.trim_end()));
                    ExitCode::SUCCESS
                }
                _ => {
                    eprintln!("mailbridge: no message {id} in the queue");
                    ExitCode::from(FAILED)
                }
            }
        }
        QueueAction::Retry { all: true, .. } => retry_all(cfg, &root),
        QueueAction::Retry { id, .. } => {
            queue_change(cfg, &root, "POST", id.as_deref().unwrap_or(""), "retry")
        }
        QueueAction::Delete { id } => queue_change(cfg, &root, "DELETE", &id, "delete"),
    }
}

/// `queue retry --all`: every message due now, through the running relay or,
/// when it is not running, in the spool directly.
fn retry_all(cfg: &Config, root: &Path) -> ExitCode {
    match admin_request(cfg, "POST", "/queue/retry-all", true) {
        AdminAnswer::Reply(200, body) => {
            let n = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["retried"].as_u64())
                .unwrap_or(0);
            outln!("{n} message(s) will be retried now");
            ExitCode::SUCCESS
        }
        AdminAnswer::Reply(code, body) => {
            eprintln!(
                "mailbridge: admin endpoint answered {code}: {}",
                pretty(&body)
            );
            ExitCode::from(FAILED)
        }
        AdminAnswer::Unreachable(_) => {
            // One spool opening (and one listing of `queue/`) for all of them.
            let spool = match open_offline(cfg, root, "retry") {
                Ok(s) => s,
                Err(code) => return code,
            };
            let ids: Vec<String> = match Spool::list_ids(root) {
                Ok(ids) => ids,
                Err(e) => {
                    eprintln!(
                        "mailbridge: spool.path: cannot read {}: {e}",
                        root.display()
                    );
                    return ExitCode::from(FAILED);
                }
            };
            let mut code = ExitCode::SUCCESS;
            for id in &ids {
                if change_offline(&spool, id, "retry") != ExitCode::SUCCESS {
                    code = ExitCode::from(FAILED);
                }
            }
            eprintln!("{} message(s) due now", ids.len());
            code
        }
    }
}

/// Retry or delete through the running relay; when it is not running, edit the spool directly.
fn queue_change(cfg: &Config, root: &Path, method: &str, id: &str, what: &str) -> ExitCode {
    if !crate::spool::is_valid_id(id) {
        eprintln!("mailbridge: `{id}` is not a queue id");
        return ExitCode::from(BAD_CONFIG);
    }
    let path = if what == "retry" {
        format!("/queue/{id}/retry")
    } else {
        format!("/queue/{id}")
    };
    match admin_request(cfg, method, &path, true) {
        AdminAnswer::Reply(200, _) => {
            outln!(
                "{id}: {}",
                if what == "retry" {
                    "will be retried now"
                } else {
                    "deleted"
                }
            );
            ExitCode::SUCCESS
        }
        AdminAnswer::Reply(404, _) => {
            eprintln!("mailbridge: no message {id} in the queue");
            ExitCode::from(FAILED)
        }
        AdminAnswer::Reply(code, body) => {
            eprintln!(
                "mailbridge: admin endpoint answered {code}: {}",
                pretty(&body)
            );
            ExitCode::from(FAILED)
        }
        AdminAnswer::Unreachable(_) => offline_change(cfg, root, id, what),
    }
}

fn offline_change(cfg: &Config, root: &Path, id: &str, what: &str) -> ExitCode {
    match open_offline(cfg, root, what) {
        Ok(spool) => change_offline(&spool, id, what),
        Err(code) => code,
    }
}

/// The spool opened for an edit while no daemon runs; the exit code (after
/// saying why) when it cannot be.
fn open_offline(cfg: &Config, root: &Path, what: &str) -> Result<Spool, ExitCode> {
    match Spool::open(root, cfg.spool.max_messages) {
        Ok(s) => Ok(s),
        // A daemon runs (it holds the spool lock) but its admin endpoint did
        // not answer: editing under it would corrupt its queue.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            eprintln!(
                "mailbridge: {e}: a running mailbridge holds the spool, but its admin endpoint did not answer; \
                 {what} the message through the running daemon (enable or fix [admin] and retry), or stop it first"
            );
            Err(ExitCode::from(FAILED))
        }
        Err(e) => {
            eprintln!(
                "mailbridge: spool.path: cannot open {}: {e}",
                root.display()
            );
            Err(ExitCode::from(FAILED))
        }
    }
}

/// Retry (make due now) or delete `id` in a spool opened offline.
fn change_offline(spool: &Spool, id: &str, what: &str) -> ExitCode {
    let mut meta = match spool.read_meta(id) {
        Ok(m) => m,
        Err(_) => {
            eprintln!("mailbridge: no message {id} in the queue");
            return ExitCode::from(FAILED);
        }
    };
    let result = if what == "retry" {
        meta.next_attempt = 0;
        spool.update(&meta)
    } else {
        spool.remove(id)
    };
    match result {
        Ok(()) => {
            outln!(
                "{id}: {} (mailbridge is not running; spool edited directly)",
                if what == "retry" {
                    "due now"
                } else {
                    "deleted"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailbridge: cannot {what} {id}: {e}");
            ExitCode::from(FAILED)
        }
    }
}

/// `mailbridge health`: 0 when `/readyz` answers 200 (for a container HEALTHCHECK).
fn health(cfg: &Config) -> ExitCode {
    match admin_request(cfg, "GET", "/readyz", false) {
        AdminAnswer::Reply(200, body) => {
            outln!("{}", body.trim_end());
            ExitCode::SUCCESS
        }
        AdminAnswer::Reply(code, body) => {
            eprintln!("mailbridge: not ready ({code}): {}", body.trim_end());
            ExitCode::from(FAILED)
        }
        AdminAnswer::Unreachable(why) => {
            eprintln!("mailbridge: {why}");
            ExitCode::from(FAILED)
        }
    }
}
