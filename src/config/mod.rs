//! The TOML configuration: every field of the seed's "Outgoing Mail Server Settings" page is a key here; unknown keys are rejected and every error names its key. Loading validates and returns resolved types (servers, sockets, OAuth settings), so no later layer parses a string of the file again.
//!
//! The files by job: [`schema`] (tables, keys, defaults), `validate`
//! (per-key checks and resolution) and [`checks`] (rules across keys),
//! [`resolved`] (host/port, sockets, the Exchange Online rule), [`oauth`]
//! (the OAuth rules and provider defaults), `notices` (warnings for `check`
//! and the startup log), [`env`] (`MAILBRIDGE_*` variables), [`secret`]
//! (where secrets come from).

pub mod checks;
pub mod env;
mod notices;
pub mod oauth;
pub mod resolved;
pub mod schema;
pub mod secret;
pub mod throttle;
mod validate;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use oauth::{Endpoints, OAuthSettings, Resource};
pub use resolved::{
    HostPort, Resolved, Server, Sockets, is_exchange_online, is_exchange_online_url,
    parse_host_port,
};
pub use schema::*;

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key (the message names it).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A value is present but unusable.
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

impl Config {
    /// Read, parse, resolve secrets and validate a configuration file, with
    /// the `MAILBRIDGE_*` variables of this process laid over it (see
    /// [`env`]). A missing file is an empty one when such variables are set.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, true)
    }

    /// Like [`Config::load`] without validating (no secret is resolved):
    /// for `sendmail`, which runs as the submitting user and needs only the
    /// listener's address and the spool's path.
    pub fn load_unchecked(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, false)
    }

    fn load_with(path: &Path, validate: bool) -> Result<Config, ConfigError> {
        let vars = env::process_vars();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !env::config_vars(&vars).is_empty() =>
            {
                String::new()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let name = path.display().to_string();
        if validate {
            Config::from_toml_env(&text, &name, &base, &vars)
        } else {
            let mut cfg = Config::parse_env(&text, &name, &vars)?;
            cfg.base_dir = base;
            Ok(cfg)
        }
    }

    /// Parse and validate TOML text; `name` is used in errors, `base` anchors relative paths.
    pub fn from_toml(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_env(text, name, base, &[])
    }

    /// Like [`Config::from_toml`], with the `MAILBRIDGE_*` variables among
    /// `vars` laid over the text. Errors about a value from the environment
    /// name its variable.
    pub fn from_toml_env(
        text: &str,
        name: &str,
        base: &Path,
        vars: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::parse_env(text, name, vars)?;
        cfg.base_dir = base.to_path_buf();
        cfg.validate().map_err(|(key, message)| {
            // A key set from the environment is named with its variable.
            let key = match cfg.from_env.iter().find(|f| f.key == key) {
                Some(f) => format!("{key} ({})", f.var),
                None => key,
            };
            ConfigError::Invalid {
                path: name.to_string(),
                key,
                message,
            }
        })?;
        Ok(cfg)
    }

    /// Parse TOML text with the variables laid over it, without validating.
    fn parse_env(text: &str, name: &str, vars: &[(String, String)]) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: name.to_string(),
            message,
        };
        let file_err = |e: toml::de::Error| parse_err(e.to_string().trim_end().to_string());
        // `raw`: the keys given (file and environment), for the defaults
        // that depend on whether a key was set (checks::apply_implied).
        let (mut cfg, raw): (Config, toml::Table) = if env::config_vars(vars).is_empty() {
            (
                toml::from_str(text).map_err(file_err)?,
                text.parse().unwrap_or_default(),
            )
        } else {
            let file: toml::Table = toml::from_str(text).map_err(file_err)?;
            // Check the file alone first, so its own errors keep their line numbers.
            Config::deserialize(toml::Value::Table(file.clone())).map_err(|e| {
                toml::from_str::<Config>(text)
                    .err()
                    .map(file_err)
                    .unwrap_or_else(|| parse_err(e.to_string()))
            })?;
            let schema = toml::Value::try_from(Config::default())
                .map_err(|e| parse_err(format!("configuration schema: {e}")))?;
            let mut doc = toml::Value::Table(file.clone());
            let set = env::overlay(&mut doc, &schema, vars).map_err(parse_err)?;
            match Config::deserialize(doc.clone()) {
                Ok(mut c) => {
                    c.from_env = set;
                    let toml::Value::Table(raw) = doc else {
                        return Err(parse_err("the configuration is not a table".into()));
                    };
                    (c, raw)
                }
                Err(e) => {
                    // Name the variable: lay them on one at a time.
                    for (var, value) in env::config_vars(vars) {
                        let mut one = toml::Value::Table(file.clone());
                        let pair = [(var.clone(), value.clone())];
                        if env::overlay(&mut one, &schema, &pair).is_ok()
                            && let Err(e) = Config::deserialize(one)
                        {
                            return Err(parse_err(format!("{var}: {}", e.message())));
                        }
                    }
                    return Err(parse_err(format!("from the environment: {}", e.message())));
                }
            }
        };
        checks::apply_implied(&mut cfg, &raw);
        Ok(cfg)
    }

    /// The address `user` may send as under `listen.bind_sender`: its
    /// `mailbox`, else its name if that is an address, else the default
    /// identity's mailbox (`upstream.mailbox`, `reply_to`, `username`).
    pub fn own_mailbox(&self, user: &User) -> Option<String> {
        [
            user.mailbox.as_str(),
            user.name.as_str(),
            self.upstream.effective_mailbox(),
        ]
        .into_iter()
        .find(|a| crate::address::is_valid_mailbox(a))
        .map(str::to_string)
    }

    /// What `check` and `run` verify beyond the file: the spool directory is writable.
    pub fn check_environment(&self) -> Result<(), String> {
        checks::probe_spool(self)
    }

    /// A path from the config, made absolute against the config file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }

    /// Our host name: the configured one, else the system's, else `localhost`.
    pub fn effective_hostname(&self) -> String {
        if !self.hostname.is_empty() {
            return self.hostname.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::from_toml(t, "test.toml", Path::new("."))
    }

    #[test]
    fn empty_file_is_the_runnable_default() {
        let c = parse("").unwrap();
        assert_eq!(c.upstream.protocol, Protocol::File);
        assert_eq!(c.listen.address, "127.0.0.1:2525");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[upstream]\nservre = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("servre"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse("[upstream]\nport = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("[listen]\naddress = \"localhost\"", "listen.address"),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"\"",
                "upstream.server",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a:99999\"",
                "upstream.server",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\nalternate_server = \"b c\"",
                "upstream.alternate_server",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\nrequires_auth = true",
                "upstream.username",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\nrequires_auth = true\nusername = \"u\"",
                "upstream.password",
            ),
            (
                "[upstream]\nreply_to = \"not an address\"",
                "upstream.reply_to",
            ),
            ("[listen]\nmax_recipients = 0", "listen.max_recipients"),
            ("[upstream]\nprotocol = \"pigeon\"", "protocol"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?} gave {e}");
        }
    }

    #[test]
    fn secrets_are_masked_in_output() {
        let c =
            parse("[upstream]\npassword = \"s3cret-pw\"\n[admin]\ntoken = \"adm1n-tok\"").unwrap();
        let out = c.to_masked_toml();
        assert!(
            !out.contains("s3cret-pw") && !out.contains("adm1n-tok"),
            "{out}"
        );
        assert!(out.contains("***"));
        assert!(!format!("{c:?}").contains("s3cret-pw"));
    }

    #[test]
    fn environment_over_the_file_names_the_variable() {
        let env = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let file = "[upstream]\nprotocol = \"smtp\"\nserver = \"file.example\"\nport = 25\n";
        let c = Config::from_toml_env(
            file,
            "f.toml",
            Path::new("."),
            &env(&[
                ("MAILBRIDGE_UPSTREAM__SERVER", "env.example"),
                ("MAILBRIDGE_UPSTREAM__TLS", "false"),
                ("MAILBRIDGE_LOG_FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(c.upstream.server, "env.example");
        assert_eq!(c.upstream.port, 25);
        assert!(!c.upstream.tls);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.from_env.len(), 3);
        for (vars, want) in [
            (
                &[("MAILBRIDGE_UPSTREAM__PROTOCOL", "pigeon")][..],
                "MAILBRIDGE_UPSTREAM__PROTOCOL",
            ),
            (
                &[("MAILBRIDGE_UPSTREAM__SERVER", "a b")][..],
                "upstream.server (MAILBRIDGE_UPSTREAM__SERVER)",
            ),
            (
                &[("MAILBRIDGE_LISTEN__ADRESS", "x")][..],
                "MAILBRIDGE_LISTEN__ADRESS",
            ),
        ] {
            let e = Config::from_toml_env(file, "f.toml", Path::new("."), &env(vars))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{vars:?} gave {e}");
        }
    }
}
