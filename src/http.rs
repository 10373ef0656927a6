//! The HTTP client every HTTP upstream uses (token endpoints, Graph, EWS): rustls with the ring provider, the extra CA, the configured proxy, and timeouts.

use std::path::Path;
use std::time::Duration;

use crate::config::Proxy;

/// Build a client. `ca_file` adds a trusted CA; `proxy.url` (if set) carries
/// every request, with Basic proxy credentials when a username is given.
pub fn client(
    ca_file: Option<&Path>,
    proxy: &Proxy,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let tls = crate::tls::client_config(ca_file)?;
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")));
    if proxy.url.is_empty() {
        b = b.no_proxy();
    } else {
        let mut p = reqwest::Proxy::all(&proxy.url).map_err(|e| format!("proxy.url: {e}"))?;
        if !proxy.username.is_empty() {
            p = p.basic_auth(&proxy.username, proxy.password.expose());
        }
        b = b.proxy(p);
    }
    b.build().map_err(|e| format!("HTTP client: {e}"))
}
