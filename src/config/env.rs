//! Configuration from the environment: `MAILBRIDGE_<TABLE>__<KEY>` variables laid over the file (or over nothing), converted to the type each key expects, every error naming the variable.
//!
//! Names: the prefix `MAILBRIDGE_`, then the key path in upper case with
//! tables joined by `__`: `MAILBRIDGE_HOSTNAME`, `MAILBRIDGE_LISTEN__ADDRESS`,
//! `MAILBRIDGE_UPSTREAM__OAUTH__CLIENT_ID`,
//! `MAILBRIDGE_UPSTREAM__ALTERNATE__SERVER`. Local users (`[[users]]`) are
//! numbered from 0: `MAILBRIDGE_USERS__0__NAME`,
//! `MAILBRIDGE_USERS__0__PASSWORD_HASH`.
//!
//! Values: a key that takes a string takes the value as is; a number or a
//! boolean (`true`/`false`, also `1`/`0`, `yes`/`no`) is parsed; a list is
//! either comma-separated (`127.0.0.1/8,::1/128`) or TOML array syntax
//! (`["a", "b"]`).
//!
//! Not configuration keys: `MAILBRIDGE_CONFIG` (the file's path),
//! `MAILBRIDGE_REQUIRE_TOOLS` and `MAILBRIDGE_TEST_*` (the test suite's), and any variable
//! that a `*_env` key names (e.g. `password_env = "MAILBRIDGE_SMTP_PASSWORD"`).

use toml::Value;

/// The prefix of every configuration variable.
pub const PREFIX: &str = "MAILBRIDGE_";

/// Variables with the prefix that are not configuration keys.
const RESERVED: &[&str] = &["MAILBRIDGE_CONFIG", "MAILBRIDGE_REQUIRE_TOOLS"];

/// Prefixes of variables that are not configuration keys (the test suite's;
/// no key is called `test`).
const RESERVED_PREFIXES: &[&str] = &["MAILBRIDGE_TEST_"];

/// Final key names whose values are secrets (masked when shown).
const SECRET_KEYS: &[&str] = &["password", "client_secret", "token"];

/// One configuration value that came from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromEnv {
    /// The variable, e.g. `MAILBRIDGE_UPSTREAM__SERVER`.
    pub var: String,
    /// The key, e.g. `upstream.server` or `users[0].name`.
    pub key: String,
    /// The value as shown by `check`: `***` for a secret.
    pub shown: String,
}

/// The configuration variables among `vars` (the prefix, not reserved).
pub fn config_vars(vars: &[(String, String)]) -> Vec<(String, String)> {
    vars.iter()
        .filter(|(k, _)| {
            k.starts_with(PREFIX)
                && !RESERVED.contains(&k.as_str())
                && !RESERVED_PREFIXES.iter().any(|p| k.starts_with(p))
        })
        .cloned()
        .collect()
}

/// The variables of this process, as [`overlay`] takes them.
pub fn process_vars() -> Vec<(String, String)> {
    // Variables that are not valid Unicode are no configuration of ours.
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Lay the configuration variables among `vars` over `doc` (the parsed file,
/// or an empty table). `schema` is the default configuration as a value: it
/// tells which keys exist and the type each expects. Returns what was set,
/// or an error naming the variable.
pub fn overlay(
    doc: &mut Value,
    schema: &Value,
    vars: &[(String, String)],
) -> Result<Vec<FromEnv>, String> {
    let mut vars = config_vars(vars);
    vars.sort();
    // Variables a `*_env` key names hold secrets, not configuration.
    let mut referenced = Vec::new();
    collect_env_refs(doc, &mut referenced);
    for (var, value) in &vars {
        if var.ends_with("_ENV") {
            referenced.push(value.clone());
        }
    }
    let mut out = Vec::new();
    for (var, value) in &vars {
        if referenced.contains(var) {
            continue;
        }
        let path: Vec<String> = var[PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|s| s.is_empty()) {
            return Err(format!(
                "{var}: empty key segment (tables are joined by `__`)"
            ));
        }
        let key = key_name(&path);
        let expected = schema_for(schema, &path).ok_or_else(|| {
            format!("{var}: no configuration key `{key}` (tables are joined by `__`, e.g. MAILBRIDGE_UPSTREAM__SERVER)")
        })?;
        let converted = convert(value, &expected).map_err(|m| format!("{var} ({key}): {m}"))?;
        set(doc, &path, converted).map_err(|m| format!("{var} ({key}): {m}"))?;
        let secret = path
            .last()
            .is_some_and(|l| SECRET_KEYS.contains(&l.as_str()));
        out.push(FromEnv {
            var: var.clone(),
            key,
            shown: if secret && !value.is_empty() {
                "***".into()
            } else {
                value.clone()
            },
        });
    }
    Ok(out)
}

/// `upstream.oauth.client_id`, `users[0].name`.
fn key_name(path: &[String]) -> String {
    let mut s = String::new();
    for p in path {
        if p.chars().all(|c| c.is_ascii_digit()) {
            s.push_str(&format!("[{p}]"));
        } else {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(p);
        }
    }
    s
}

/// The string values of keys ending in `_env`, anywhere in `v`.
fn collect_env_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Table(t) => {
            for (k, v) in t {
                match v {
                    Value::String(s) if k.ends_with("_env") => out.push(s.clone()),
                    _ => collect_env_refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_env_refs(v, out)),
        _ => {}
    }
}

/// What the schema holds at `path`: the default value (whose type is the
/// key's), `None` if there is no such key.
fn schema_for(schema: &Value, path: &[String]) -> Option<Value> {
    let (first, rest) = path.split_first()?;
    // `[[users]]`: an array of tables with a fixed set of keys.
    if schema.is_table() && first == "users" {
        let (index, rest) = rest.split_first()?;
        index.parse::<usize>().ok()?;
        return match rest {
            [k] if ["name", "password_hash", "mailbox"].contains(&k.as_str()) => {
                Some(Value::String(String::new()))
            }
            _ => None,
        };
    }
    let t = schema.as_table()?;
    // `[upstream.alternate]` is a whole upstream table.
    let next = match t.get(first.as_str()) {
        Some(v) => v,
        None if first == "alternate" && t.contains_key("oauth") => schema,
        None => return None,
    };
    if rest.is_empty() {
        // A whole table cannot be one variable.
        return (!next.is_table()).then(|| next.clone());
    }
    schema_for(next, rest)
}

/// `value` as the type of `expected`.
fn convert(value: &str, expected: &Value) -> Result<Value, String> {
    Ok(match expected {
        Value::String(_) => Value::String(value.to_string()),
        Value::Integer(_) => Value::Integer(
            value
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("`{value}` is not a whole number"))?,
        ),
        Value::Float(_) => Value::Float(
            value
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("`{value}` is not a number"))?,
        ),
        Value::Boolean(_) => Value::Boolean(match value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(format!("`{value}` is not true or false")),
        }),
        Value::Array(items) => {
            let v = value.trim();
            if v.starts_with('[') {
                let parsed: toml::Table = toml::from_str(&format!("v = {v}"))
                    .map_err(|e| format!("`{value}` is not a TOML array: {}", e.message()))?;
                parsed
                    .get("v")
                    .cloned()
                    .ok_or_else(|| format!("`{value}` is not a TOML array"))?
            } else {
                let element = items
                    .first()
                    .cloned()
                    .unwrap_or(Value::String(String::new()));
                let mut out = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    out.push(convert(part, &element)?);
                }
                Value::Array(out)
            }
        }
        Value::Datetime(_) | Value::Table(_) => {
            return Err("this key cannot be set from the environment".into());
        }
    })
}

/// Set `path` in `doc` to `value`, creating tables (and `[[users]]`
/// entries, which must be numbered without gaps) on the way.
fn set(doc: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        *doc = value;
        return Ok(());
    };
    if let Ok(index) = first.parse::<usize>() {
        let Value::Array(items) = doc else {
            return Err("is not a list in the file".into());
        };
        if index > items.len() {
            return Err(format!(
                "entry {index} skips entry {}; number them from 0 without gaps",
                items.len()
            ));
        }
        if index == items.len() {
            items.push(Value::Table(toml::Table::new()));
        }
        return set(&mut items[index], rest, value);
    }
    let Value::Table(t) = doc else {
        return Err("its table is not a table in the file".into());
    };
    if rest.is_empty() {
        t.insert(first.clone(), value);
        return Ok(());
    }
    let next_is_index = rest[0].parse::<usize>().is_ok();
    let child = t.entry(first.clone()).or_insert_with(|| {
        if next_is_index {
            Value::Array(Vec::new())
        } else {
            Value::Table(toml::Table::new())
        }
    });
    set(child, rest, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        Value::try_from(crate::config::Config::default()).unwrap()
    }

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn apply(v: &[(&str, &str)]) -> Result<(Value, Vec<FromEnv>), String> {
        let mut doc = Value::Table(toml::Table::new());
        let set = overlay(&mut doc, &schema(), &vars(v))?;
        Ok((doc, set))
    }

    #[test]
    fn types_follow_the_schema() {
        let (doc, _) = apply(&[
            ("MAILBRIDGE_UPSTREAM__PORT", "25"),
            ("MAILBRIDGE_UPSTREAM__TLS", "false"),
            ("MAILBRIDGE_UPSTREAM__SERVER", "smtp.example"),
            ("MAILBRIDGE_LISTEN__ALLOW_CLIENTS", "127.0.0.1/8, ::1/128"),
            (
                "MAILBRIDGE_LISTEN__ALLOWED_SENDER_DOMAINS",
                "[\"a.example\"]",
            ),
        ])
        .unwrap();
        let u = &doc["upstream"];
        assert_eq!(u["port"].as_integer(), Some(25));
        assert_eq!(u["tls"].as_bool(), Some(false));
        assert_eq!(u["server"].as_str(), Some("smtp.example"));
        let allow = doc["listen"]["allow_clients"].as_array().unwrap();
        assert_eq!(allow.len(), 2);
        assert_eq!(allow[1].as_str(), Some("::1/128"));
        assert_eq!(
            doc["listen"]["allowed_sender_domains"][0].as_str(),
            Some("a.example")
        );
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, val) in [
            ("MAILBRIDGE_UPSTREAM__SERVRE", "x"),
            ("MAILBRIDGE_UPSTREAM__PORT", "five"),
            ("MAILBRIDGE_UPSTREAM__TLS", "maybe"),
            ("MAILBRIDGE_UPSTREAM", "x"),
            ("MAILBRIDGE_HOSTNAM", "x"),
            ("MAILBRIDGE_USERS__1__NAME", "gap"),
            ("MAILBRIDGE_USERS__0__PASSWORD", "x"),
        ] {
            let e = apply(&[(var, val)]).unwrap_err();
            assert!(e.starts_with(var), "{var}: {e}");
        }
    }

    #[test]
    fn reserved_and_secret_variables_are_not_keys() {
        let (doc, set) = apply(&[
            ("MAILBRIDGE_CONFIG", "/etc/mailbridge/config.toml"),
            ("MAILBRIDGE_REQUIRE_TOOLS", "1"),
            ("MAILBRIDGE_TEST_LEAK_DAEMON", "1"),
            (
                "MAILBRIDGE_UPSTREAM__PASSWORD_ENV",
                "MAILBRIDGE_SMTP_PASSWORD",
            ),
            ("MAILBRIDGE_SMTP_PASSWORD", "hunter2"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(
            doc["upstream"]["password_env"].as_str(),
            Some("MAILBRIDGE_SMTP_PASSWORD")
        );
    }

    #[test]
    fn users_alternate_and_masking() {
        let (doc, set) = apply(&[
            ("MAILBRIDGE_USERS__0__NAME", "app"),
            ("MAILBRIDGE_USERS__0__PASSWORD_HASH", "$argon2id$x"),
            ("MAILBRIDGE_USERS__1__NAME", "cron"),
            ("MAILBRIDGE_UPSTREAM__ALTERNATE__SERVER", "b.example"),
            (
                "MAILBRIDGE_UPSTREAM__ALTERNATE__OAUTH__CLIENT_SECRET",
                "s3cret",
            ),
        ])
        .unwrap();
        assert_eq!(doc["users"].as_array().unwrap().len(), 2);
        assert_eq!(doc["users"][1]["name"].as_str(), Some("cron"));
        assert_eq!(
            doc["upstream"]["alternate"]["server"].as_str(),
            Some("b.example")
        );
        let secret = set
            .iter()
            .find(|f| f.key.ends_with("client_secret"))
            .unwrap();
        assert_eq!(secret.shown, "***");
        assert_eq!(secret.key, "upstream.alternate.oauth.client_secret");
        assert!(set.iter().any(|f| f.key == "users[0].name"));
    }
}
