//! The token endpoint conversations: authorization code with PKCE, refresh, client credentials and device code (RFC 6749, 7636, 8628), and how their errors map onto [`TokenError`].

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::Deserialize;
use sha2::Digest as _;

use super::TokenError;
use super::assertion::{self, ClientCertificate};
use super::provider;
use crate::common::Secret;
use crate::config::{Config, Endpoints, Flow, Provider, Proxy, Upstream};

/// Largest token or device endpoint answer read (they are a few KiB).
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// Longest provider error text kept (Entra's descriptions carry trace ids).
const MAX_ERROR_TEXT: usize = 300;
/// Access-token lifetime assumed when the provider does not say.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest lifetime taken from a token endpoint (access tokens and device
/// codes): a larger `expires_in` is clamped, so no hostile or broken value
/// can overflow an `Instant` or keep a token in use for years.
pub const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// Longest device-code polling interval taken from the endpoint.
const MAX_INTERVAL: u64 = 300;

/// One upstream's OAuth settings, resolved from the configuration: what a
/// token manager needs to talk to its provider.
#[derive(Debug, Clone)]
pub struct Settings {
    /// office365, gmail or custom.
    pub provider: Provider,
    /// How the first token is obtained.
    pub flow: Flow,
    /// The registered application.
    pub client_id: String,
    /// Its secret (may be empty for public clients).
    pub client_secret: Secret,
    /// Certificate credentials (`client_certificate_file` + `client_key_file`):
    /// when set, requests carry a signed JWT assertion instead of the secret.
    pub client_certificate: Option<ClientCertificate>,
    /// Authorize, token and device endpoints.
    pub endpoints: Endpoints,
    /// The scope requested (configured or the default).
    pub scope: String,
    /// Where the provider sends the browser back (`/oauth/callback`).
    pub redirect_url: String,
    /// The token store file.
    pub store: PathBuf,
    /// Extra CA for the token endpoint.
    pub ca_file: Option<PathBuf>,
    /// HTTP proxy for the token endpoint.
    pub proxy: Proxy,
    /// Per-request timeout.
    pub timeout: Duration,
    /// The identity used when an envelope names none (the upstream's mailbox).
    pub default_identity: String,
    /// Other identities the configuration knows (local users' mailboxes).
    pub known_identities: Vec<String>,
}

impl PartialEq for Settings {
    fn eq(&self, o: &Self) -> bool {
        self.provider == o.provider
            && self.flow == o.flow
            && self.client_id == o.client_id
            && self.client_secret == o.client_secret
            && self.client_certificate == o.client_certificate
            && self.endpoints == o.endpoints
            && self.scope == o.scope
            && self.redirect_url == o.redirect_url
            && self.store == o.store
            && self.ca_file == o.ca_file
            && self.proxy.url == o.proxy.url
            && self.proxy.username == o.proxy.username
            && self.proxy.password == o.proxy.password
            && self.timeout == o.timeout
            && self.default_identity == o.default_identity
            && self.known_identities == o.known_identities
    }
}

impl Settings {
    /// The OAuth settings of upstream table `u` of a validated `cfg` (the
    /// configuration resolved endpoints, scope and store; this loads the
    /// client certificate). `Err` names the key at fault.
    pub fn from_upstream(cfg: &Config, u: &Upstream) -> Result<Settings, String> {
        let o = &u.oauth;
        let Some(r) = u.resolved.oauth.as_ref() else {
            return Err(if u.uses_oauth() {
                "oauth: the configuration was not validated".into()
            } else {
                "auth: does not use OAuth (set requires_auth = true and auth = \"oauth\")".into()
            });
        };
        let client_certificate = match &r.client_certificate {
            None => None,
            Some((cert, key)) => Some(ClientCertificate::load(cert, key)?),
        };
        let default_identity = u.effective_mailbox().to_string();
        let mut known: Vec<String> = cfg
            .users
            .iter()
            .map(|u| u.mailbox.clone())
            .filter(|m| !m.is_empty() && *m != default_identity)
            .collect();
        known.sort();
        known.dedup();
        Ok(Settings {
            provider: o.provider,
            flow: o.flow,
            client_id: o.client_id.clone(),
            client_secret: o.client_secret.clone(),
            client_certificate,
            endpoints: r.endpoints.clone(),
            scope: r.scope.clone(),
            redirect_url: o.redirect_url.clone(),
            store: r.store.clone(),
            ca_file: (!u.tls_ca_file.is_empty())
                .then(|| cfg.path(std::path::Path::new(&u.tls_ca_file))),
            proxy: u.proxy.clone(),
            timeout: Duration::from_secs(u.timeout_secs.max(1)),
            default_identity,
            known_identities: known,
        })
    }

    /// The HTTP client for the token endpoint (proxy and CA applied).
    pub fn http_client(&self) -> Result<reqwest::Client, String> {
        crate::http::client(self.ca_file.as_deref(), &self.proxy, self.timeout)
    }
}

/// What a successful token request gave.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The bearer token.
    pub access_token: Secret,
    /// A (possibly rotated) refresh token, when the provider sent one.
    pub refresh_token: Option<Secret>,
    /// How long the access token is valid from now.
    pub expires_in: Duration,
    /// The scope granted, if the provider said.
    pub scope: Option<String>,
}

/// Why a sign-in (code exchange or device flow) did not complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoginError {
    /// The device code expired before the user finished (`expired_token`).
    #[error("the code expired before the sign-in was completed; start again")]
    Expired,
    /// The user declined (`authorization_declined`, or `access_denied`).
    #[error("the sign-in was declined: {0}")]
    Declined(String),
    /// The token endpoint refused or could not be reached.
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// A PKCE pair (RFC 7636, S256).
#[derive(Debug, Clone)]
pub struct Pkce {
    /// Sent with the code exchange; never leaves mailbridge otherwise.
    pub verifier: Secret,
    /// `BASE64URL(SHA256(verifier))`, sent in the authorize URL.
    pub challenge: String,
}

impl Pkce {
    /// A fresh pair: 32 random bytes make a 43-character verifier.
    pub fn new() -> Pkce {
        let bytes: [u8; 32] = rand::random();
        Pkce::from_verifier(&B64URL.encode(bytes))
    }

    /// The pair for a given verifier.
    pub fn from_verifier(verifier: &str) -> Pkce {
        let digest = sha2::Sha256::digest(verifier.as_bytes());
        Pkce {
            verifier: Secret::new(verifier),
            challenge: B64URL.encode(digest),
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// A random, URL-safe, single-use value (OAuth `state`).
pub fn random_state() -> String {
    let bytes: [u8; 24] = rand::random();
    B64URL.encode(bytes)
}

/// The URL the browser is sent to for consent.
pub fn authorize_url(
    s: &Settings,
    state: &str,
    challenge: &str,
    login_hint: Option<&str>,
) -> Result<String, String> {
    if s.endpoints.authorize.is_empty() {
        return Err("oauth.authorization_url: is required for this provider".into());
    }
    let mut url = url::Url::parse(&s.endpoints.authorize)
        .map_err(|e| format!("oauth.authorization_url: {e}"))?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("client_id", &s.client_id)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", &s.redirect_url)
            .append_pair("scope", &s.scope)
            .append_pair("state", state)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
        for (k, v) in provider::authorize_extras(s.provider) {
            q.append_pair(k, v);
        }
        if let Some(hint) = login_hint.filter(|h| !h.is_empty()) {
            q.append_pair("login_hint", hint);
        }
    }
    Ok(url.into())
}

/// The JSON of a successful token response. Deliberately not `Debug`.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    /// Entra v1 sent strings; accept both.
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<String>,
}

/// The JSON of an error response (RFC 6749 §5.2, plus Entra's extras).
#[derive(Deserialize, Default)]
struct ErrorResponse {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Device authorization response (RFC 8628 §3.2). Google names the URL
/// `verification_url`, Entra ID `verification_uri`.
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    /// Polled with; never shown.
    pub device_code: Secret,
    /// What the user types.
    pub user_code: String,
    /// Where the user types it.
    pub verification_uri: String,
    /// How long the code is valid.
    pub expires_in: Duration,
    /// How long to wait between polls.
    pub interval: Duration,
    /// The provider's own instructions, if it sent some.
    pub message: Option<String>,
}

#[derive(Deserialize)]
struct DeviceResponse {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    interval: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
}

fn seconds(v: &Option<serde_json::Value>) -> Option<u64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Replace each secret in `text` by `***`, cut it to one line of bounded length.
fn clean(text: &str, secrets: &[&str]) -> String {
    let mut t = text.lines().next().unwrap_or("").trim().to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        t = t.replace(*s, "***");
    }
    if t.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
        t.push_str(" ...");
    }
    t.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What a token endpoint's refusal means for us.
pub fn classify_error(status: u16, error: &str, description: &str) -> TokenError {
    let text = if description.is_empty() {
        format!("{error} (HTTP {status})")
    } else {
        format!("{error}: {description}")
    };
    if status == 429 || status >= 500 {
        return TokenError::Unavailable(text);
    }
    match error {
        "invalid_grant" | "interaction_required" | "consent_required" | "login_required" => {
            TokenError::ReconsentNeeded(text)
        }
        "temporarily_unavailable" | "server_error" => TokenError::Unavailable(text),
        "" => TokenError::Config(format!("the token endpoint answered HTTP {status}")),
        _ => TokenError::Config(text),
    }
}

/// An answer of the token endpoint: success, or the error code and text.
enum Answer {
    Ok(TokenResponse),
    Refused {
        status: u16,
        error: String,
        description: String,
    },
}

/// Talks to one provider's token endpoint.
#[derive(Clone)]
pub struct TokenClient {
    settings: std::sync::Arc<Settings>,
    http: reqwest::Client,
}

impl TokenClient {
    /// A client for `settings` using `http` (see [`Settings::http_client`]).
    pub fn new(settings: std::sync::Arc<Settings>, http: reqwest::Client) -> Self {
        TokenClient { settings, http }
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    async fn post(
        &self,
        url: &str,
        form: &[(&str, &str)],
        secrets: &[&str],
    ) -> Result<(u16, Vec<u8>), TokenError> {
        let s = &self.settings;
        let mut all: Vec<(&str, &str)> = vec![("client_id", s.client_id.as_str())];
        // A fresh assertion per request (each has its own jti and lifetime);
        // the token URL is its audience, also for the device endpoint's
        // requests, as Entra expects.
        let assertion = match &s.client_certificate {
            Some(c) => Some(
                c.assertion(&s.client_id, &s.endpoints.token)
                    .map_err(TokenError::Config)?,
            ),
            None => None,
        };
        if let Some(a) = &assertion {
            all.push(("client_assertion_type", assertion::ASSERTION_TYPE));
            all.push(("client_assertion", a.expose()));
        } else if !s.client_secret.is_empty() {
            all.push(("client_secret", s.client_secret.expose()));
        }
        all.extend_from_slice(form);
        let mut secrets = secrets.to_vec();
        if let Some(a) = &assertion {
            secrets.push(a.expose());
        }
        let secrets = secrets.as_slice();
        let resp = self
            .http
            .post(url)
            .header("Accept", "application/json")
            .form(&all)
            .send()
            .await
            .map_err(|e| {
                // reqwest errors name the URL, never the form body.
                TokenError::Unavailable(clean(&format!("{url}: {}", error_chain(&e)), secrets))
            })?;
        let status = resp.status().as_u16();
        let body = crate::http::read_capped(resp, MAX_TOKEN_RESPONSE)
            .await
            .map_err(|e| {
                let why = match &e {
                    crate::http::BodyError::Read(e) => error_chain(e),
                    other => other.to_string(),
                };
                TokenError::Unavailable(clean(&format!("{url}: {why}"), secrets))
            })?;
        Ok((status, body))
    }

    async fn token_request(
        &self,
        form: &[(&str, &str)],
        secrets: &[&str],
    ) -> Result<Answer, TokenError> {
        let url = self.settings.endpoints.token.clone();
        let mut secrets = secrets.to_vec();
        secrets.push(self.settings.client_secret.expose());
        let (status, body) = self.post(&url, form, &secrets).await?;
        if (200..300).contains(&status) {
            return match serde_json::from_slice::<TokenResponse>(&body) {
                Ok(t) if !t.access_token.is_empty() => Ok(Answer::Ok(t)),
                _ => Err(TokenError::Unavailable(format!(
                    "{url} answered HTTP {status} without an access token"
                ))),
            };
        }
        let err: ErrorResponse = serde_json::from_slice(&body).unwrap_or_default();
        Ok(Answer::Refused {
            status,
            error: clean(&err.error, &secrets),
            description: clean(err.error_description.as_deref().unwrap_or(""), &secrets),
        })
    }

    fn grant(t: TokenResponse) -> Grant {
        Grant {
            access_token: Secret::new(t.access_token),
            refresh_token: t.refresh_token.filter(|r| !r.is_empty()).map(Secret::new),
            expires_in: seconds(&t.expires_in)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_LIFETIME)
                .min(MAX_LIFETIME),
            scope: t.scope,
        }
    }

    async fn simple(&self, form: &[(&str, &str)], secrets: &[&str]) -> Result<Grant, TokenError> {
        match self.token_request(form, secrets).await? {
            Answer::Ok(t) => Ok(Self::grant(t)),
            Answer::Refused {
                status,
                error,
                description,
            } => Err(classify_error(status, &error, &description)),
        }
    }

    /// Redeem an authorization code (with its PKCE verifier).
    pub async fn exchange_code(
        &self,
        code: &Secret,
        verifier: &Secret,
    ) -> Result<Grant, TokenError> {
        let s = &self.settings;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("redirect_uri", s.redirect_url.as_str()),
            ("code_verifier", verifier.expose()),
        ];
        if provider::scope_on_refresh(s.provider) {
            form.push(("scope", s.scope.as_str()));
        }
        self.simple(&form, &[code.expose(), verifier.expose()])
            .await
    }

    /// Use a refresh token. Entra ID wants the scope again (AADSTS900144).
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<Grant, TokenError> {
        let s = &self.settings;
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        if provider::scope_on_refresh(s.provider) {
            form.push(("scope", s.scope.as_str()));
        }
        self.simple(&form, &[refresh_token.expose()]).await
    }

    /// App-only token with the client secret or the client certificate.
    pub async fn client_credentials(&self) -> Result<Grant, TokenError> {
        if self.settings.client_secret.is_empty() && self.settings.client_certificate.is_none() {
            return Err(TokenError::Config(
                "oauth.client_secret (or client_certificate_file and client_key_file) is required for flow = \"client_credentials\"".into(),
            ));
        }
        let scope = self.settings.scope.clone();
        self.simple(
            &[("grant_type", "client_credentials"), ("scope", &scope)],
            &[],
        )
        .await
    }

    /// Ask for a device code (RFC 8628 §3.1).
    pub async fn device_authorization(&self) -> Result<DeviceAuthorization, TokenError> {
        let s = &self.settings;
        if s.endpoints.device.is_empty() {
            return Err(TokenError::Config(
                "oauth.device_authorization_url is required for the device code flow with this provider".into(),
            ));
        }
        let secrets = [s.client_secret.expose()];
        let (status, body) = self
            .post(
                &s.endpoints.device,
                &[("scope", s.scope.as_str())],
                &secrets,
            )
            .await?;
        if !(200..300).contains(&status) {
            let err: ErrorResponse = serde_json::from_slice(&body).unwrap_or_default();
            return Err(classify_error(
                status,
                &clean(&err.error, &secrets),
                &clean(err.error_description.as_deref().unwrap_or(""), &secrets),
            ));
        }
        let d: DeviceResponse = serde_json::from_slice(&body).map_err(|e| {
            TokenError::Config(format!(
                "{} answered with an unexpected device code response: {e}",
                s.endpoints.device
            ))
        })?;
        Ok(DeviceAuthorization {
            device_code: Secret::new(d.device_code),
            user_code: d.user_code,
            verification_uri: d.verification_uri,
            expires_in: Duration::from_secs(seconds(&d.expires_in).unwrap_or(900))
                .min(MAX_LIFETIME),
            interval: Duration::from_secs(seconds(&d.interval).unwrap_or(5).clamp(1, MAX_INTERVAL)),
            message: d.message,
        })
    }

    /// Poll until the user has signed in (RFC 8628 §3.4–3.5): wait
    /// `interval` between polls, 5 s more after each `slow_down`, give up
    /// at `expired_token`, `authorization_declined` or the code's lifetime.
    /// A token endpoint that is briefly unreachable does not end the wait.
    pub async fn poll_device(&self, d: &DeviceAuthorization) -> Result<Grant, LoginError> {
        let now = tokio::time::Instant::now();
        // `d` is public: a caller-built lifetime must not overflow either.
        let deadline = now
            .checked_add(d.expires_in.min(MAX_LIFETIME))
            .unwrap_or(now);
        let mut interval = d.interval;
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", d.device_code.expose()),
        ];
        let secrets = [d.device_code.expose()];
        loop {
            tokio::time::sleep(interval).await;
            if tokio::time::Instant::now() > deadline {
                return Err(LoginError::Expired);
            }
            let answer = match self.token_request(&form, &secrets).await {
                Ok(a) => a,
                Err(TokenError::Unavailable(why)) => {
                    tracing::warn!(error = %why, "token endpoint unavailable while waiting for the sign-in; still waiting");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match answer {
                Answer::Ok(t) => return Ok(Self::grant(t)),
                Answer::Refused { error, .. } if error == "authorization_pending" => {}
                Answer::Refused { error, .. } if error == "slow_down" => {
                    interval = interval.saturating_add(Duration::from_secs(5));
                }
                Answer::Refused { error, .. } if error == "expired_token" => {
                    return Err(LoginError::Expired);
                }
                Answer::Refused {
                    error, description, ..
                } if error == "authorization_declined" || error == "access_denied" => {
                    return Err(LoginError::Declined(if description.is_empty() {
                        error
                    } else {
                        description
                    }));
                }
                Answer::Refused {
                    status,
                    error,
                    description,
                } => return Err(classify_error(status, &error, &description).into()),
            }
        }
    }
}

/// An error and its sources on one line (reqwest hides the cause otherwise).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    // A refused certificate: its cause and fix rather than rustls's words.
    if let Some(tls) = crate::tls::describe(e) {
        return format!("TLS: {tls}");
    }
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_rfc7636_appendix_b() {
        let p = Pkce::from_verifier("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        assert_eq!(p.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let fresh = Pkce::new();
        assert_eq!(fresh.verifier.expose().len(), 43);
        assert_ne!(fresh.verifier.expose(), Pkce::new().verifier.expose());
        assert_eq!(format!("{:?}", fresh.verifier), "***");
    }

    #[test]
    fn error_classes() {
        use TokenError::*;
        let c = |s, e, d| classify_error(s, e, d);
        assert!(
            matches!(c(400, "invalid_grant", "AADSTS70043: expired"), ReconsentNeeded(t) if t.contains("AADSTS70043"))
        );
        assert!(
            matches!(c(400, "invalid_client", "AADSTS7000222: secret expired"), Config(t) if t.contains("7000222"))
        );
        assert!(matches!(c(400, "invalid_scope", ""), Config(_)));
        assert!(matches!(c(400, "unauthorized_client", ""), Config(_)));
        assert!(matches!(c(503, "", ""), Unavailable(_)));
        assert!(matches!(c(429, "", ""), Unavailable(_)));
        assert!(matches!(
            c(400, "temporarily_unavailable", ""),
            Unavailable(_)
        ));
        assert!(matches!(c(404, "", ""), Config(t) if t.contains("404")));
    }

    #[test]
    fn clean_redacts_and_cuts() {
        let t = clean("bad token rt-123456 here\nTrace ID: x", &["rt-123456", ""]);
        assert_eq!(t, "bad token *** here");
        assert!(clean(&"x".repeat(1000), &[]).len() < MAX_ERROR_TEXT + 10);
    }

    #[test]
    fn authorize_url_has_pkce_and_state() {
        let cfg = Config::from_toml(
            "[spool]\npath = \"/tmp/x\"\n[upstream]\nprotocol = \"smtp\"\nserver = \"smtp.office365.com\"\nrequires_auth = true\nauth = \"oauth\"\nusername = \"a@contoso.com\"\n[upstream.oauth]\nclient_id = \"cid\"\ntenant = \"contoso.onmicrosoft.com\"\n",
            "t",
            std::path::Path::new("."),
        )
        .unwrap();
        let s = Settings::from_upstream(&cfg, &cfg.upstream).unwrap();
        assert_eq!(s.store, PathBuf::from("/tmp/x/oauth-tokens.json"));
        let u = authorize_url(&s, "st4te", "ch4llenge", Some("a@contoso.com")).unwrap();
        let parsed = url::Url::parse(&u).unwrap();
        assert_eq!(
            parsed.as_str().split('?').next(),
            Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize")
        );
        let q: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
        assert_eq!(q["client_id"], "cid");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["state"], "st4te");
        assert_eq!(q["code_challenge"], "ch4llenge");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["redirect_uri"], "http://localhost:8025/oauth/callback");
        assert_eq!(
            q["scope"],
            "https://outlook.office365.com/SMTP.Send offline_access"
        );
        assert_eq!(q["login_hint"], "a@contoso.com");
    }
}
