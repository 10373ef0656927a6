//! SMTP AUTH: PLAIN, LOGIN and XOAUTH2 (with one token refresh and retry), the mailbox an XOAUTH2 connection signs in as, and keeping secrets out of failure texts.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::conn::Conn;
use super::{SmtpTransport, printable};
use crate::config::Secret;
use crate::oauth::{IdentityTokens, TokenSource};
use crate::transport::{Envelope, Failure};

/// How we authenticate to the upstream.
#[derive(Clone)]
pub enum SmtpAuth {
    /// No AUTH (a relay that trusts our address).
    None,
    /// Username and password, sent with AUTH PLAIN (preferred) or AUTH LOGIN.
    Basic {
        /// SASL authentication identity.
        username: String,
        /// Password; only ever sent base64-encoded inside AUTH.
        password: Secret,
    },
    /// OAuth2 bearer token with AUTH XOAUTH2 (UPSTREAMS.md §5.1).
    XOAuth2 {
        /// Mailbox sent as `user=` when the envelope names no identity.
        user: String,
        /// Tokens for `user`.
        tokens: Arc<dyn TokenSource>,
        /// Tokens for other mailboxes (`Envelope::identity`, the
        /// Basic-to-OAuth bridge); `None`: every message goes as `user`.
        identities: Option<Arc<dyn IdentityTokens>>,
    },
}

impl std::fmt::Debug for SmtpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmtpAuth::None => f.write_str("None"),
            SmtpAuth::Basic { username, password } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", password)
                .finish(),
            SmtpAuth::XOAuth2 {
                user, identities, ..
            } => f
                .debug_struct("XOAuth2")
                .field("user", user)
                .field("per_identity", &identities.is_some())
                .finish(),
        }
    }
}

/// The XOAUTH2 initial response: `base64("user=" user ^A "auth=Bearer " token ^A ^A)`.
pub fn xoauth2_response(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// What SMTP AUTH disabled for the tenant (`535 5.7.139`) means and how to fix it.
const SMTP_AUTH_DISABLED_HINT: &str = "SMTP AUTH is disabled for this tenant or mailbox; \
enable it for the mailbox with `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false` \
(or tenant-wide with `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`); mail is held until then";

/// An authentication mechanism we can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616, sent as an initial response.
    Plain,
    /// The de-facto `AUTH LOGIN` (username and password prompts).
    Login,
    /// Google's and Microsoft's OAuth2 bearer mechanism, sent as an initial response.
    XOAuth2,
}

impl Mechanism {
    /// The name used in `AUTH <name>`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::XOAuth2 => "XOAUTH2",
        }
    }
}

/// Who an XOAUTH2 connection authenticates as, and where its tokens come from.
pub(super) struct Identity {
    /// The mailbox (`user=`).
    pub(super) user: String,
    /// Its tokens.
    pub(super) tokens: Arc<dyn TokenSource>,
}

impl SmtpTransport {
    /// A new connection, greeted, EHLO'd, secured and authenticated as
    /// `who` (XOAUTH2) or as configured: ready for MAIL FROM.
    pub(super) async fn connect(&self, who: Option<&Identity>) -> Result<Conn, Failure> {
        match who {
            Some(id) => self.connect_oauth(id).await,
            None => {
                let mut conn = self.session().await?;
                self.authenticate(&mut conn).await?;
                Ok(conn)
            }
        }
    }

    /// XOAUTH2 as `who`: a token first (no token, no connection); when the
    /// server rejects it (Microsoft `535 5.7.3`, Gmail's `334` challenge),
    /// invalidate it, get a fresh one and try once more on a new connection.
    async fn connect_oauth(&self, who: &Identity) -> Result<Conn, Failure> {
        let mut first_rejection = String::new();
        for round in 0..2 {
            let token = who.tokens.token().await.map_err(|e| {
                // Not the server's fault: failing over would not help when the
                // alternate uses the same identity, so the message waits.
                Failure::transient(format!("no OAuth token for {}: {e}", printable(&who.user)))
            })?;
            let mut conn = self.session().await?;
            match self.xoauth2(&mut conn, &who.user, &token).await? {
                None => {
                    conn.user = Some(who.user.clone());
                    return Ok(conn);
                }
                Some(rejection) => {
                    who.tokens.invalidate(&token);
                    let _ = conn.command("QUIT").await;
                    if round == 0 {
                        tracing::info!(peer = %conn.peer, user = %who.user, reply = %rejection, "XOAUTH2 token rejected; getting a fresh token and retrying once");
                        first_rejection = rejection;
                        continue;
                    }
                    return Err(Failure::server(format!(
                        "{} rejected the OAuth token for {} twice, also right after a refresh ({first_rejection}; then {rejection}): \
check that the signed-in account is {} and may send as it, and that the app has the SMTP.Send (Microsoft) or https://mail.google.com/ (Google) permission",
                        conn.peer,
                        printable(&who.user),
                        printable(&who.user)
                    )));
                }
            }
        }
        Err(Failure::server("XOAUTH2 retry loop ended unexpectedly"))
    }

    /// One `AUTH XOAUTH2`. `Ok(None)`: authenticated; `Ok(Some(reply))`: the
    /// token was rejected; `Err`: any other failure (never carrying the token).
    async fn xoauth2(
        &self,
        conn: &mut Conn,
        user: &str,
        token: &Secret,
    ) -> Result<Option<String>, Failure> {
        if !conn.ext.auth_xoauth2 {
            return Err(Failure::server(format!(
                "{} does not offer AUTH XOAUTH2, which OAuth needs",
                conn.peer
            )));
        }
        let initial = xoauth2_response(user, token.expose());
        let secrets = [token.expose().to_string(), initial.clone()];
        let stage = "after AUTH XOAUTH2";
        let reply = conn
            .command(&format!("AUTH XOAUTH2 {initial}"))
            .await
            .map_err(|b| conn.broken(b, stage))?;
        let reply = if reply.code == 334 {
            // Gmail: an error challenge (base64 JSON); answer with an empty
            // line, then the final 535 follows (UPSTREAMS.md §5.1).
            let challenge = reply
                .lines
                .first()
                .and_then(|l| B64.decode(l.trim()).ok())
                .map(|b| printable(&String::from_utf8_lossy(&b)))
                .unwrap_or_default();
            let last = conn.command("").await.map_err(|b| conn.broken(b, stage))?;
            if last.code / 100 == 2 {
                return Ok(None);
            }
            let text = redact(&last.text(), &secrets);
            return Ok(Some(if challenge.is_empty() {
                text
            } else {
                format!("334 {challenge}, then {text}")
            }));
        } else {
            reply
        };
        let text = redact(&reply.text(), &secrets);
        match reply.code {
            c if c / 100 == 2 => Ok(None),
            535 if reply.lines.iter().any(|l| l.contains("5.7.139")) => Err(Failure::server(
                format!("{text} ({stage}, {}): {SMTP_AUTH_DISABLED_HINT}", conn.peer),
            )),
            c if c / 100 == 5 => Ok(Some(text)),
            _ => Err(Failure::server(format!(
                "authentication failed: {text} ({stage}, {})",
                conn.peer
            ))),
        }
    }

    /// AUTH as configured. Every failure is a server failure (the mail waits
    /// and the alternate may be tried) and never carries the password.
    async fn authenticate(&self, conn: &mut Conn) -> Result<(), Failure> {
        let SmtpAuth::Basic { username, password } = &self.settings.auth else {
            return Ok(());
        };
        let mech = if conn.ext.auth_plain {
            Mechanism::Plain
        } else if conn.ext.auth_login {
            Mechanism::Login
        } else {
            return Err(Failure::server(format!(
                "{} offers no AUTH mechanism we support (PLAIN, LOGIN)",
                conn.peer
            )));
        };
        let pass = password.expose();
        let initial = B64.encode(format!("\0{username}\0{pass}"));
        let pass64 = B64.encode(pass);
        // Strings that must never appear in a failure text, even if a
        // server echoes what it got.
        let secrets = [pass.to_string(), pass64.clone(), initial.clone()];
        let stage = format!("after AUTH {}", mech.name());
        // Only PLAIN and LOGIN are chosen above; XOAUTH2 is `xoauth2()`.
        let result = if mech == Mechanism::Login {
            match conn.command("AUTH LOGIN").await {
                Ok(r) if r.code == 334 => match conn.command(&B64.encode(username)).await {
                    Ok(r) if r.code == 334 => conn.command(&pass64).await,
                    other => other,
                },
                other => other,
            }
        } else {
            conn.command(&format!("AUTH PLAIN {initial}")).await
        };
        let reply = result.map_err(|b| conn.broken(b, &stage))?;
        if reply.code / 100 == 2 {
            return Ok(());
        }
        if reply.code == 334 {
            // Still prompting: cancel the exchange (RFC 4954 §4) before failing.
            let _ = conn.command("*").await;
        }
        Err(Failure::server(format!(
            "authentication failed: {} ({stage}, {})",
            redact(&reply.text(), &secrets),
            conn.peer
        )))
    }

    /// Who to authenticate as for `env` with XOAUTH2 (`None` for other auth).
    pub(super) fn identity_for(&self, env: &Envelope) -> Option<Identity> {
        let SmtpAuth::XOAuth2 {
            user,
            tokens,
            identities,
        } = &self.settings.auth
        else {
            return None;
        };
        match (
            env.identity.as_deref().filter(|i| !i.is_empty()),
            identities,
        ) {
            (Some(id), Some(all)) if !id.eq_ignore_ascii_case(user) => Some(Identity {
                user: id.to_string(),
                tokens: all.source(id),
            }),
            _ => Some(Identity {
                user: user.clone(),
                tokens: tokens.clone(),
            }),
        }
    }
}

/// Replace every secret in `text` by `***`.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s.as_str(), "***");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::smtp::deliver::unsafe_address;
    use crate::transport::smtp::reply::{Extensions, parse_lines as parse};

    #[test]
    fn xoauth2_test_vectors_from_upstreams_5_1() {
        // Microsoft's documentation.
        assert_eq!(
            xoauth2_response(
                "test@contoso.onmicrosoft.com",
                "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"
            ),
            "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ=="
        );
        // Google's documentation.
        assert_eq!(
            xoauth2_response(
                "someuser@example.com",
                "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
            ),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
        let r = parse(&["250-x\r\n", "250 AUTH LOGIN XOAUTH2\r\n"])
            .unwrap()
            .unwrap();
        let ext = Extensions::parse(&r);
        assert!(ext.auth_xoauth2 && ext.auth_login && !ext.auth_plain);
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let a = SmtpAuth::Basic {
            username: "u".into(),
            password: Secret::new("pw-secret"),
        };
        assert!(!format!("{a:?}").contains("pw-secret"));
        let x = SmtpAuth::XOAuth2 {
            user: "a@b".into(),
            tokens: Arc::new(crate::oauth::StaticToken {
                token: Secret::new("tok-secret"),
                identity: "a@b".into(),
            }),
            identities: None,
        };
        assert!(!format!("{x:?}").contains("tok-secret"));
    }

    #[test]
    fn redaction_and_address_checks() {
        let secrets = ["pw".to_string(), String::new()];
        assert_eq!(redact("bad pw here", &secrets), "bad *** here");
        assert!(unsafe_address("a@b>\r\nRCPT TO:<c@d"));
        assert!(!unsafe_address("\"john doe\"@example.com"));
        assert!(!unsafe_address("jörg@example.de"));
    }
}
