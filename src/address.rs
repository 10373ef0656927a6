//! Small checks on email addresses as they appear in SMTP envelopes and config.

/// True for `local@domain` with a non-empty local part and a plausible domain
/// (letters, digits, `-`, `.`, or an address literal in brackets). Quoted
/// local parts are accepted as they come.
pub fn is_valid_mailbox(addr: &str) -> bool {
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || local.len() > 64 || domain.is_empty() || domain.len() > 255 {
        return false;
    }
    // Control characters (tab included) are never allowed, even quoted.
    if addr.chars().any(|c| c.is_control()) {
        return false;
    }
    if addr.chars().any(|c| c == ' ' || c == '<' || c == '>') && !local.starts_with('"') {
        return false;
    }
    if domain.starts_with('[') {
        return domain.ends_with(']');
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_alphanumeric() || c == '-')
    })
}

/// The domain part of an address, lower-cased; empty when there is none.
pub fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes() {
        for ok in [
            "a@b",
            "a.b+c@example.com",
            "x@[127.0.0.1]",
            "\"a b\"@example.com",
            "ü@bücher.de",
        ] {
            assert!(is_valid_mailbox(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "@b",
            "a@",
            "a@b..c",
            "a@-b",
            "a b@c",
            "a@b\r\n",
            "a@b c",
            "\"a\tb\"@c",
        ] {
            assert!(!is_valid_mailbox(bad), "{bad}");
        }
    }
}
