//! TLS settings shared by every upstream client (SMTP, HTTP): the ring provider only, TLS 1.2+, public roots plus an optional extra CA.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The TLS client configuration: ring provider (never a process default),
/// TLS 1.2 and 1.3, webpki roots plus the optional extra CA file.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let name = path.display();
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("ca_file `{name}`: {e}"))?;
        let mut found = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("ca_file `{name}`: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("ca_file `{name}`: unusable certificate: {e}"))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!("ca_file `{name}`: no PEM certificate in it"));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
