//! The HTTP client every HTTP upstream uses (token endpoints, Graph, EWS): rustls with the shared trust (bundled and system roots, the extra CA), the configured proxy, timeouts, no redirects, and response bodies read up to a cap.

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
        // A 307/308 would re-send a token form (client secret, refresh
        // token) or a mail to wherever it points, https→http included.
        .redirect(reqwest::redirect::Policy::none())
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

/// Why a capped body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The connection failed while reading.
    Read(reqwest::Error),
    /// The answer is larger than the cap (bytes).
    TooLarge(usize),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Read(e) => write!(f, "{e}"),
            BodyError::TooLarge(cap) => write!(f, "the answer is larger than {cap} bytes"),
        }
    }
}

/// Read a response body of at most `cap` bytes, chunk by chunk (a larger
/// one is refused without reading the rest).
pub async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge(cap));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if out.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge(cap));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
