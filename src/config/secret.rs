//! A secret string that never prints itself, and the three places one can come from (inline, environment, file).

use std::fmt;

/// A secret value. `Debug` and `Display` print `***`, so a secret that ends
/// up in a log line or an error message shows nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value itself; call only where it is sent to its intended peer.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no value was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// Resolve a secret given inline, as an environment variable name, or as a
/// file path (first line, trailing newline removed). `key` is the config key
/// named in errors. At most one of the three may be set.
pub fn resolve(
    key: &str,
    inline: &str,
    env: &str,
    file: &str,
    base: &std::path::Path,
) -> Result<Secret, String> {
    let set = [!inline.is_empty(), !env.is_empty(), !file.is_empty()]
        .iter()
        .filter(|b| **b)
        .count();
    if set > 1 {
        return Err(format!(
            "{key}: set only one of `{key}`, `{key}_env` and `{key}_file`"
        ));
    }
    if !env.is_empty() {
        return match std::env::var(env) {
            Ok(v) if !v.is_empty() => Ok(Secret(v)),
            _ => Err(format!(
                "{key}_env: environment variable `{env}` is not set or empty"
            )),
        };
    }
    if !file.is_empty() {
        let path = base.join(file);
        return match std::fs::read_to_string(&path) {
            Ok(v) => Ok(Secret(v.trim_end_matches(['\r', '\n']).to_string())),
            Err(e) => Err(format!("{key}_file: cannot read `{}`: {e}", path.display())),
        };
    }
    Ok(Secret(inline.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn only_one_source() {
        let e = resolve("password", "a", "B", "", std::path::Path::new(".")).unwrap_err();
        assert!(e.starts_with("password:"), "{e}");
    }

    #[test]
    fn missing_env_names_the_key() {
        let e = resolve(
            "password",
            "",
            "MAILBRIDGE_TEST_SURELY_UNSET",
            "",
            std::path::Path::new("."),
        )
        .unwrap_err();
        assert!(e.starts_with("password_env:"), "{e}");
    }
}
