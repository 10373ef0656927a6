//! The OAuth rules of an upstream table, written once: which keys each flow needs, the endpoints and default scope per provider, Microsoft national cloud, protocol and flow (UPSTREAMS.md §2.7, §5.3, §6), each overridable by a config URL, resolved into [`OAuthSettings`].

use std::path::{Path, PathBuf};

use super::schema::{Cloud, Flow, OAuth, Protocol, Provider, Upstream};

/// What the access token is for: it decides the resource in the scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// SMTP AUTH XOAUTH2 (Exchange Online or Gmail).
    Smtp,
    /// Exchange Web Services.
    Ews,
    /// Microsoft Graph.
    Graph,
}

impl Resource {
    /// The resource an upstream protocol needs; `None` for `file`.
    pub fn for_protocol(p: Protocol) -> Option<Resource> {
        match p {
            Protocol::Smtp | Protocol::Smtps => Some(Resource::Smtp),
            Protocol::Ews => Some(Resource::Ews),
            Protocol::Graph => Some(Resource::Graph),
            Protocol::File => None,
        }
    }
}

/// The three OAuth endpoints of an identity provider. An empty string means
/// the provider has none (e.g. no device endpoint configured for `custom`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Where the browser is sent for consent (authorization code flow).
    pub authorize: String,
    /// Where codes, refresh tokens and client credentials are exchanged.
    pub token: String,
    /// Where a device code is requested.
    pub device: String,
}

/// Entra ID login host of a national cloud (UPSTREAMS.md §2.7).
pub fn login_host(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Global => "https://login.microsoftonline.com",
        Cloud::Usgov | Cloud::Dod => "https://login.microsoftonline.us",
        Cloud::China => "https://login.chinacloudapi.cn",
    }
}

/// Microsoft Graph root of a national cloud (UPSTREAMS.md §2.7).
pub fn graph_root(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Global => "https://graph.microsoft.com",
        Cloud::Usgov => "https://graph.microsoft.us",
        Cloud::Dod => "https://dod-graph.microsoft.us",
        Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
    }
}

/// The Exchange Online resource (SMTP, EWS) of a national cloud.
///
/// Global is documented (UPSTREAMS.md §5.3). GCC High follows DavMail's
/// `outlook.office365.<tld>` pattern; DoD's `outlook-dod.office365.us` and
/// China's `partner.outlook.cn` are the commonly cited hosts but are not
/// verified in UPSTREAMS.md: set `scope` explicitly if they differ.
pub fn exchange_root(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Global => "https://outlook.office365.com",
        Cloud::Usgov => "https://outlook.office365.us",
        Cloud::Dod => "https://outlook-dod.office365.us",
        Cloud::China => "https://partner.outlook.cn",
    }
}

/// Google's endpoints (UPSTREAMS.md §6.2).
pub const GOOGLE_AUTHORIZE: &str = "https://accounts.google.com/o/oauth2/v2/auth";
/// Google's token endpoint.
pub const GOOGLE_TOKEN: &str = "https://oauth2.googleapis.com/token";
/// Google's device authorization endpoint.
pub const GOOGLE_DEVICE: &str = "https://oauth2.googleapis.com/device/code";
/// The one Gmail scope SMTP AUTH accepts (`gmail.send` is refused).
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";

/// The endpoints for `o`: each configured URL wins, else the provider's.
pub fn endpoints(o: &OAuth) -> Endpoints {
    let pick = |configured: &str, default: String| {
        if configured.is_empty() {
            default
        } else {
            configured.to_string()
        }
    };
    let (authorize, token, device) = match o.provider {
        Provider::Office365 => {
            let tenant = if o.tenant.is_empty() {
                "organizations"
            } else {
                o.tenant.as_str()
            };
            let base = format!("{}/{tenant}/oauth2/v2.0", login_host(o.cloud));
            (
                format!("{base}/authorize"),
                format!("{base}/token"),
                format!("{base}/devicecode"),
            )
        }
        Provider::Gmail => (
            GOOGLE_AUTHORIZE.to_string(),
            GOOGLE_TOKEN.to_string(),
            GOOGLE_DEVICE.to_string(),
        ),
        Provider::Custom => (String::new(), String::new(), String::new()),
    };
    Endpoints {
        authorize: pick(&o.authorization_url, authorize),
        token: pick(&o.token_url, token),
        device: pick(&o.device_authorization_url, device),
    }
}

/// The scope mailbridge asks for when `scope` is not configured; `None`
/// when there is no sensible default (custom provider, Gmail app-only).
///
/// Graph's delegated scopes carry the cloud's Graph root as a prefix: Entra
/// ID reads an unprefixed `Mail.Send` as `https://graph.microsoft.com/Mail.Send`,
/// which is wrong in a national cloud (tokens are not interchangeable between
/// clouds, UPSTREAMS.md §2.7), while the prefixed form means the same in the
/// global cloud.
pub fn default_scope(o: &OAuth, resource: Resource) -> Option<String> {
    let app_only = o.flow == Flow::ClientCredentials;
    match o.provider {
        Provider::Custom => None,
        Provider::Gmail if app_only => None,
        Provider::Gmail => Some(GMAIL_SCOPE.to_string()),
        Provider::Office365 => {
            let exo = exchange_root(o.cloud);
            let graph = graph_root(o.cloud);
            Some(match (resource, app_only) {
                (Resource::Smtp | Resource::Ews, true) => format!("{exo}/.default"),
                (Resource::Graph, true) => format!("{graph}/.default"),
                (Resource::Smtp, false) => format!("{exo}/SMTP.Send offline_access"),
                (Resource::Ews, false) => format!("{exo}/EWS.AccessAsUser.All offline_access"),
                (Resource::Graph, false) => {
                    format!("{graph}/Mail.ReadWrite {graph}/Mail.Send.Shared offline_access")
                }
            })
        }
    }
}

/// An upstream table's OAuth settings as validation resolved them: what a
/// token manager needs beyond the table's own keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSettings {
    /// Authorize, token and device endpoints (configured, else the provider's).
    pub endpoints: Endpoints,
    /// The scope requested (configured, else the default).
    pub scope: String,
    /// The token store file (`token_store` in the spool directory).
    pub store: PathBuf,
    /// `client_certificate_file` and `client_key_file`, when set.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

/// Check the `oauth` keys of table `u` (under `auth = "oauth"`) and resolve
/// them. `key` makes a full key name; `base` anchors relative files; `spool`
/// is the spool directory. `Ok(None)` when the table does not use OAuth.
pub(super) fn resolve(
    u: &Upstream,
    key: &dyn Fn(&str) -> String,
    base: &Path,
    spool: &Path,
    secure_url: fn(&str) -> Result<(), String>,
) -> Result<Option<OAuthSettings>, (String, String)> {
    let bad = |k: &str, m: String| (key(k), m);
    let o = &u.oauth;
    if !(u.requires_auth && u.auth == super::AuthKind::Oauth) {
        return Ok(None);
    }
    if o.client_id.is_empty() {
        return Err(bad(
            "oauth.client_id",
            "is required when auth = \"oauth\"".into(),
        ));
    }
    if o.client_certificate_file.is_empty() != o.client_key_file.is_empty() {
        return Err(bad(
            "oauth.client_key_file",
            "client_certificate_file and client_key_file go together".into(),
        ));
    }
    for (k, v) in [
        ("oauth.client_certificate_file", &o.client_certificate_file),
        ("oauth.client_key_file", &o.client_key_file),
    ] {
        if !v.is_empty() && !base.join(v).is_file() {
            return Err(bad(k, format!("`{v}` is not a readable file")));
        }
    }
    if o.flow == Flow::ClientCredentials
        && o.client_secret.is_empty()
        && o.client_certificate_file.is_empty()
    {
        return Err(bad(
            "oauth.client_secret",
            "is required for flow = \"client_credentials\" (or client_certificate_file and client_key_file)".into(),
        ));
    }
    if o.provider == Provider::Custom && (o.token_url.is_empty() || o.scope.is_empty()) {
        return Err(bad(
            "oauth.token_url",
            "provider = \"custom\" needs token_url and scope".into(),
        ));
    }
    for (k, v) in [
        ("authorization_url", &o.authorization_url),
        ("token_url", &o.token_url),
        ("device_authorization_url", &o.device_authorization_url),
    ] {
        if !v.is_empty() {
            secure_url(v).map_err(|m| bad(&format!("oauth.{k}"), m))?;
        }
    }
    let v = &o.redirect_url;
    if !(v.is_empty() || v.starts_with("https://") || v.starts_with("http://")) {
        return Err(bad(
            "oauth.redirect_url",
            format!("`{v}` is not an http(s) URL"),
        ));
    }
    if o.token_store.is_empty() {
        return Err(bad("oauth.token_store", "is empty".into()));
    }
    let Some(resource) = Resource::for_protocol(u.protocol) else {
        // `file` sends no token: nothing to resolve.
        return Ok(None);
    };
    let scope = if o.scope.trim().is_empty() {
        default_scope(o, resource).ok_or_else(|| {
            bad(
                "oauth.scope",
                "there is no default scope for this provider and flow; set one".into(),
            )
        })?
    } else {
        o.scope.trim().to_string()
    };
    let client_certificate = (!o.client_certificate_file.is_empty()).then(|| {
        (
            base.join(&o.client_certificate_file),
            base.join(&o.client_key_file),
        )
    });
    Ok(Some(OAuthSettings {
        endpoints: endpoints(o),
        scope,
        store: spool.join(&o.token_store),
        client_certificate,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oauth(provider: Provider, cloud: Cloud, flow: Flow) -> OAuth {
        OAuth {
            provider,
            cloud,
            flow,
            tenant: "contoso.onmicrosoft.com".into(),
            ..OAuth::default()
        }
    }

    #[test]
    fn office365_endpoints_per_cloud() {
        let cases = [
            (Cloud::Global, "https://login.microsoftonline.com"),
            (Cloud::Usgov, "https://login.microsoftonline.us"),
            (Cloud::Dod, "https://login.microsoftonline.us"),
            (Cloud::China, "https://login.chinacloudapi.cn"),
        ];
        for (cloud, host) in cases {
            let e = endpoints(&oauth(Provider::Office365, cloud, Flow::AuthorizationCode));
            let base = format!("{host}/contoso.onmicrosoft.com/oauth2/v2.0");
            assert_eq!(e.authorize, format!("{base}/authorize"));
            assert_eq!(e.token, format!("{base}/token"));
            assert_eq!(e.device, format!("{base}/devicecode"));
        }
        let mut o = oauth(Provider::Office365, Cloud::Global, Flow::DeviceCode);
        o.tenant = String::new();
        assert_eq!(
            endpoints(&o).token,
            "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
        );
    }

    #[test]
    fn google_and_custom_endpoints_and_overrides() {
        let e = endpoints(&oauth(
            Provider::Gmail,
            Cloud::Global,
            Flow::AuthorizationCode,
        ));
        assert_eq!(e.authorize, "https://accounts.google.com/o/oauth2/v2/auth");
        assert_eq!(e.token, "https://oauth2.googleapis.com/token");
        assert_eq!(e.device, "https://oauth2.googleapis.com/device/code");
        let mut o = oauth(Provider::Custom, Cloud::Global, Flow::AuthorizationCode);
        assert_eq!(endpoints(&o).token, "");
        o.token_url = "http://127.0.0.1:1/t".into();
        o.authorization_url = "http://127.0.0.1:1/a".into();
        o.device_authorization_url = "http://127.0.0.1:1/d".into();
        let e = endpoints(&o);
        assert_eq!(
            (e.authorize.as_str(), e.token.as_str(), e.device.as_str()),
            (
                "http://127.0.0.1:1/a",
                "http://127.0.0.1:1/t",
                "http://127.0.0.1:1/d"
            )
        );
        o.provider = Provider::Office365;
        assert_eq!(endpoints(&o).token, "http://127.0.0.1:1/t");
    }

    #[test]
    fn default_scopes() {
        use Resource::*;
        let s = |p, c, f, r| default_scope(&oauth(p, c, f), r);
        let (o365, global, code) = (Provider::Office365, Cloud::Global, Flow::AuthorizationCode);
        assert_eq!(
            s(o365, global, code, Smtp).as_deref(),
            Some("https://outlook.office365.com/SMTP.Send offline_access")
        );
        assert_eq!(
            s(o365, global, Flow::DeviceCode, Ews).as_deref(),
            Some("https://outlook.office365.com/EWS.AccessAsUser.All offline_access")
        );
        assert_eq!(
            s(o365, global, code, Graph).as_deref(),
            Some(
                "https://graph.microsoft.com/Mail.ReadWrite https://graph.microsoft.com/Mail.Send.Shared offline_access"
            )
        );
        let app = Flow::ClientCredentials;
        assert_eq!(
            s(o365, global, app, Smtp).as_deref(),
            Some("https://outlook.office365.com/.default")
        );
        assert_eq!(
            s(o365, global, app, Ews).as_deref(),
            Some("https://outlook.office365.com/.default")
        );
        assert_eq!(
            s(o365, global, app, Graph).as_deref(),
            Some("https://graph.microsoft.com/.default")
        );
        assert_eq!(
            s(o365, Cloud::Usgov, app, Graph).as_deref(),
            Some("https://graph.microsoft.us/.default")
        );
        assert_eq!(
            s(o365, Cloud::Dod, code, Graph).as_deref(),
            Some(
                "https://dod-graph.microsoft.us/Mail.ReadWrite https://dod-graph.microsoft.us/Mail.Send.Shared offline_access"
            )
        );
        assert_eq!(
            s(o365, Cloud::China, app, Graph).as_deref(),
            Some("https://microsoftgraph.chinacloudapi.cn/.default")
        );
        assert_eq!(
            s(o365, Cloud::Usgov, code, Smtp).as_deref(),
            Some("https://outlook.office365.us/SMTP.Send offline_access")
        );
        assert_eq!(
            s(Provider::Gmail, global, code, Smtp).as_deref(),
            Some("https://mail.google.com/")
        );
        assert_eq!(s(Provider::Gmail, global, app, Smtp), None);
        assert_eq!(s(Provider::Custom, global, code, Smtp), None);
    }

    #[test]
    fn protocol_resources() {
        assert_eq!(
            Resource::for_protocol(Protocol::Smtps),
            Some(Resource::Smtp)
        );
        assert_eq!(
            Resource::for_protocol(Protocol::Graph),
            Some(Resource::Graph)
        );
        assert_eq!(Resource::for_protocol(Protocol::Ews), Some(Resource::Ews));
        assert_eq!(Resource::for_protocol(Protocol::File), None);
    }

    fn load(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::from_toml(text, "t.toml", Path::new("/etc/mb"))
            .map_err(|e| e.to_string())
    }

    const SMTP_OAUTH: &str = "[spool]\npath = \"/var/spool/mb\"\n[upstream]\nprotocol = \"smtp\"\nserver = \"smtp.office365.us\"\nrequires_auth = true\nauth = \"oauth\"\nusername = \"a@contoso.us\"\n[upstream.oauth]\n";

    #[test]
    fn validation_resolves_endpoints_scope_and_store_once() {
        let c = load(&format!(
            "{SMTP_OAUTH}client_id = \"cid\"\ncloud = \"usgov\"\ntenant = \"contoso.us\"\n"
        ))
        .unwrap();
        let r = c.upstream.resolved.oauth.clone().unwrap();
        assert_eq!(
            r.endpoints.token,
            "https://login.microsoftonline.us/contoso.us/oauth2/v2.0/token"
        );
        assert_eq!(
            r.scope,
            "https://outlook.office365.us/SMTP.Send offline_access"
        );
        assert_eq!(r.store, PathBuf::from("/var/spool/mb/oauth-tokens.json"));
        assert_eq!(r.client_certificate, None);
        assert!(c.upstream.resolved.server.as_ref().unwrap().exchange_online);
        // A configured scope wins (trimmed); Basic tables resolve no OAuth.
        let c = load(&format!(
            "{SMTP_OAUTH}client_id = \"cid\"\nscope = \" custom.scope \"\n"
        ))
        .unwrap();
        assert_eq!(c.upstream.resolved.oauth.unwrap().scope, "custom.scope");
        let basic = load("[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\nrequires_auth = true\nusername = \"u\"\npassword = \"p\"\n").unwrap();
        assert_eq!(basic.upstream.resolved.oauth, None);
    }

    #[test]
    fn the_oauth_rules_name_their_key() {
        let cases = [
            ("", "upstream.oauth.client_id"),
            (
                "provider = \"gmail\"\nflow = \"client_credentials\"\nclient_secret = \"s\"\n",
                "upstream.oauth.scope",
            ),
            (
                "flow = \"client_credentials\"\n",
                "upstream.oauth.client_secret",
            ),
            ("provider = \"custom\"\n", "upstream.oauth.token_url"),
            (
                "client_key_file = \"k.pem\"\n",
                "upstream.oauth.client_key_file",
            ),
            (
                "token_url = \"http://login.example/t\"\n",
                "upstream.oauth.token_url",
            ),
            (
                "redirect_url = \"ftp://x\"\n",
                "upstream.oauth.redirect_url",
            ),
            ("token_store = \"\"\n", "upstream.oauth.token_store"),
        ];
        for (extra, key) in cases {
            let id = if extra.is_empty() {
                ""
            } else {
                "client_id = \"cid\"\n"
            };
            let e = load(&format!("{SMTP_OAUTH}{id}{extra}")).unwrap_err();
            assert!(e.contains(&format!(": {key}: ")), "{extra:?} gave {e}");
        }
    }
}
