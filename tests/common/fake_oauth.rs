//! A fake OAuth2 authorization server for integration tests, shaped like Entra ID v2 and Google (UPSTREAMS.md §6): authorize, token (code + PKCE, refresh with rotation, client credentials, device code) and device endpoints, with their error bodies; plus a log capture to check that no secret reaches the logs.
//!
//! # API
//!
//! ```ignore
//! let fake = FakeOAuth::start(Shape::Entra).await;       // or Shape::Google
//! fake.base();                 // "http://127.0.0.1:PORT"
//! fake.authorize_url(); fake.token_url(); fake.device_url();
//! fake.add_refresh_token("a@x", "rt-…");  // a grant signed in earlier
//! fake.set(|s| s.down = true);            // 503 from the token endpoint
//! fake.set(|s| s.refresh_error = Some(RefreshError::Aadsts70043));
//! fake.set(|s| s.device_script = vec![Pending, Pending, SlowDown, Approve("a@x")]);
//! fake.calls("refresh_token");  // token calls by grant type
//! fake.valid_token("a@x", "at-…");  // for the XOAUTH2 fake SMTP
//! fake.secrets();               // every secret issued or configured, for log checks
//! fake.register_certificate(cert_pem, key_pem); // accept client_assertion JWTs signed by it
//! fake.introspect_url();        // RFC 7662 token introspection (for Dovecot's passdb oauth2)
//! fake.set(|s| s.token_len = 3000);  // issue access tokens at least this long
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::json;
use sha2::Digest as _;
use tokio::task::JoinHandle;

/// The client id the fake knows.
pub const CLIENT_ID: &str = "4f1e2d3c-0000-4000-8000-00000000c11e";
/// Its secret.
pub const CLIENT_SECRET: &str = "cl1ent~SECRET~value";
/// The tenant in Entra-shaped URLs.
pub const TENANT: &str = "contoso.onmicrosoft.com";

/// Which provider the fake imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Entra ID v2: refresh requires `scope` (AADSTS900144), rotates refresh
    /// tokens, AADSTS error bodies, `verification_uri`.
    Entra,
    /// Google: no rotation on refresh, `verification_url`, plain error bodies.
    Google,
}

/// How a refresh is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshError {
    /// `invalid_grant` AADSTS70043 (sign-in frequency, token expired).
    Aadsts70043,
    /// Google's `invalid_grant` "Token has been expired or revoked."
    GoogleRevoked,
    /// `invalid_client` AADSTS7000222 (client secret expired).
    Aadsts7000222,
}

/// One scripted answer to a device code poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceStep {
    /// `authorization_pending`.
    Pending,
    /// `slow_down`.
    SlowDown,
    /// `expired_token`.
    Expired,
    /// `authorization_declined`.
    Declined,
    /// The user signed in as this identity: tokens.
    Approve(String),
}

/// The fake's behaviour and records.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Token endpoint answers 503.
    pub down: bool,
    /// Refresh answers this error.
    pub refresh_error: Option<RefreshError>,
    /// The authorize endpoint denies consent (`error=access_denied`).
    pub deny_consent: bool,
    /// Who "signs in" at the authorize endpoint.
    pub consent_identity: String,
    /// Access token lifetime in seconds.
    pub lifetime: u64,
    /// Old refresh tokens stop working after a rotation (Entra keeps them;
    /// this makes "the new one was stored" observable).
    pub revoke_rotated: bool,
    /// Access tokens are padded to at least this many characters (JWTs
    /// from Entra ID are often over 1500; 0 = short tokens).
    pub token_len: usize,
    /// The `email` an introspection reports for app-only (client
    /// credentials) tokens; empty = none.
    pub app_email: String,
    /// Introspection requests answered, active or not.
    pub introspections: usize,
    /// Answers to device code polls, in order (the last one repeats).
    pub device_script: Vec<DeviceStep>,
    /// `expires_in` of device code answers, instead of the provider's usual value.
    pub device_expires_in: Option<u64>,
    /// Token endpoint calls by grant type.
    pub calls: HashMap<String, usize>,
    /// Every token endpoint form, in order (secrets included: never print).
    pub forms: Vec<HashMap<String, String>>,
    /// When each device poll arrived (tokio time).
    pub device_polls: Vec<tokio::time::Instant>,
    /// The registered certificate: its `x5t` and RSA public key (RSAPublicKey
    /// DER); `client_assertion`s are verified against it.
    pub certificate: Option<RegisteredCert>,
    codes: HashMap<String, Code>,
    /// refresh token → (identity, scope)
    refresh_tokens: HashMap<String, String>,
    /// access token → identity
    access_tokens: HashMap<String, String>,
    device_codes: HashMap<String, usize>,
    issued: usize,
    authorize_requests: Vec<HashMap<String, String>>,
}

/// A certificate registered on the fake application.
#[derive(Debug, Clone)]
pub struct RegisteredCert {
    /// base64url(SHA-1(cert DER)).
    pub x5t: String,
    /// RSAPublicKey DER (what `ring`'s RSA verification takes).
    pub public_key: Vec<u8>,
    /// The expected `aud`: the token URL.
    pub audience: String,
}

#[derive(Debug, Clone)]
struct Code {
    challenge: String,
    redirect_uri: String,
    identity: String,
    used: bool,
}

struct Inner {
    shape: Shape,
    state: Mutex<FakeState>,
}

/// A running fake authorization server.
pub struct FakeOAuth {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: Option<JoinHandle<()>>,
}

fn lock(i: &Inner) -> std::sync::MutexGuard<'_, FakeState> {
    i.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeOAuth {
    /// Bind 127.0.0.1:0 and serve.
    pub async fn start(shape: Shape) -> FakeOAuth {
        let inner = Arc::new(Inner {
            shape,
            state: Mutex::new(FakeState {
                lifetime: 3599,
                consent_identity: "user@contoso.com".into(),
                ..FakeState::default()
            }),
        });
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/authorize", get(authorize))
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/{tenant}/oauth2/v2.0/devicecode", post(devicecode))
            .route("/o/oauth2/v2/auth", get(authorize))
            .route("/token", post(token))
            .route("/device/code", post(devicecode))
            .route("/introspect", post(introspect))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOAuth {
            addr,
            inner,
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn prefix(&self) -> String {
        match self.inner.shape {
            Shape::Entra => format!("{}/{TENANT}/oauth2/v2.0", self.base()),
            Shape::Google => self.base(),
        }
    }

    /// The authorize endpoint.
    pub fn authorize_url(&self) -> String {
        match self.inner.shape {
            Shape::Entra => format!("{}/authorize", self.prefix()),
            Shape::Google => format!("{}/o/oauth2/v2/auth", self.base()),
        }
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.prefix())
    }

    /// The RFC 7662 introspection endpoint: `token=<access token>` in, `{"active":…,"email":…}` out.
    pub fn introspect_url(&self) -> String {
        format!("{}/introspect", self.base())
    }

    /// The device authorization endpoint.
    pub fn device_url(&self) -> String {
        match self.inner.shape {
            Shape::Entra => format!("{}/devicecode", self.prefix()),
            Shape::Google => format!("{}/device/code", self.base()),
        }
    }

    /// Change behaviour or read records.
    pub fn set<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut lock(&self.inner))
    }

    /// A grant signed in earlier: `refresh` is valid for `identity`.
    pub fn add_refresh_token(&self, identity: &str, refresh: &str) {
        lock(&self.inner)
            .refresh_tokens
            .insert(refresh.into(), identity.into());
    }

    /// Token endpoint calls with this grant type (`refresh_token`, …).
    pub fn calls(&self, grant_type: &str) -> usize {
        lock(&self.inner)
            .calls
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }

    /// All token endpoint calls.
    pub fn total_calls(&self) -> usize {
        lock(&self.inner).calls.values().sum()
    }

    /// True when `token` is a live access token issued for `identity`
    /// (client credentials tokens are valid for any identity).
    pub fn valid_token(&self, identity: &str, token: &str) -> bool {
        lock(&self.inner)
            .access_tokens
            .get(token)
            .is_some_and(|who| who == identity || who == "app")
    }

    /// Forget every access token (they "expired" upstream).
    pub fn expire_access_tokens(&self) {
        lock(&self.inner).access_tokens.clear();
    }

    /// Register a certificate (PEM) and take the public key of its PKCS#8
    /// RSA private key (PEM) as the one assertions must be signed with.
    pub fn register_certificate(&self, cert_pem: &[u8], key_pem: &[u8]) {
        use ring::signature::KeyPair as _;
        use rustls_pki_types::pem::PemObject as _;
        let cert = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem).expect("cert PEM");
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem).expect("key PEM");
        let pair =
            ring::signature::RsaKeyPair::from_pkcs8(key.secret_pkcs8_der()).expect("RSA key");
        let x5t = B64URL.encode(ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            cert.as_ref(),
        ));
        let reg = RegisteredCert {
            x5t,
            public_key: pair.public_key().as_ref().to_vec(),
            audience: self.token_url(),
        };
        lock(&self.inner).certificate = Some(reg);
    }

    /// The query parameters of every authorize request.
    pub fn authorize_requests(&self) -> Vec<HashMap<String, String>> {
        lock(&self.inner).authorize_requests.clone()
    }

    /// Every secret involved: the client secret, codes, access and refresh tokens.
    pub fn secrets(&self) -> Vec<String> {
        let st = lock(&self.inner);
        let mut all = vec![CLIENT_SECRET.to_string()];
        all.extend(st.codes.keys().cloned());
        all.extend(st.refresh_tokens.keys().cloned());
        all.extend(st.access_tokens.keys().cloned());
        all.extend(st.device_codes.keys().cloned());
        for f in &st.forms {
            for k in [
                "code_verifier",
                "refresh_token",
                "code",
                "device_code",
                "client_secret",
                "client_assertion",
            ] {
                if let Some(v) = f.get(k) {
                    all.push(v.clone());
                }
            }
        }
        all.sort();
        all.dedup();
        all
    }

    /// Stop serving.
    pub async fn shutdown(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for FakeOAuth {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn entra_error(status: StatusCode, error: &str, code: u32, text: &str) -> Response {
    (
        status,
        Json(json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0b1c2d3e-0000-4000-8000-000000000001\r\nCorrelation ID: 11111111-2222-3333-4444-555555555555\r\nTimestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [code],
            "timestamp": "2026-01-01 00:00:00Z",
            "trace_id": "0b1c2d3e-0000-4000-8000-000000000001",
            "correlation_id": "11111111-2222-3333-4444-555555555555",
            "error_uri": "https://login.microsoftonline.com/error?code=".to_string() + &code.to_string(),
        })),
    )
        .into_response()
}

fn oauth_error(shape: Shape, status: StatusCode, error: &str, code: u32, text: &str) -> Response {
    match shape {
        Shape::Entra => entra_error(status, error, code, text),
        Shape::Google => (
            status,
            Json(json!({"error": error, "error_description": text})),
        )
            .into_response(),
    }
}

fn random(prefix: &str, n: usize) -> String {
    let bytes: [u8; 18] = rand::random();
    format!("{prefix}-{n}-{}", B64URL.encode(bytes))
}

async fn authorize(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut st = lock(&inner);
    st.authorize_requests.push(q.clone());
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let redirect = get("redirect_uri");
    if get("client_id") != CLIENT_ID {
        return (
            StatusCode::BAD_REQUEST,
            "AADSTS700016: Application not found",
        )
            .into_response();
    }
    if get("response_type") != "code"
        || get("code_challenge_method") != "S256"
        || get("code_challenge").len() != 43
        || redirect.is_empty()
        || get("state").is_empty()
    {
        return (StatusCode::BAD_REQUEST, "bad authorize request").into_response();
    }
    let sep = if redirect.contains('?') { '&' } else { '?' };
    let state = url::form_urlencoded::byte_serialize(get("state").as_bytes()).collect::<String>();
    if st.deny_consent {
        return Redirect::to(&format!(
            "{redirect}{sep}error=access_denied&error_description=AADSTS65004%3A+User+declined+to+consent+to+access+the+app.&state={state}"
        ))
        .into_response();
    }
    st.issued += 1;
    let code = random("code", st.issued);
    let identity = st.consent_identity.clone();
    st.codes.insert(
        code.clone(),
        Code {
            challenge: get("code_challenge"),
            redirect_uri: redirect.clone(),
            identity,
            used: false,
        },
    );
    Redirect::to(&format!("{redirect}{sep}code={code}&state={state}")).into_response()
}

fn issue(
    inner: &Inner,
    st: &mut FakeState,
    identity: &str,
    scope: &str,
    with_refresh: bool,
) -> Response {
    st.issued += 1;
    let mut access = random("at", st.issued);
    while access.len() < st.token_len {
        access.push_str(&B64URL.encode(rand::random::<[u8; 48]>()));
    }
    st.access_tokens
        .insert(access.clone(), identity.to_string());
    let mut body = json!({
        "token_type": "Bearer",
        "scope": scope,
        "expires_in": st.lifetime,
        "ext_expires_in": st.lifetime,
        "access_token": access,
    });
    if with_refresh {
        let refresh = random("rt", st.issued);
        st.refresh_tokens
            .insert(refresh.clone(), identity.to_string());
        body["refresh_token"] = json!(refresh);
    }
    if inner.shape == Shape::Google {
        body.as_object_mut().map(|o| o.remove("ext_expires_in"));
    }
    Json(body).into_response()
}

/// RFC 7662 §2: whether a token is live, and whose it is (`email`, what
/// Dovecot's `username_attribute` reads by default).
async fn introspect(
    State(inner): State<Arc<Inner>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let mut st = lock(&inner);
    st.introspections += 1;
    let token = f.get("token").cloned().unwrap_or_default();
    let who = st.access_tokens.get(&token).cloned();
    match who {
        Some(who) => {
            let email = if who == "app" {
                st.app_email.clone()
            } else {
                who
            };
            Json(json!({"active": true, "email": email, "token_type": "Bearer", "client_id": CLIENT_ID}))
                .into_response()
        }
        None => Json(json!({"active": false})).into_response(),
    }
}

async fn token(
    State(inner): State<Arc<Inner>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let shape = inner.shape;
    let mut st = lock(&inner);
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    *st.calls.entry(grant.clone()).or_default() += 1;
    st.forms.push(f.clone());
    if st.down {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html><body>Service Unavailable</body></html>",
        )
            .into_response();
    }
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    if get("client_id") != CLIENT_ID {
        return oauth_error(
            shape,
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application with identifier was not found in the directory.",
        );
    }
    let secret = get("client_secret");
    if !secret.is_empty() && secret != CLIENT_SECRET {
        return oauth_error(
            shape,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        );
    }
    let assertion = get("client_assertion");
    if !assertion.is_empty()
        && let Err((code, text)) = check_assertion(&st, &get("client_assertion_type"), &assertion)
    {
        return oauth_error(
            shape,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            text,
        );
    }
    let scope = get("scope");
    match grant.as_str() {
        "authorization_code" => {
            let code = get("code");
            let Some(c) = st.codes.get(&code).cloned() else {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    70000,
                    "The provided authorization code is invalid.",
                );
            };
            if c.used {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    54005,
                    "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                );
            }
            if let Some(c) = st.codes.get_mut(&code) {
                c.used = true;
            }
            if c.redirect_uri != get("redirect_uri") {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    50148,
                    "The redirect_uri does not match.",
                );
            }
            let computed = B64URL.encode(sha2::Sha256::digest(get("code_verifier").as_bytes()));
            if computed != c.challenge {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                );
            }
            let scope = if scope.is_empty() {
                "https://mail.google.com/".to_string()
            } else {
                scope
            };
            issue(&inner, &mut st, &c.identity, &scope, true)
        }
        "refresh_token" => {
            if shape == Shape::Entra && scope.is_empty() {
                return entra_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'scope'.",
                );
            }
            match st.refresh_error {
                Some(RefreshError::Aadsts70043) => {
                    return entra_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        70043,
                        "The refresh token has expired or is invalid due to sign-in frequency checks by conditional access. The token was issued on 2026-01-01T00:00:00Z and the maximum allowed lifetime for this request is 86400.",
                    );
                }
                Some(RefreshError::GoogleRevoked) => {
                    return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}))).into_response();
                }
                Some(RefreshError::Aadsts7000222) => {
                    return entra_error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        7000222,
                        "The provided client secret keys for app are expired. Visit the Azure portal to create new keys for your app.",
                    );
                }
                None => {}
            }
            let rt = get("refresh_token");
            let Some(identity) = st.refresh_tokens.get(&rt).cloned() else {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    70008,
                    "The provided authorization code or refresh token has expired due to inactivity.",
                );
            };
            let rotate = shape == Shape::Entra;
            if rotate && st.revoke_rotated {
                st.refresh_tokens.remove(&rt);
            }
            let scope = if scope.is_empty() {
                "https://mail.google.com/".to_string()
            } else {
                scope
            };
            issue(&inner, &mut st, &identity, &scope, rotate)
        }
        "client_credentials" => {
            if secret.is_empty() && assertion.is_empty() {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                );
            }
            if !scope.ends_with("/.default") {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    70011,
                    "The provided value for the input parameter 'scope' is not valid.",
                );
            }
            issue(&inner, &mut st, "app", &scope, false)
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            st.device_polls.push(tokio::time::Instant::now());
            let dc = get("device_code");
            let Some(n) = st.device_codes.get(&dc).copied() else {
                return oauth_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "bad_verification_code",
                    70019,
                    "Verification code unknown.",
                );
            };
            st.device_codes.insert(dc, n + 1);
            let step = st
                .device_script
                .get(n)
                .or(st.device_script.last())
                .cloned()
                .unwrap_or(DeviceStep::Pending);
            let pending = |e: &str, code: u32, text: &str| {
                oauth_error(shape, StatusCode::BAD_REQUEST, e, code, text)
            };
            match step {
                DeviceStep::Pending => pending(
                    "authorization_pending",
                    70016,
                    "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                ),
                DeviceStep::SlowDown => pending("slow_down", 70016, "Polling too fast."),
                DeviceStep::Expired => pending(
                    "expired_token",
                    70020,
                    "The provided value for the input parameter 'device_code' is not valid. This device code has expired.",
                ),
                DeviceStep::Declined => pending(
                    "authorization_declined",
                    70021,
                    "The user declined the authorization request.",
                ),
                DeviceStep::Approve(identity) => {
                    let scope = if scope.is_empty() {
                        "SMTP.Send".to_string()
                    } else {
                        scope
                    };
                    issue(&inner, &mut st, &identity, &scope, true)
                }
            }
        }
        _ => oauth_error(
            shape,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        ),
    }
}

/// Entra's checks of a certificate client assertion (RFC 7523): the JWT's
/// form, `alg`, `x5t`, RS256 signature, `aud`, `iss` = `sub` = client id,
/// and lifetime. `Err` is the AADSTS code and text.
fn check_assertion(
    st: &FakeState,
    assertion_type: &str,
    jwt: &str,
) -> Result<(), (u32, &'static str)> {
    const MALFORMED: (u32, &str) = (50027, "JWT token is invalid or malformed.");
    if assertion_type != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
        return Err((
            700013,
            "The client_assertion_type is not supported or is missing.",
        ));
    }
    let Some(cert) = &st.certificate else {
        return Err((
            700027,
            "The certificate with identifier used to sign the client assertion is not registered on application.",
        ));
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, sig] = parts[..] else {
        return Err(MALFORMED);
    };
    let json = |p: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&B64URL.decode(p).ok()?).ok()
    };
    let (Some(header), Some(claims), Ok(sig)) = (json(h), json(c), B64URL.decode(sig)) else {
        return Err(MALFORMED);
    };
    if header["alg"] != "RS256" {
        return Err((5002738, "Invalid JWT token. 'alg' is not supported."));
    }
    if header["x5t"] != cert.x5t.as_str() {
        return Err((
            700027,
            "The certificate with identifier used to sign the client assertion is not registered on application.",
        ));
    }
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &cert.public_key,
    );
    if key.verify(format!("{h}.{c}").as_bytes(), &sig).is_err() {
        return Err((700027, "Client assertion failed signature validation."));
    }
    if claims["aud"] != cert.audience.as_str() {
        return Err((
            700016,
            "Client assertion audience claim does not match Realm issuer.",
        ));
    }
    if claims["iss"] != CLIENT_ID || claims["sub"] != CLIENT_ID {
        return Err((
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().unwrap_or(0);
    let nbf = claims["nbf"].as_u64().unwrap_or(u64::MAX);
    if exp <= now || nbf > now + 300 || exp > now + 3600 {
        return Err((
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    if claims["jti"].as_str().is_none_or(str::is_empty) {
        return Err(MALFORMED);
    }
    Ok(())
}

async fn devicecode(
    State(inner): State<Arc<Inner>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let mut st = lock(&inner);
    if f.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return oauth_error(
            inner.shape,
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application not found.",
        );
    }
    st.issued += 1;
    let dc = random("dc", st.issued);
    st.device_codes.insert(dc.clone(), 0);
    let expires = st.device_expires_in;
    match inner.shape {
        Shape::Entra => Json(json!({
            "device_code": dc,
            "user_code": "FAKE-CODE",
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": expires.unwrap_or(900),
            "interval": 5,
            "message": "To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code FAKE-CODE to authenticate.",
        }))
        .into_response(),
        Shape::Google => Json(json!({
            "device_code": dc,
            "user_code": "GQVQ-JKEC",
            "verification_url": "https://www.google.com/device",
            "expires_in": expires.unwrap_or(1800),
            "interval": 5,
        }))
        .into_response(),
    }
}

/// Captures everything logged while it is the default subscriber (this
/// thread; use current-thread tests), to check for leaked secrets.
#[derive(Clone, Default)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl std::io::Write for LogCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Start capturing (TRACE and up) until the guard is dropped.
    pub fn start() -> (LogCapture, tracing::subscriber::DefaultGuard) {
        let cap = LogCapture::default();
        let c2 = cap.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || c2.clone())
            .finish();
        let guard = tracing::subscriber::set_default(sub);
        (cap, guard)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Panics when any of `secrets` appears in the logs or in `others`.
    #[track_caller]
    pub fn assert_clean(&self, secrets: &[String], others: &[&str]) {
        let logs = self.text();
        for s in secrets.iter().filter(|s| s.len() >= 6) {
            assert!(
                !logs.contains(s.as_str()),
                "secret `{s}` in the logs:\n{logs}"
            );
            for o in others {
                assert!(!o.contains(s.as_str()), "secret `{s}` in output: {o}");
            }
        }
    }
}

/// A configuration for an SMTP upstream at `smtp` using OAuth against
/// `fake`: spool in `dir`, the given flow, mailbox `user@contoso.com`,
/// `extra` appended to `[upstream.oauth]`, `admin` the admin address.
pub fn oauth_config(
    dir: &std::path::Path,
    fake: &FakeOAuth,
    smtp: SocketAddr,
    flow: &str,
    admin: &str,
    extra: &str,
) -> mailbridge::config::Config {
    let provider = match fake.inner.shape {
        Shape::Entra => "office365",
        Shape::Google => "gmail",
    };
    let text = format!(
        r#"hostname = "relay.test"
[spool]
path = "{spool}"
[upstream]
protocol = "smtp"
server = "{smtp}"
tls = false
requires_auth = true
auth = "oauth"
username = "user@contoso.com"
timeout_secs = 5
[upstream.oauth]
provider = "{provider}"
flow = "{flow}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
authorization_url = "{authorize}"
token_url = "{token}"
device_authorization_url = "{device}"
redirect_url = "http://{admin}/oauth/callback"
{extra}
[admin]
address = "{admin}"
token = "{ADMIN_TOKEN}"
"#,
        spool = dir.join("spool").display(),
        authorize = fake.authorize_url(),
        token = fake.token_url(),
        device = fake.device_url(),
    );
    mailbridge::config::Config::from_toml(&text, "test.toml", dir).expect("valid test config")
}

/// The admin token of [`oauth_config`].
pub const ADMIN_TOKEN: &str = "adm1n-T0KEN-for-tests";
