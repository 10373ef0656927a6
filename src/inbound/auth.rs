//! AUTH PLAIN and LOGIN on the listener: SASL decoding (sans-IO) and argon2 password checks against `[[users]]`, with the same work for unknown users.
//!
//! The session decodes what the client sends and asks the driver to check a
//! user name and password ([`super::session::Step::Authenticate`]); the
//! driver runs [`Users::verify`] on the blocking pool (argon2 is slow on
//! purpose) and reports the answer. An unknown user is checked against a
//! dummy hash made at startup with the same parameters as a real one, so
//! unknown user and wrong password cost the same time and get the same reply.

use crate::common::Secret;
use crate::config::User;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The local users clients may authenticate as.
#[derive(Clone, Default)]
pub struct Users {
    /// `(name, argon2 PHC string)` pairs, in config order.
    users: Vec<(String, String)>,
    /// A hash of a random password with the first user's parameters; checked
    /// for unknown names so they take as long as known ones.
    dummy: String,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: hashes are not secrets, but they have no place in logs.
        f.debug_list()
            .entries(self.users.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Users {
    /// Check every hash and make the dummy one; errors name the config key.
    pub fn new(users: &[User]) -> Result<Users, String> {
        let mut out = Vec::with_capacity(users.len());
        for (i, u) in users.iter().enumerate() {
            let parsed = PasswordHash::new(&u.password_hash).map_err(|e| {
                format!("users[{i}].password_hash: not an argon2 PHC string ({e}); make one with `mailbridge hash-password`")
            })?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err(format!(
                    "users[{i}].password_hash: no salt or hash in it; make one with `mailbridge hash-password`"
                ));
            }
            argon2_for(&u.password_hash)
                .map_err(|e| format!("users[{i}].password_hash: unusable parameters ({e})"))?;
            out.push((u.name.clone(), u.password_hash.clone()));
        }
        let dummy = match out.first() {
            Some((_, hash)) => dummy_like(hash).map_err(|e| {
                format!("users[0].password_hash: cannot make a hash with its parameters ({e})")
            })?,
            None => String::new(),
        };
        Ok(Users { users: out, dummy })
    }

    /// No users: AUTH is neither offered nor accepted.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `name`'s password. Slow (argon2): call it on a
    /// blocking thread. Unknown names do the same work against the dummy hash.
    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.users.iter().find(|(n, _)| n == name) {
            Some((_, h)) => (h.as_str(), true),
            None => (self.dummy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = Argon2::default().verify_password(password, &parsed).is_ok();
        ok && known
    }
}

/// The hasher an existing PHC string was made with.
fn argon2_for(hash: &str) -> Result<Argon2<'static>, String> {
    let parsed = PasswordHash::new(hash).map_err(|e| e.to_string())?;
    let alg = Algorithm::try_from(parsed.algorithm).map_err(|e| e.to_string())?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| e.to_string())?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).map_err(|e| e.to_string())?;
    Ok(Argon2::new(alg, version, params))
}

/// A hash of a random password with the same algorithm, version and parameters as `like`.
fn dummy_like(like: &str) -> Result<String, String> {
    let argon = argon2_for(like)?;
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    let password: [u8; 32] = rand::random();
    argon
        .hash_password(&password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A SASL mechanism the listener implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616: one response, `authzid NUL authcid NUL password`.
    Plain,
    /// The de-facto LOGIN: user name, then password, each on its own line.
    Login,
}

impl Mechanism {
    /// The mechanism named in `AUTH <name>` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }
}

/// Decode one base64 SASL response (`=` is the empty response, RFC 4954 §4).
pub fn decode_response(text: &[u8]) -> Option<Vec<u8>> {
    if text == b"=" {
        return Some(Vec::new());
    }
    STANDARD.decode(text).ok()
}

/// Split a decoded PLAIN response into user name and password. An
/// authorisation identity other than the user itself is refused (`None`):
/// mailbridge has no "act as another user".
pub fn split_plain(decoded: &[u8]) -> Option<(String, Secret)> {
    let mut parts = decoded.split(|&b| b == 0);
    let (authz, authc, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authc.is_empty() {
        return None;
    }
    if !authz.is_empty() && authz != authc {
        return None;
    }
    let user = String::from_utf8(authc.to_vec()).ok()?;
    let password = String::from_utf8(password.to_vec()).ok()?;
    Some((user, Secret::new(password)))
}

/// A cheap argon2id hash for tests (the default parameters take tens of milliseconds).
#[cfg(test)]
pub(crate) fn cheap_hash(password: &str) -> String {
    let params = Params::new(8, 1, 1, None).expect("params");
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
    argon
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, password: &str) -> User {
        User {
            name: name.into(),
            password_hash: cheap_hash(password),
            mailbox: String::new(),
        }
    }

    #[test]
    fn verify_known_unknown_and_wrong() {
        let users = Users::new(&[user("app", "s3cret"), user("printer", "pw")]).unwrap();
        assert!(users.verify("app", b"s3cret"));
        assert!(users.verify("printer", b"pw"));
        assert!(!users.verify("app", b"pw"));
        assert!(!users.verify("App", b"s3cret"));
        assert!(!users.verify("nobody", b"s3cret"));
        assert!(!users.verify("", b""));
        // The dummy has the users' parameters (so it costs the same) but not their salt.
        let dummy = PasswordHash::new(&users.dummy).unwrap();
        let real = PasswordHash::new(&users.users[0].1).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
        assert_eq!(dummy.hash.map(|h| h.len()), real.hash.map(|h| h.len()));
        assert_ne!(dummy.salt, real.salt);
        // Names only in Debug.
        assert_eq!(format!("{users:?}"), r#"["app", "printer"]"#);
    }

    /// Unknown user and wrong password cost the same: the fastest of several
    /// runs of each are within a factor of two (the argon2 work dominates).
    #[test]
    fn unknown_user_costs_the_same_argon2_work_as_a_wrong_password() {
        // Equal cost by construction, checked without a clock: an unknown
        // name is verified against a dummy hash made with the first user's
        // algorithm, version and parameters (memory, iterations, lanes,
        // output length), so both paths run the same argon2 computation.
        let params = Params::new(2048, 3, 1, Some(24)).unwrap();
        let argon = Argon2::new(Algorithm::Argon2i, Version::V0x10, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let hash = argon.hash_password(b"pw", &salt).unwrap().to_string();
        let users = Users::new(&[User {
            name: "app".into(),
            password_hash: hash.clone(),
            mailbox: String::new(),
        }])
        .unwrap();
        let (real, dummy) = (
            PasswordHash::new(&hash).unwrap(),
            PasswordHash::new(&users.dummy).unwrap(),
        );
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(
            Params::try_from(&dummy).unwrap(),
            Params::try_from(&real).unwrap()
        );
        assert_eq!(dummy.hash.map(|h| h.len()), real.hash.map(|h| h.len()));
        assert_ne!(dummy.salt, real.salt, "a fresh salt, not a copy");
        // Neither a wrong password nor an unknown name passes, and the real
        // password only for its own name.
        assert!(!users.verify("app", b"wrong"));
        assert!(!users.verify("nobody", b"wrong"));
        assert!(!users.verify("nobody", b"pw"));
        assert!(users.verify("app", b"pw"));
    }

    #[test]
    fn bad_hashes_name_the_key() {
        let mut bad = user("a", "x");
        for hash in [
            "$argon2id$v=19$m=19456,t=2,p=1",
            "$argon2id$v=19$m=x,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "$argon2xx$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "plain",
        ] {
            bad.password_hash = hash.into();
            let err = Users::new(&[user("ok", "y"), bad.clone()]).unwrap_err();
            assert!(err.starts_with("users[1].password_hash: "), "{hash}: {err}");
        }
        assert!(Users::new(&[]).unwrap().is_empty());
    }

    #[test]
    fn sasl_decoding() {
        assert_eq!(decode_response(b"="), Some(vec![]));
        assert_eq!(decode_response(b"AGEAYg=="), Some(b"\0a\0b".to_vec()));
        assert_eq!(decode_response(b"not base64!"), None);
        let (u, p) = split_plain(b"\0app\0s3cret").unwrap();
        assert_eq!((u.as_str(), p.expose()), ("app", "s3cret"));
        let (u, _) = split_plain(b"app\0app\0x").unwrap();
        assert_eq!(u, "app");
        assert!(split_plain(b"other\0app\0x").is_none());
        assert!(split_plain(b"\0\0x").is_none());
        assert!(split_plain(b"\0app").is_none());
        assert!(split_plain(b"\0app\0x\0y").is_none());
        assert!(split_plain(b"\0app\0\xff").is_none());
        assert_eq!(Mechanism::from_name("plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::from_name("LOGIN"), Some(Mechanism::Login));
        assert_eq!(Mechanism::from_name("CRAM-MD5"), None);
    }
}
