//! Client authentication with a certificate (RFC 7523 §2.2, Entra ID
//! "certificate credentials"): instead of a client secret, each token
//! request carries a short-lived JWT signed (RS256) with the private key of a
//! certificate registered on the application.
//!
//! The JWT header names the certificate by its SHA-1 thumbprint (`x5t`, the
//! format Entra documents) and its SHA-256 thumbprint (`x5t#S256`); the
//! claims are `aud` = the token URL, `iss` = `sub` = the client id, a random
//! `jti`, `nbf` = `iat` = now and `exp` = now + 10 minutes.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::common::Secret;

/// `client_assertion_type` for a JWT client assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long an assertion is valid.
const LIFETIME_SECS: u64 = 600;

/// A certificate and its private key, loaded once. `Debug` shows only the
/// thumbprint.
#[derive(Clone)]
pub struct ClientCertificate {
    /// base64url(SHA-1(cert DER)).
    x5t: String,
    /// base64url(SHA-256(cert DER)).
    x5t_s256: String,
    key: Arc<RsaKeyPair>,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t", &self.x5t)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientCertificate {
    fn eq(&self, o: &Self) -> bool {
        self.x5t_s256 == o.x5t_s256 && self.key.public_key().as_ref() == o.key.public_key().as_ref()
    }
}

impl ClientCertificate {
    /// Load the PEM certificate `cert` and PEM PKCS#8 RSA key `key`. `Err`
    /// names the key at fault (`oauth.client_certificate_file` or
    /// `oauth.client_key_file`); never contains key material.
    pub fn load(cert: &Path, key: &Path) -> Result<ClientCertificate, String> {
        let cert_pem = std::fs::read(cert).map_err(|e| {
            format!(
                "oauth.client_certificate_file: cannot read {}: {e}",
                cert.display()
            )
        })?;
        let key_pem = std::fs::read(key)
            .map_err(|e| format!("oauth.client_key_file: cannot read {}: {e}", key.display()))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// As [`ClientCertificate::load`], from the PEM texts.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ClientCertificate, String> {
        let cert = CertificateDer::from_pem_slice(cert_pem).map_err(|e| {
            format!("oauth.client_certificate_file: no PEM certificate found ({e})")
        })?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem).map_err(|e| {
            format!(
                "oauth.client_key_file: no PEM PKCS#8 private key (\"BEGIN PRIVATE KEY\") found ({e}); convert with `openssl pkcs8 -topk8 -nocrypt`"
            )
        })?;
        let pair = RsaKeyPair::from_pkcs8(key.secret_pkcs8_der())
            .map_err(|e| format!("oauth.client_key_file: not a usable RSA private key ({e})"))?;
        // The certificate's SubjectPublicKeyInfo holds the RSAPublicKey DER
        // verbatim: a cheap check that the two files belong together.
        let public = pair.public_key().as_ref();
        if !cert.as_ref().windows(public.len()).any(|w| w == public) {
            return Err(
                "oauth.client_key_file: the private key does not belong to client_certificate_file"
                    .into(),
            );
        }
        Ok(ClientCertificate {
            x5t: B64URL.encode(ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                cert.as_ref(),
            )),
            x5t_s256: B64URL.encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref())),
            key: Arc::new(pair),
        })
    }

    /// The certificate's SHA-1 thumbprint, base64url (the JWT `x5t`).
    pub fn x5t(&self) -> &str {
        &self.x5t
    }

    /// A fresh signed assertion for `client_id` at token endpoint `audience`.
    pub fn assertion(&self, client_id: &str, audience: &str) -> Result<Secret, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.assertion_at(client_id, audience, now)
    }

    fn assertion_at(&self, client_id: &str, audience: &str, now: u64) -> Result<Secret, String> {
        let header = serde_json::json!({
            "alg": "RS256",
            "typ": "JWT",
            "x5t": self.x5t,
            "x5t#S256": self.x5t_s256,
        });
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": jti(),
            "nbf": now,
            "iat": now,
            "exp": now + LIFETIME_SECS,
        });
        let mut jwt = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                jwt.as_bytes(),
                &mut sig,
            )
            .map_err(|_| {
                "oauth.client_key_file: signing the client assertion failed".to_string()
            })?;
        jwt.push('.');
        jwt.push_str(&B64URL.encode(sig));
        Ok(Secret::new(jwt))
    }
}

/// A random UUID (version 4) as text.
fn jti() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &[u8] = include_bytes!("../../tests/data/client-cert.pem");
    const KEY: &[u8] = include_bytes!("../../tests/data/client-key.pem");
    const OTHER_KEY: &[u8] = include_bytes!("../../tests/data/other-key.pem");

    fn part(jwt: &str, i: usize) -> serde_json::Value {
        let p = jwt.split('.').nth(i).unwrap();
        serde_json::from_slice(&B64URL.decode(p).unwrap()).unwrap()
    }

    #[test]
    fn jwt_shape_and_signature() {
        let c = ClientCertificate::from_pem(CERT, KEY).unwrap();
        let url = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
        let jwt = c.assertion_at("cid", url, 1_700_000_000).unwrap();
        let jwt = jwt.expose();
        assert_eq!(jwt.split('.').count(), 3);
        assert!(!jwt.contains('='), "base64url without padding");

        let h = part(jwt, 0);
        assert_eq!(h["alg"], "RS256");
        assert_eq!(h["typ"], "JWT");
        let der = CertificateDer::from_pem_slice(CERT).unwrap();
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der.as_ref());
        assert_eq!(h["x5t"], B64URL.encode(sha1));
        assert_eq!(h["x5t"].as_str().unwrap().len(), 27);
        assert_eq!(h["x5t#S256"].as_str().unwrap().len(), 43);

        let cl = part(jwt, 1);
        assert_eq!(cl["aud"], url);
        assert_eq!(cl["iss"], "cid");
        assert_eq!(cl["sub"], "cid");
        assert_eq!(cl["nbf"], 1_700_000_000u64);
        assert_eq!(cl["iat"], 1_700_000_000u64);
        assert_eq!(cl["exp"], 1_700_000_600u64);
        let jti = cl["jti"].as_str().unwrap();
        assert_eq!(jti.len(), 36);
        assert_eq!(&jti[14..15], "4");
        assert_ne!(
            part(c.assertion("cid", url).unwrap().expose(), 1)["jti"],
            jti
        );

        let (signed, sig) = jwt.rsplit_once('.').unwrap();
        let pk = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            c.key.public_key().as_ref().to_vec(),
        );
        let sig = B64URL.decode(sig).unwrap();
        pk.verify(signed.as_bytes(), &sig).unwrap();
        assert!(pk.verify(b"tampered", &sig).is_err());
        // Debug shows no key material.
        assert!(!format!("{c:?}").contains("key:"));
    }

    #[test]
    fn load_errors_name_the_key() {
        let e = ClientCertificate::from_pem(b"nothing", KEY).unwrap_err();
        assert!(e.starts_with("oauth.client_certificate_file:"), "{e}");
        let e = ClientCertificate::from_pem(CERT, CERT).unwrap_err();
        assert!(e.starts_with("oauth.client_key_file:"), "{e}");
        let e = ClientCertificate::from_pem(CERT, OTHER_KEY).unwrap_err();
        assert!(
            e.starts_with("oauth.client_key_file:") && e.contains("belong"),
            "{e}"
        );
        let e =
            ClientCertificate::load(Path::new("/nonexistent/c.pem"), Path::new("k")).unwrap_err();
        assert!(e.starts_with("oauth.client_certificate_file:"), "{e}");
    }
}
