//! Where a configured secret comes from: inline, an environment variable (`*_env`) or a file (`*_file`), at most one of them.

use crate::common::Secret;

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
            Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
            _ => Err(format!(
                "{key}_env: environment variable `{env}` is not set or empty"
            )),
        };
    }
    if !file.is_empty() {
        let path = base.join(file);
        return match std::fs::read_to_string(&path) {
            Ok(v) => Ok(Secret::new(v.trim_end_matches(['\r', '\n']))),
            Err(e) => Err(format!("{key}_file: cannot read `{}`: {e}", path.display())),
        };
    }
    Ok(Secret::new(inline))
}

#[cfg(test)]
mod tests {
    use super::*;

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
