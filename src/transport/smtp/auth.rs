//! SMTP AUTH: PLAIN, LOGIN, XOAUTH2 and OAUTHBEARER with RFC 4954 framing, AUTH replies classified by meaning (one token refresh and retry only for a rejected token), the mailbox an OAuth connection signs in as, and keeping secrets out of failure texts.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::conn::{Broken, Conn};
use super::reply::Reply;
use super::{SmtpTransport, printable};
use crate::common::Secret;
use crate::oauth::{IdentityTokens, TokenSource};
use crate::transport::{Enhanced, Envelope, Failure};

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
    /// OAuth2 bearer token with AUTH XOAUTH2, or OAUTHBEARER (RFC 7628)
    /// when the server offers only that.
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
    /// Google's and Microsoft's OAuth2 bearer mechanism.
    XOAuth2,
    /// RFC 7628's standard OAuth2 bearer mechanism (Dovecot, Gmail).
    OAuthBearer,
}

impl Mechanism {
    /// The name used in `AUTH <name>`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// What answers a server's error challenge (`334 <base64 JSON>`): an
    /// empty line for XOAUTH2, RFC 7628 §3.2.3's dummy `%x01` for OAUTHBEARER.
    pub fn error_answer(self) -> &'static str {
        match self {
            Mechanism::OAuthBearer => "AQ==",
            _ => "",
        }
    }
}

/// The SMTP command line limit, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;

/// The first line of an AUTH exchange (RFC 4954 §4): `AUTH <mech> <initial>`
/// when that line with its CRLF fits in [`MAX_COMMAND_LINE`] octets, else
/// `AUTH <mech>` and `true`: the response goes after the server's `334`.
pub fn auth_command(mech: Mechanism, initial: &str) -> (String, bool) {
    let line = format!("AUTH {} {initial}", mech.name());
    if line.len() + 2 <= MAX_COMMAND_LINE {
        (line, false)
    } else {
        (format!("AUTH {}", mech.name()), true)
    }
}

/// The OAUTHBEARER initial client response (RFC 7628 §3.1):
/// `base64("n,a=" user "," ^A "host=" host ^A "port=" port ^A "auth=Bearer " token ^A ^A)`,
/// with `,` and `=` in `user` escaped as RFC 5801's saslname wants.
pub fn oauthbearer_response(user: &str, host: &str, port: u16, token: &str) -> String {
    let user = user.replace('=', "=3D").replace(',', "=2C");
    B64.encode(format!(
        "n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    ))
}

/// What an AUTH reply means for what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    /// `2xx`: authenticated.
    Accepted,
    /// `535`, or `5xx` with a `5.7.x` credentials code: the credentials
    /// (token) were rejected; for OAuth, one refresh and one retry.
    Rejected,
    /// `535 5.7.139`: Microsoft's SMTP AUTH disabled for the tenant or mailbox.
    Disabled,
    /// `500`/`501`/`502`/`504`, any other `5xx`, or a `334` where none is
    /// expected: the server did not take the command; a new token would not help.
    Protocol,
    /// `454` and other `4xx`: temporary, try later.
    Transient,
}

/// Classify the final reply of an AUTH exchange (sans-IO).
pub(super) fn classify_auth(reply: &Reply) -> AuthVerdict {
    let enhanced = reply.enhanced;
    match reply.code {
        c if c / 100 == 2 => AuthVerdict::Accepted,
        535 if enhanced == Some(Enhanced::new(5, 7, 139)) => AuthVerdict::Disabled,
        500 | 501 | 502 | 504 => AuthVerdict::Protocol,
        535 => AuthVerdict::Rejected,
        c if c / 100 == 5 && enhanced.is_some_and(|e| e.subject == 7) => AuthVerdict::Rejected,
        c if c / 100 == 4 => AuthVerdict::Transient,
        _ => AuthVerdict::Protocol,
    }
}

/// A classified AUTH reply with its text, secrets redacted.
pub(super) struct AuthReply {
    /// What the reply means.
    pub(super) verdict: AuthVerdict,
    /// The reply on one line, secrets replaced by `***`.
    pub(super) text: String,
}

impl AuthReply {
    fn of(reply: &Reply, secrets: &[String]) -> Self {
        AuthReply {
            verdict: classify_auth(reply),
            text: redact(&reply.text(), secrets),
        }
    }
}

/// Send `AUTH <mech>` with `initial` framed per RFC 4954 §4 (inline when
/// the line fits, else after the server's `334`); the reply to the last line
/// sent. A server that answers `AUTH <mech>` with anything but `334` gets
/// nothing more.
async fn sasl(conn: &mut Conn, mech: Mechanism, initial: &str) -> Result<Reply, Broken> {
    let (line, two_step) = auth_command(mech, initial);
    let reply = conn.command(&line).await?;
    if two_step && reply.code == 334 {
        return conn.command(initial).await;
    }
    Ok(reply)
}

/// Who an OAuth connection authenticates as, and where its tokens come from.
pub(super) struct Identity {
    /// The mailbox (`user=`).
    pub(super) user: String,
    /// Its tokens.
    pub(super) tokens: Arc<dyn TokenSource>,
}

impl SmtpTransport {
    /// A new connection, greeted, EHLO'd, secured and authenticated as
    /// `who` (XOAUTH2 or OAUTHBEARER) or as configured: ready for MAIL FROM.
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

    /// OAuth as `who`: a token first (no token, no connection); when the
    /// server rejects it (`535`, `5.7.x`, Gmail's and Dovecot's `334`
    /// challenge), invalidate it, get a fresh one and try once more on a new
    /// connection. Protocol errors (`500`–`504`) and `4xx` are not the
    /// token's fault: no refresh, no retry.
    async fn connect_oauth(&self, who: &Identity) -> Result<Conn, Failure> {
        let mut first_rejection = String::new();
        for round in 0..2 {
            let token = who.tokens.token().await.map_err(|e| {
                // Not the server's fault: failing over would not help when the
                // alternate uses the same identity, so the message waits.
                Failure::transient(format!("no OAuth token for {}: {e}", printable(&who.user)))
            })?;
            let mut conn = self.session().await?;
            let (mech, reply) = self.oauth_auth(&mut conn, &who.user, &token).await?;
            let text = reply.text;
            match reply.verdict {
                AuthVerdict::Accepted => {
                    conn.user = Some(who.user.clone());
                    return Ok(conn);
                }
                AuthVerdict::Rejected => {
                    // Coalesces: only the token that failed is dropped, so
                    // concurrent failures with it cause one refresh.
                    who.tokens.invalidate(&token);
                    let _ = conn.command("QUIT").await;
                    if round == 0 {
                        tracing::info!(peer = %conn.peer, user = %who.user, mechanism = mech.name(), reply = %text, "OAuth token rejected; getting a fresh token and retrying once");
                        first_rejection = text;
                        continue;
                    }
                    let why = format!(
                        "{} rejected the OAuth token for {} twice, also right after a refresh ({first_rejection}; then {text}): \
check that the signed-in account is {} and may send as it, and that the app has the SMTP.Send (Microsoft) or https://mail.google.com/ (Google) permission",
                        conn.peer,
                        printable(&who.user),
                        printable(&who.user)
                    );
                    who.tokens.rejected(&why);
                    return Err(Failure::server(why));
                }
                AuthVerdict::Disabled => {
                    let _ = conn.command("QUIT").await;
                    return Err(Failure::server(format!(
                        "{text} (after AUTH {}, {}): {SMTP_AUTH_DISABLED_HINT}",
                        mech.name(),
                        conn.peer
                    )));
                }
                AuthVerdict::Protocol => {
                    let _ = conn.command("QUIT").await;
                    return Err(Failure::server(format!(
                        "{} refused AUTH {} as a protocol error: {text}; this is not a token problem \
(the token was not refreshed), check that the server supports {} on this port",
                        conn.peer,
                        mech.name(),
                        mech.name()
                    )));
                }
                AuthVerdict::Transient => {
                    let _ = conn.command("QUIT").await;
                    return Err(Failure::server(format!(
                        "temporary authentication failure: {text} (after AUTH {}, {})",
                        mech.name(),
                        conn.peer
                    )));
                }
            }
        }
        Err(Failure::server("OAuth retry loop ended unexpectedly"))
    }

    /// One OAuth AUTH exchange (XOAUTH2 preferred, else OAUTHBEARER), with
    /// RFC 4954 framing and the error challenge answered. `Err`: the
    /// connection broke or no mechanism fits (never carrying the token).
    async fn oauth_auth(
        &self,
        conn: &mut Conn,
        user: &str,
        token: &Secret,
    ) -> Result<(Mechanism, AuthReply), Failure> {
        let mech = if conn.ext.auth_xoauth2 {
            Mechanism::XOAuth2
        } else if conn.ext.auth_oauthbearer {
            Mechanism::OAuthBearer
        } else {
            let _ = conn.command("QUIT").await;
            return Err(Failure::server(format!(
                "{} offers neither AUTH XOAUTH2 nor AUTH OAUTHBEARER, one of which OAuth needs",
                conn.peer
            )));
        };
        let initial = match mech {
            Mechanism::OAuthBearer => oauthbearer_response(
                user,
                &self.settings.server.host,
                self.settings.server.port,
                token.expose(),
            ),
            _ => xoauth2_response(user, token.expose()),
        };
        let secrets = [token.expose().to_string(), initial.clone()];
        let stage = format!("after AUTH {}", mech.name());
        let reply = sasl(conn, mech, &initial)
            .await
            .map_err(|b| conn.broken(b, &stage))?;
        if reply.code != 334 {
            return Ok((mech, AuthReply::of(&reply, &secrets)));
        }
        // An error challenge (base64 JSON, RFC 7628 §3.2.2 and Gmail's
        // XOAUTH2): answer it, then the final reply follows.
        let challenge = reply
            .lines
            .first()
            .and_then(|l| B64.decode(l.trim()).ok())
            .map(|b| printable(&String::from_utf8_lossy(&b)))
            .unwrap_or_default();
        let last = conn
            .command(mech.error_answer())
            .await
            .map_err(|b| conn.broken(b, &stage))?;
        let mut out = AuthReply::of(&last, &secrets);
        if last.code == 334 {
            // Still prompting: cancel (RFC 4954 §4) and call it a protocol error.
            let _ = conn.command("*").await;
            out.verdict = AuthVerdict::Protocol;
        } else if out.verdict != AuthVerdict::Accepted && !challenge.is_empty() {
            out.text = format!("334 {challenge}, then {}", out.text);
        }
        Ok((mech, out))
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
        // Only PLAIN and LOGIN are chosen above; OAuth is `oauth_auth()`.
        let result = if mech == Mechanism::Login {
            match conn.command("AUTH LOGIN").await {
                Ok(r) if r.code == 334 => match conn.command(&B64.encode(username)).await {
                    Ok(r) if r.code == 334 => conn.command(&pass64).await,
                    other => other,
                },
                other => other,
            }
        } else {
            sasl(conn, mech, &initial).await
        };
        let reply = result.map_err(|b| conn.broken(b, &stage))?;
        if reply.code / 100 == 2 {
            return Ok(());
        }
        if reply.code == 334 {
            // Still prompting: cancel the exchange (RFC 4954 §4) before failing.
            let _ = conn.command("*").await;
        }
        let what = match classify_auth(&reply) {
            AuthVerdict::Protocol => "authentication refused as a protocol error",
            AuthVerdict::Transient => "temporary authentication failure",
            _ => "authentication failed",
        };
        Err(Failure::server(format!(
            "{what}: {} ({stage}, {})",
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
    fn initial_response_inline_only_when_the_line_fits_512_octets() {
        // "AUTH XOAUTH2 " is 13 octets, CRLF 2: 497 octets of response fit.
        let fits = "a".repeat(497);
        assert_eq!(
            auth_command(Mechanism::XOAuth2, &fits),
            (format!("AUTH XOAUTH2 {fits}"), false)
        );
        let over = "a".repeat(498);
        assert_eq!(
            auth_command(Mechanism::XOAuth2, &over),
            ("AUTH XOAUTH2".to_string(), true)
        );
        let (line, two_step) = auth_command(Mechanism::OAuthBearer, &"b".repeat(600));
        assert_eq!((line.as_str(), two_step), ("AUTH OAUTHBEARER", true));
        let (line, two_step) = auth_command(Mechanism::Plain, "AHUAcA==");
        assert_eq!((line.as_str(), two_step), ("AUTH PLAIN AHUAcA==", false));
    }

    #[test]
    fn oauthbearer_gs2_header_and_key_values_rfc7628() {
        // RFC 7628 §4.1's example, with the token of the example.
        let r = oauthbearer_response(
            "user@example.com",
            "server.example.com",
            143,
            "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
        );
        assert_eq!(
            r,
            "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
        );
        let raw = String::from_utf8(B64.decode(r).unwrap()).unwrap();
        assert_eq!(
            raw,
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        let raw = String::from_utf8(
            B64.decode(oauthbearer_response("a,b=c", "h", 1, "t"))
                .unwrap(),
        )
        .unwrap();
        assert!(raw.starts_with("n,a=a=2Cb=3Dc,\x01"), "{raw:?}");
        assert_eq!(Mechanism::OAuthBearer.error_answer(), "AQ==");
        assert_eq!(B64.decode("AQ==").unwrap(), b"\x01");
        assert_eq!(Mechanism::XOAuth2.error_answer(), "");
        let r = parse(&["250-x\r\n", "250 AUTH OAUTHBEARER\r\n"])
            .unwrap()
            .unwrap();
        let ext = Extensions::parse(&r);
        assert!(ext.auth_oauthbearer && !ext.auth_xoauth2);
    }

    #[test]
    fn auth_replies_classified_by_meaning() {
        let v = |lines: &[&str]| classify_auth(&parse(lines).unwrap().unwrap());
        assert_eq!(
            v(&["235 2.7.0 Authentication successful\r\n"]),
            AuthVerdict::Accepted
        );
        // Dovecot's answer to an over-long line: not a token problem.
        assert_eq!(v(&["500 5.5.2 Line too long\r\n"]), AuthVerdict::Protocol);
        assert_eq!(
            v(&["501 5.5.4 Invalid parameters\r\n"]),
            AuthVerdict::Protocol
        );
        assert_eq!(v(&["502 5.5.1 Unsupported\r\n"]), AuthVerdict::Protocol);
        assert_eq!(
            v(&["504 5.7.4 Unrecognized authentication type\r\n"]),
            AuthVerdict::Protocol
        );
        assert_eq!(
            v(&["503 5.5.1 Already authenticated\r\n"]),
            AuthVerdict::Protocol
        );
        assert_eq!(
            v(&["535 5.7.3 Authentication unsuccessful\r\n"]),
            AuthVerdict::Rejected
        );
        assert_eq!(
            v(&["535 5.7.8 Authentication failed.\r\n"]),
            AuthVerdict::Rejected
        );
        assert_eq!(
            v(&["534 5.7.9 Please log in with your web browser\r\n"]),
            AuthVerdict::Rejected
        );
        assert_eq!(v(&["535 Authentication failed\r\n"]), AuthVerdict::Rejected);
        assert_eq!(
            v(&[
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled\r\n"
            ]),
            AuthVerdict::Disabled
        );
        // The code where it is defined, not anywhere in the text.
        assert_eq!(
            v(&[
                "535-Authentication unsuccessful\r\n",
                "535 5.7.139 disabled\r\n"
            ]),
            AuthVerdict::Disabled
        );
        assert_eq!(
            v(&["535 Authentication failed, see 5.7.139\r\n"]),
            AuthVerdict::Rejected
        );
        assert_eq!(v(&["554 4.7.1 odd class\r\n"]), AuthVerdict::Protocol);
        assert_eq!(
            v(&["454 4.7.0 Temporary authentication failure\r\n"]),
            AuthVerdict::Transient
        );
        assert_eq!(
            v(&["451 4.7.0 Internal error occurred\r\n"]),
            AuthVerdict::Transient
        );
        assert_eq!(v(&["334 \r\n"]), AuthVerdict::Protocol);
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
