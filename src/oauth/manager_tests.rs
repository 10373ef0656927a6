//! The token manager against a tiny token endpoint on loopback: refresh and rotation, `invalid_grant` turning into the re-consent state, concurrent callers sharing one refresh, backoff after a failing endpoint, app-only tokens, and invalidation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};

use super::*;
use crate::config::{Endpoints, Provider, Proxy};
use crate::oauth::flows::Settings;

const IDENTITY: &str = "a@example.com";

/// What the fake token endpoint saw and will answer.
struct Endpoint {
    forms: StdMutex<Vec<HashMap<String, String>>>,
    answers: StdMutex<VecDeque<(u16, Value)>>,
    /// Requests wait until this is true (to hold a refresh in flight).
    open: tokio::sync::watch::Sender<bool>,
}

/// A token endpoint on 127.0.0.1, stopped when dropped.
struct Fake {
    state: Arc<Endpoint>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    async fn start(answers: Vec<(u16, Value)>) -> Fake {
        let state = Arc::new(Endpoint {
            forms: StdMutex::new(Vec::new()),
            answers: StdMutex::new(answers.into()),
            open: tokio::sync::watch::channel(true).0,
        });
        let app = axum::Router::new()
            .route("/token", post(answer))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake { state, url, task }
    }

    fn calls(&self) -> usize {
        self.state.forms.lock().unwrap().len()
    }

    fn form(&self, i: usize) -> HashMap<String, String> {
        self.state.forms.lock().unwrap()[i].clone()
    }
}

async fn answer(
    State(e): State<Arc<Endpoint>>,
    Form(form): Form<HashMap<String, String>>,
) -> (StatusCode, axum::Json<Value>) {
    e.forms.lock().unwrap().push(form);
    let mut open = e.open.subscribe();
    let _ = open.wait_for(|o| *o).await;
    let (status, body) = e
        .answers
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((500, json!({"error": "server_error"})));
    (StatusCode::from_u16(status).unwrap(), axum::Json(body))
}

fn granted(access: &str, refresh: Option<&str>) -> (u16, Value) {
    let mut v = json!({"access_token": access, "token_type": "Bearer", "expires_in": 3600});
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    (200, v)
}

/// A manager for [`IDENTITY`] talking to `fake`, its store in `dir`.
fn manager(fake: &Fake, dir: &std::path::Path, flow: Flow) -> TokenManager {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = Settings {
        provider: Provider::Custom,
        flow,
        client_id: "cid".into(),
        client_secret: Secret::new("client-s3cret"),
        client_certificate: None,
        endpoints: Endpoints {
            authorize: String::new(),
            token: fake.url.clone(),
            device: String::new(),
        },
        scope: "mail.send offline_access".into(),
        redirect_url: String::new(),
        store: dir.join("tokens.json"),
        ca_file: None,
        proxy: Proxy::default(),
        timeout: Duration::from_secs(10),
        default_identity: IDENTITY.into(),
        known_identities: Vec::new(),
    };
    let http = settings.http_client().unwrap();
    let store = TokenStore::new(settings.store.clone());
    let identity = if flow == Flow::ClientCredentials {
        APP_IDENTITY.to_string()
    } else {
        IDENTITY.to_string()
    };
    TokenManager::new(identity, TokenClient::new(Arc::new(settings), http), store)
}

fn signed_in(dir: &std::path::Path, refresh: &str) {
    TokenStore::new(dir.join("tokens.json"))
        .put(
            IDENTITY,
            StoredGrant {
                refresh_token: Secret::new(refresh),
                client_id: "cid".into(),
                scope: "mail.send offline_access".into(),
                updated_at: 1,
                reconsent: None,
            },
        )
        .unwrap();
}

fn stored(dir: &std::path::Path) -> Option<StoredGrant> {
    TokenStore::new(dir.join("tokens.json"))
        .get(IDENTITY)
        .unwrap()
}

#[tokio::test]
async fn refresh_uses_the_stored_grant_persists_the_rotation_and_caches() {
    let fake = Fake::start(vec![granted("at-1", Some("rt-2"))]).await;
    let dir = tempfile::tempdir().unwrap();
    signed_in(dir.path(), "rt-1");
    let m = manager(&fake, dir.path(), Flow::AuthorizationCode);
    assert_eq!(m.phase(), Phase::Idle);
    assert_eq!(m.token().await.unwrap().expose(), "at-1");
    let f = fake.form(0);
    assert_eq!(f["grant_type"], "refresh_token");
    assert_eq!(f["refresh_token"], "rt-1");
    assert_eq!(f["client_id"], "cid");
    assert_eq!(f["scope"], "mail.send offline_access");
    assert_eq!(m.phase(), Phase::Ok);
    // The rotated refresh token replaced the old one in the store.
    assert_eq!(stored(dir.path()).unwrap().refresh_token.expose(), "rt-2");
    // Valid for an hour: the next caller gets it without a request.
    assert_eq!(m.token().await.unwrap().expose(), "at-1");
    assert_eq!(fake.calls(), 1);
    let st = m.status();
    assert_eq!(st["state"], "ok");
    assert_eq!(st["has_refresh_token"], true);
    assert!(!st.to_string().contains("at-1") && !st.to_string().contains("rt-2"));
}

#[tokio::test]
async fn invalid_grant_means_reconsent_and_stops_calling_the_endpoint() {
    let refused = (
        400,
        json!({"error": "invalid_grant", "error_description": "AADSTS70043: expired"}),
    );
    let fake = Fake::start(vec![refused]).await;
    let dir = tempfile::tempdir().unwrap();
    signed_in(dir.path(), "rt-old");
    let m = manager(&fake, dir.path(), Flow::AuthorizationCode);
    let e = m.token().await.unwrap_err();
    assert!(
        matches!(&e, TokenError::ReconsentNeeded(t) if t.contains("AADSTS70043")),
        "{e}"
    );
    assert_eq!(m.phase(), Phase::ReconsentNeeded);
    // The store says so too, so the CLI and a restart see it; the refused token is gone.
    let g = stored(dir.path()).unwrap();
    assert!(g.refresh_token.is_empty());
    assert!(g.reconsent.unwrap().contains("invalid_grant"));
    // Mail keeps asking; the endpoint is not asked again until a new sign-in.
    let e = m.token().await.unwrap_err();
    assert!(matches!(e, TokenError::ReconsentNeeded(_)), "{e}");
    assert_eq!(fake.calls(), 1);
    assert_eq!(m.status()["state"], "reconsent_needed");
    // A new sign-in ends the state.
    m.complete_login(super::Grant {
        access_token: Secret::new("at-new"),
        refresh_token: Some(Secret::new("rt-new")),
        expires_in: Duration::from_secs(3600),
        scope: None,
    })
    .await;
    assert_eq!(m.phase(), Phase::Ok);
    assert_eq!(m.token().await.unwrap().expose(), "at-new");
    assert_eq!(stored(dir.path()).unwrap().refresh_token.expose(), "rt-new");
}

#[tokio::test]
async fn concurrent_callers_share_one_refresh() {
    let fake = Fake::start(vec![granted("at-shared", None)]).await;
    fake.state.open.send_replace(false);
    let dir = tempfile::tempdir().unwrap();
    signed_in(dir.path(), "rt-1");
    let m = Arc::new(manager(&fake, dir.path(), Flow::AuthorizationCode));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let m = m.clone();
        set.spawn(async move { m.token().await });
    }
    // Hold the first refresh at the endpoint until it has arrived, so every
    // other caller finds it in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake.calls() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh arrived");
        tokio::task::yield_now().await;
    }
    fake.state.open.send_replace(true);
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap().expose(), "at-shared");
    }
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn an_unavailable_endpoint_backs_off_and_keeps_the_refresh_token() {
    let fake = Fake::start(vec![(503, json!({"error": "temporarily_unavailable"}))]).await;
    let dir = tempfile::tempdir().unwrap();
    signed_in(dir.path(), "rt-1");
    let m = manager(&fake, dir.path(), Flow::AuthorizationCode);
    let e = m.token().await.unwrap_err();
    assert!(matches!(e, TokenError::Unavailable(_)), "{e}");
    assert_eq!(m.phase(), Phase::Unavailable);
    // Within the backoff the endpoint is left alone.
    let e = m.token().await.unwrap_err();
    assert!(
        matches!(&e, TokenError::Unavailable(t) if t.contains("next try in")),
        "{e}"
    );
    assert_eq!(fake.calls(), 1);
    assert!(m.status()["retry_in_secs"].as_u64().is_some_and(|s| s > 0));
    // The refresh token is kept through an outage (only invalid_grant drops it).
    assert_eq!(stored(dir.path()).unwrap().refresh_token.expose(), "rt-1");
}

#[tokio::test]
async fn no_sign_in_needs_login_without_a_request() {
    let fake = Fake::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(&fake, dir.path(), Flow::AuthorizationCode);
    let e = m.token().await.unwrap_err();
    assert!(
        matches!(&e, TokenError::ReconsentNeeded(t) if t.contains("no OAuth sign-in")),
        "{e}"
    );
    assert_eq!(m.phase(), Phase::NeedsLogin);
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn invalidate_forces_a_new_token_and_rejected_shows_why() {
    let fake = Fake::start(vec![granted("at-1", None), granted("at-2", None)]).await;
    let dir = tempfile::tempdir().unwrap();
    signed_in(dir.path(), "rt-1");
    let m = manager(&fake, dir.path(), Flow::AuthorizationCode);
    let t1 = m.token().await.unwrap();
    // Invalidating another token changes nothing.
    m.invalidate(&Secret::new("someone-else"));
    assert_eq!(m.token().await.unwrap(), t1);
    m.invalidate(&t1);
    assert_eq!(m.token().await.unwrap().expose(), "at-2");
    assert_eq!(fake.calls(), 2);
    m.rejected("535 5.7.3 Authentication unsuccessful");
    assert_eq!(m.phase(), Phase::ReconsentNeeded);
    assert_eq!(
        m.status()["last_error"],
        "535 5.7.3 Authentication unsuccessful"
    );
}

#[tokio::test]
async fn app_only_tokens_use_client_credentials_and_store_nothing() {
    let fake = Fake::start(vec![
        granted("app-1", None),
        (
            400,
            json!({"error": "invalid_client", "error_description": "AADSTS7000222"}),
        ),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(&fake, dir.path(), Flow::ClientCredentials);
    assert_eq!(m.token().await.unwrap().expose(), "app-1");
    let f = fake.form(0);
    assert_eq!(f["grant_type"], "client_credentials");
    assert_eq!(f["client_secret"], "client-s3cret");
    assert!(!dir.path().join("tokens.json").exists());
    // A refused app is a configuration problem, not a sign-in one.
    m.invalidate(&Secret::new("app-1"));
    let e = m.token().await.unwrap_err();
    assert!(
        matches!(&e, TokenError::Config(t) if t.contains("AADSTS7000222")),
        "{e}"
    );
    assert_eq!(m.phase(), Phase::Config);
    m.rejected("403 from the upstream");
    assert_eq!(m.phase(), Phase::Config);
}
