//! Delivery outcome types shared by the transports, the spool and the scheduler: the RFC 3463 enhanced status code and the class of a failure.

/// An RFC 3463 enhanced status code (`5.1.1`), from the upstream's reply or
/// mapped by the transport from its own protocol's error codes. Stored as
/// its text (`"5.1.1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced {
    /// Class: 2, 4 or 5.
    pub class: u8,
    /// Subject (0..=999).
    pub subject: u16,
    /// Detail (0..=999).
    pub detail: u16,
}

impl Enhanced {
    /// `class.subject.detail`.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Enhanced {
        Enhanced {
            class,
            subject,
            detail,
        }
    }

    /// Parse `x.y.z` exactly (class 2, 4 or 5; subject and detail up to
    /// three digits, RFC 3463 §2).
    pub fn parse(s: &str) -> Option<Enhanced> {
        let mut parts = s.split('.');
        let (c, sub, det) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let digits = |p: &str, max: usize| {
            (!p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u16>().ok())
                .flatten()
        };
        let class = digits(c, 1)?;
        if !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Enhanced::new(class as u8, digits(sub, 3)?, digits(det, 3)?))
    }
}

impl std::fmt::Display for Enhanced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl serde::Serialize for Enhanced {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Enhanced {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Enhanced::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an enhanced status code: {s}")))
    }
}

/// What kind of failure it was, as kept in the spool and reported in
/// status and DSNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The server or the way to it (refused, timeout, TLS, 421, authentication).
    Server,
    /// The upstream refused this message or recipient.
    Message,
    /// The mailbox's budget upstream (429, `432 4.3.2`, server busy): not
    /// the message's fault, so it does not count towards backoff.
    Throttled,
    /// No route could take this message (e.g. too large for every route).
    Route,
    /// Still undelivered when the queue lifetime ran out.
    Expired,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes_parse_exactly() {
        assert_eq!(Enhanced::parse("5.1.1"), Some(Enhanced::new(5, 1, 1)));
        assert_eq!(Enhanced::parse("4.7.139").unwrap().to_string(), "4.7.139");
        for bad in [
            "", "5", "5.1", "5.1.1.1", "3.1.1", "5.1000.1", "5.a.1", "5..1", "55.1.1",
        ] {
            assert_eq!(Enhanced::parse(bad), None, "{bad}");
        }
        let j = serde_json::to_string(&Some(Enhanced::new(4, 4, 7))).unwrap();
        assert_eq!(j, "\"4.4.7\"");
        let back: Option<Enhanced> = serde_json::from_str(&j).unwrap();
        assert_eq!(back, Some(Enhanced::new(4, 4, 7)));
    }
}
