//! TLS trust shared by every upstream client (SMTP, HTTP): the ring provider only, TLS 1.2+, bundled and system roots plus `tls_ca_file`, a server certificate that is itself in `tls_ca_file` (self-signed, CA:TRUE), an optional SHA-256 pin, and failures explained with their fix.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use sha2::Digest as _;

/// The TLS client configuration: ring provider (never a process default),
/// TLS 1.2 and 1.3, webpki and system roots plus the optional extra CA file.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    client_config_pinned(ca_file, None)
}

/// [`client_config`], with `fingerprint` (`sha256:<hex>`) when the server is
/// pinned: then only a certificate with that SHA-256 is accepted, whatever
/// its issuer and names (the handshake signature is still checked).
pub fn client_config_pinned(
    ca_file: Option<&Path>,
    fingerprint: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The host's store (or SSL_CERT_FILE / SSL_CERT_DIR): unusable entries
    // are skipped, as OpenSSL does.
    for cert in system_roots() {
        let _ = roots.add(cert.clone());
    }
    let mut listed = Vec::new();
    if let Some(path) = ca_file {
        let name = path.display();
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("ca_file `{name}`: {e}"))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("ca_file `{name}`: {e}"))?;
            roots
                .add(cert.clone())
                .map_err(|e| format!("ca_file `{name}`: unusable certificate: {e}"))?;
            listed.push(cert);
        }
        if listed.is_empty() {
            return Err(format!("ca_file `{name}`: no PEM certificate in it"));
        }
    }
    let pin = fingerprint.map(parse_fingerprint).transpose()?;
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let verifier = Arc::new(Verifier {
        webpki,
        listed,
        pin,
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The system trust store, read once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::debug!(errors = ?found.errors, "some system trust store entries could not be read");
        }
        found.certs
    })
}

/// `sha256:<64 hex digits>` (colons between bytes allowed, any case) to bytes.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let hex = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .ok_or_else(|| format!("`{text}` is not `sha256:<hex>`"))?
        .replace(':', "");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "`{text}` is not `sha256:` and 64 hex digits (the SHA-256 of the certificate, as `openssl x509 -noout -fingerprint -sha256` prints it)"
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("`{text}` is not hex"))?;
    }
    Ok(out)
}

/// `sha256:<hex>` of a certificate.
pub fn fingerprint_of(cert: &[u8]) -> String {
    let digest = sha2::Sha256::digest(cert);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Why we refused a server certificate, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted {
    /// The cause and the fix, in words.
    pub why: String,
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for Untrusted {}

fn untrusted(why: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Untrusted {
        why,
    }))))
}

/// The webpki verifier, plus: a server certificate listed in `tls_ca_file`
/// is trusted as it is (name, dates and the handshake signature still
/// checked), and a pin replaces chain and name checks.
#[derive(Debug)]
struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificates of `tls_ca_file`.
    listed: Vec<CertificateDer<'static>>,
    /// SHA-256 the server certificate must have.
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    /// A certificate that is itself in `tls_ca_file`: check its dates and name.
    fn verify_listed(
        &self,
        end_entity: &CertificateDer<'_>,
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let (not_before, not_after) = validity(end_entity).ok_or_else(|| {
            untrusted("the server's certificate (listed in tls_ca_file) cannot be parsed".into())
        })?;
        let now = now.as_secs();
        if now < not_before {
            return Err(untrusted(format!(
                "the server's certificate is not valid yet (from {}); check the clock",
                unix_to_text(not_before)
            )));
        }
        if now > not_after {
            return Err(untrusted(format!(
                "the server's certificate expired on {}: renew it on the server and put the new one in upstream.tls_ca_file",
                unix_to_text(not_after)
            )));
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_name(&parsed, server_name).map_err(|e| explain(&e, server_name))?;
        Ok(ServerCertVerified::assertion())
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if let Some(pin) = &self.pin {
            let got = sha2::Sha256::digest(end_entity.as_ref());
            if got.as_slice() == pin {
                return Ok(ServerCertVerified::assertion());
            }
            return Err(untrusted(format!(
                "the server's certificate ({}) does not match upstream.tls_fingerprint: if the server's certificate was replaced on purpose, pin the new one",
                fingerprint_of(end_entity)
            )));
        }
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            Err(e) if self.listed.iter().any(|c| c == end_entity) => {
                // webpki refuses a CA certificate as the server's own
                // (`openssl req -x509` makes them CA:TRUE); the operator
                // listed this very certificate, so take it as a pin plus
                // the checks webpki would have made.
                tracing::debug!(error = %e, "server certificate is listed in tls_ca_file; checking dates and name");
                self.verify_listed(end_entity, server_name, now)
            }
            Err(e) => Err(match &e {
                Error::InvalidCertificate(CertificateError::Other(_))
                | Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    let fp = fingerprint_of(end_entity);
                    if is_self_signed(end_entity) {
                        untrusted(format!(
                            "the server's certificate is self-signed: put it in upstream.tls_ca_file or pin it with upstream.tls_fingerprint = \"{fp}\""
                        ))
                    } else {
                        untrusted(format!(
                            "the server's certificate is issued by a CA that is not trusted: put that CA's certificate in upstream.tls_ca_file (or the system trust store), or pin the server's certificate with upstream.tls_fingerprint = \"{fp}\""
                        ))
                    }
                }
                _ => explain(&e, server_name),
            }),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A certificate verification error in words, with the fix.
fn explain(e: &Error, server_name: &ServerName<'_>) -> Error {
    let name = server_name.to_str();
    let why = match e {
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for `{name}` ({}): use the name it was issued for in upstream.server, or pin the certificate with upstream.tls_fingerprint",
            certificate_text(e)
        ),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!(
            "the server's certificate has expired ({}): it must be renewed on the server",
            certificate_text(e)
        ),
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "the server's certificate is not valid yet ({}): check this host's clock",
            certificate_text(e)
        ),
        Error::InvalidCertificate(CertificateError::Revoked) => {
            "the server's certificate has been revoked".to_string()
        }
        other => return other.clone(),
    };
    untrusted(why)
}

fn certificate_text(e: &Error) -> String {
    match e {
        Error::InvalidCertificate(c) => c.to_string(),
        other => other.to_string(),
    }
}

/// The text for a TLS failure somewhere in `err`'s source chain: our
/// [`Untrusted`] explanation when there is one, else rustls's words.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(u) = e.downcast_ref::<Untrusted>() {
            return Some(u.why.clone());
        }
        if let Some(r) = e.downcast_ref::<Error>() {
            if let Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = r
                && let Some(u) = inner.downcast_ref::<Untrusted>()
            {
                return Some(u.why.clone());
            }
            return Some(r.to_string());
        }
        // An io::Error's source() skips the error it wraps: look inside.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            return describe(inner);
        }
        cur = e.source();
    }
    None
}

/// True when the certificate's issuer is its subject.
fn is_self_signed(der: &[u8]) -> bool {
    let Some(tbs) = tbs_fields(der) else {
        return false;
    };
    tbs.issuer == tbs.subject
}

/// The parts of a TBSCertificate we look at.
struct Tbs<'a> {
    issuer: &'a [u8],
    validity: &'a [u8],
    subject: &'a [u8],
}

/// One DER element: `(tag, contents, rest)`.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Sans-IO walk of Certificate → TBSCertificate (RFC 5280 §4.1).
fn tbs_fields(der: &[u8]) -> Option<Tbs<'_>> {
    let (0x30, cert, _) = der_next(der)? else {
        return None;
    };
    let (0x30, tbs, _) = der_next(cert)? else {
        return None;
    };
    let (mut tag, mut value, mut rest) = der_next(tbs)?;
    if tag == 0xa0 {
        (tag, value, rest) = der_next(rest)?; // serialNumber
    }
    let _ = value;
    if tag != 0x02 {
        return None;
    }
    let (0x30, _sig_alg, rest) = der_next(rest)? else {
        return None;
    };
    let (0x30, issuer, rest) = der_next(rest)? else {
        return None;
    };
    let (0x30, validity, rest) = der_next(rest)? else {
        return None;
    };
    let (0x30, subject, _) = der_next(rest)? else {
        return None;
    };
    Some(Tbs {
        issuer,
        validity,
        subject,
    })
}

/// `(notBefore, notAfter)` of a certificate, in UNIX seconds.
fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let v = tbs_fields(der)?.validity;
    let (t1, before, rest) = der_next(v)?;
    let (t2, after, _) = der_next(rest)?;
    Some((asn1_time(t1, before)?, asn1_time(t2, after)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`, tag 0x18) to UNIX seconds.
fn asn1_time(tag: u8, text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |s: &str| s.parse::<u64>().ok();
    let (year, rest) = match (tag, text.len()) {
        (0x17, 12) => {
            let yy = num(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (0x18, 14) => (num(&text[..4])?, &text[4..]),
        _ => return None,
    };
    let (month, day) = (num(&rest[..2])?, num(&rest[2..4])?);
    let (h, m, s) = (num(&rest[4..6])?, num(&rest[6..8])?, num(&rest[8..10])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    Some(days * 86400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    let y = y as i64 - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146097 + doe - 719468).ok()
}

/// A UNIX time as `YYYY-MM-DD HH:MM:SS UTC`.
fn unix_to_text(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_and_print() {
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_fingerprint(&format!("sha256:{hex}")).unwrap(),
            [0xab; 32]
        );
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{}", colons.join(":"))).unwrap(),
            [0xab; 32]
        );
        assert!(parse_fingerprint(&hex).is_err());
        assert!(parse_fingerprint("sha256:abc").is_err());
        assert!(parse_fingerprint(&format!("sha256:{}", "zz".repeat(32))).is_err());
        assert!(parse_fingerprint(&format!("sha1:{hex}")).is_err());
        assert_eq!(
            fingerprint_of(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn asn1_times() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"491231235959Z"), Some(2524607999));
        assert_eq!(asn1_time(0x18, b"20261201201500Z"), Some(1796156100));
        assert_eq!(asn1_time(0x17, b"261301000000Z"), None);
        assert_eq!(asn1_time(0x17, b"2612010000Z"), None);
        assert_eq!(asn1_time(0x18, b"20261201201500"), None);
        assert_eq!(der_next(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(der_next(&[0x30, 0x03, 1]), None);
    }

    #[test]
    fn validity_and_self_signed_of_generated_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2024, 2, 29);
        params.not_after = rcgen::date_time_ymd(2051, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let (from, to) = validity(cert.der()).unwrap();
        assert_eq!(unix_to_text(from), "2024-02-29 00:00:00 UTC");
        assert_eq!(unix_to_text(to), "2051-01-02 00:00:00 UTC");
        assert!(is_self_signed(cert.der()));
        assert!(validity(b"\x30\x00").is_none());
    }
}
