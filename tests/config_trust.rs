//! Configuration rules for upstream trust and secrets in transit: `tls_fingerprint` format and protocol, plaintext AUTH to a remote server only with `allow_plaintext_auth`, and `http://` token, Graph and EWS URLs only to loopback; `mailbridge check` refuses the same (exit 2, naming the key).

use std::process::Command;

use mailbridge::config::Config;

fn load(text: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    Config::from_toml(text, "t.toml", dir.path()).map_err(|e| e.to_string())
}

const SMTP_AUTH: &str = "[upstream]\nprotocol = \"smtp\"\nrequires_auth = true\nusername = \"u@example.com\"\npassword = \"pw\"\n";

#[test]
fn plaintext_auth_to_a_remote_server_needs_the_opt_in() {
    let e = load(&format!(
        "{SMTP_AUTH}server = \"smtp.example.com\"\ntls = false\n"
    ))
    .unwrap_err();
    assert!(
        e.contains("upstream.tls")
            && e.contains("upstream.allow_plaintext_auth")
            && e.contains("smtp.example.com"),
        "{e}"
    );
    // The alternate server counts too.
    let e = load(&format!("{SMTP_AUTH}server = \"127.0.0.1\"\nalternate_server = \"mx2.example.com:25\"\ntls = false\n")).unwrap_err();
    assert!(
        e.contains("upstream.alternate_server") && e.contains("mx2.example.com"),
        "{e}"
    );
    // And an [upstream.alternate] table names its own keys.
    let e = load(&format!(
        "{SMTP_AUTH}server = \"smtp.example.com\"\n[upstream.alternate]\nprotocol = \"smtp\"\nserver = \"relay.example.net\"\ntls = false\nrequires_auth = true\nusername = \"u\"\npassword = \"p\"\n"
    ))
    .unwrap_err();
    assert!(
        e.contains("upstream.alternate.tls")
            && e.contains("upstream.alternate.allow_plaintext_auth"),
        "{e}"
    );
    // Allowed: opt-in, loopback, TLS, no AUTH, or implicit TLS.
    load(&format!(
        "{SMTP_AUTH}server = \"smtp.example.com\"\ntls = false\nallow_plaintext_auth = true\n"
    ))
    .unwrap();
    load(&format!(
        "{SMTP_AUTH}server = \"localhost:2526\"\ntls = false\n"
    ))
    .unwrap();
    load(&format!(
        "{SMTP_AUTH}server = \"[::1]:2526\"\ntls = false\n"
    ))
    .unwrap();
    load(&format!("{SMTP_AUTH}server = \"smtp.example.com\"\n")).unwrap();
    load("[upstream]\nprotocol = \"smtp\"\nserver = \"smtp.example.com\"\ntls = false\n").unwrap();
    load(&format!(
        "{}server = \"smtp.example.com:465\"\ntls = false\n",
        SMTP_AUTH.replace("\"smtp\"", "\"smtps\"")
    ))
    .unwrap();
}

#[test]
fn tls_fingerprint_format_and_scope() {
    let hex = "0123456789abcdef".repeat(4);
    load(&format!(
        "{SMTP_AUTH}server = \"smtp.example.com\"\ntls_fingerprint = \"sha256:{hex}\"\n"
    ))
    .unwrap();
    for bad in ["0123", "sha1:abcd", "sha256:xyz"] {
        let e = load(&format!(
            "{SMTP_AUTH}server = \"smtp.example.com\"\ntls_fingerprint = \"{bad}\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("upstream.tls_fingerprint") && e.contains("sha256:"),
            "{e}"
        );
    }
    let e = load(&format!(
        "[upstream]\nprotocol = \"ews\"\nconnect_url = \"https://mail.example.com/EWS/Exchange.asmx\"\nrequires_auth = true\nusername = \"u\"\npassword = \"p\"\ntls_fingerprint = \"sha256:{hex}\"\n"
    ))
    .unwrap_err();
    assert!(
        e.contains("upstream.tls_fingerprint") && e.contains("smtp"),
        "{e}"
    );
}

#[test]
fn http_urls_only_to_loopback() {
    let ews = |url: &str| {
        load(&format!(
            "[upstream]\nprotocol = \"ews\"\nconnect_url = \"{url}\"\nrequires_auth = true\nusername = \"u\"\npassword = \"p\"\n"
        ))
    };
    let e = ews("http://mail.example.com/EWS/Exchange.asmx").unwrap_err();
    assert!(
        e.contains("upstream.connect_url") && e.contains("https://"),
        "{e}"
    );
    ews("http://127.0.0.1:8080/EWS/Exchange.asmx").unwrap();
    ews("https://mail.example.com/EWS/Exchange.asmx").unwrap();
    let graph = |url: &str| {
        load(&format!(
            "[upstream]\nprotocol = \"graph\"\ngraph_endpoint = \"{url}\"\nrequires_auth = true\nauth = \"oauth\"\nmailbox = \"a@example.com\"\n[upstream.oauth]\nflow = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\ntenant = \"t\"\n"
        ))
    };
    let e = graph("http://graph.example.com").unwrap_err();
    assert!(e.contains("upstream.graph_endpoint"), "{e}");
    graph("http://localhost:9000").unwrap();
    let token = |url: &str| {
        load(&format!(
            "[upstream]\nprotocol = \"graph\"\nrequires_auth = true\nauth = \"oauth\"\nmailbox = \"a@example.com\"\n[upstream.oauth]\nprovider = \"custom\"\nscope = \"x\"\nflow = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\ntoken_url = \"{url}\"\n"
        ))
    };
    let e = token("http://login.example.com/token").unwrap_err();
    assert!(
        e.contains("upstream.oauth.token_url") && e.contains("not loopback"),
        "{e}"
    );
    token("http://127.0.0.1:1/token").unwrap();
    token("https://login.example.com/token").unwrap();
}

#[test]
fn check_refuses_what_run_would() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!("{SMTP_AUTH}server = \"smtp.example.com\"\ntls = false\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailbridge"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("allow_plaintext_auth"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_mailbridge"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("allow_plaintext_auth"));
}
