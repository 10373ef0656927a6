//! TLS for the listener: the server configuration from PEM files (TLS 1.2+, ring provider) and the socket type that is plain before STARTTLS and TLS after it.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The server configuration for STARTTLS and implicit TLS: the certificate
/// chain and key from PEM files, TLS 1.3 and 1.2 only, ring provider.
/// Errors name the config key and the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let hint = "(see certs/README.md)";
    let cert_name = cert.display();
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("listen.tls_cert: `{cert_name}`: {e} {hint}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("listen.tls_cert: `{cert_name}`: {e} {hint}"))?;
    if certs.is_empty() {
        return Err(format!(
            "listen.tls_cert: `{cert_name}`: no PEM certificate in it {hint}"
        ));
    }
    let key_name = key.display();
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("listen.tls_key: `{key_name}`: {e} {hint}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| format!("listen.tls_cert: TLS setup: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        format!("listen.tls_key: `{key_name}` is unusable or does not match listen.tls_cert: {e}")
    })?;
    Ok(Arc::new(config))
}

/// A client connection: plain TCP, or TLS over it after STARTTLS (or from the
/// first byte on the implicit-TLS listener).
pub(crate) enum Stream {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS established.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = server_config(&cert, &key).unwrap_err();
        assert!(err.starts_with("listen.tls_cert: `"), "{err}");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let err = server_config(&cert, &key).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");

        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        let err = server_config(&cert, &key).unwrap_err();
        assert!(err.starts_with("listen.tls_key: `"), "{err}");
        std::fs::write(&key, "garbage").unwrap();
        let err = server_config(&cert, &key).unwrap_err();
        assert!(err.starts_with("listen.tls_key: `"), "{err}");
        // A key that does not belong to the certificate.
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
        let err = server_config(&cert, &key).unwrap_err();
        assert!(err.starts_with("listen.tls_key: "), "{err}");
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        assert!(server_config(&cert, &key).is_ok());
    }
}
