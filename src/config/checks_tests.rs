//! Configuration fixtures for the rules `check` and `run` share.

use super::*;
use crate::config::{Config, DsnTo};

fn parse_in(dir: &Path, t: &str) -> Result<Config, String> {
    Config::from_toml(t, "test.toml", dir).map_err(|e| e.to_string())
}

fn parse(t: &str) -> Result<Config, String> {
    parse_in(Path::new("."), t)
}

/// `text` is refused and the error names `key`.
fn refused(text: &str, key: &str) {
    match parse(text) {
        Ok(_) => panic!("accepted: {text:?}"),
        Err(e) => assert!(e.contains(&format!(": {key}: ")), "{text:?} gave {e}"),
    }
}

const USER: &str = "[[users]]\nname = \"app\"\npassword_hash = \"$argon2id$v=19$m=8,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$AAAAAAAAAAAAAAAAAAAAAA\"\nmailbox = \"app@example.com\"\n";

#[test]
fn log_level_must_be_a_level_or_directives() {
    for ok in [
        "info",
        "DEBUG",
        "warn,mailbridge=debug",
        "mailbridge::inbound=trace",
        "off",
    ] {
        parse(&format!("log_level = \"{ok}\"")).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["verbose", "", "info,loud", "mailbridge=verbose"] {
        refused(&format!("log_level = \"{bad}\""), "log_level");
    }
}

#[test]
fn durations_are_bounded() {
    refused(
        "[listen]\nidle_timeout_secs = 9223372036854775807",
        "listen.idle_timeout_secs",
    );
    refused(
        "[listen]\ndata_timeout_secs = 0",
        "listen.data_timeout_secs",
    );
    refused(
        "[delivery]\nretry_max_secs = 99999999999",
        "delivery.retry_max_secs",
    );
    refused(
        "[delivery]\ngive_up_after_secs = 9223372036854775807",
        "delivery.give_up_after_secs",
    );
    refused("[upstream]\ntimeout_secs = 100000", "upstream.timeout_secs");
    refused(
        "[upstream]\nfailback_probe_secs = 9223372036854775807",
        "upstream.failback_probe_secs",
    );
    refused(
        "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\n[upstream.alternate]\nprotocol = \"smtp\"\nserver = \"b\"\ntimeout_secs = 9223372036854775807",
        "upstream.alternate.timeout_secs",
    );
    parse("[delivery]\ngive_up_after_secs = 2592000\nretry_max_secs = 604800").unwrap();
}

#[test]
fn tls_ca_file_must_hold_pem_certificates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIB==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let good = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/client-cert.pem"
    ))
    .unwrap();
    std::fs::write(dir.path().join("ca.pem"), good).unwrap();
    std::fs::create_dir(dir.path().join("adir")).unwrap();
    // PEM framing around bytes that are no certificate.
    std::fs::write(
        dir.path().join("bad-der.pem"),
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let base = "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\n";
    for f in ["junk.pem", "key.pem", "missing.pem", "adir", "bad-der.pem"] {
        let e = parse_in(dir.path(), &format!("{base}tls_ca_file = \"{f}\"")).unwrap_err();
        assert!(e.contains(": upstream.tls_ca_file: "), "{f}: {e}");
    }
    parse_in(dir.path(), &format!("{base}tls_ca_file = \"ca.pem\"")).unwrap();
    assert_eq!(count_pem_certificates(&dir.path().join("ca.pem")), Ok(1));
    let e = parse_in(
        dir.path(),
        &format!("{base}[upstream.alternate]\nprotocol = \"smtp\"\nserver = \"b\"\ntls_ca_file = \"junk.pem\""),
    )
    .unwrap_err();
    assert!(e.contains(": upstream.alternate.tls_ca_file: "), "{e}");
}

#[test]
fn open_relay_is_refused_by_validation() {
    refused(
        "[listen]\naddress = \"0.0.0.0:2525\"\nallow_clients = [\"0.0.0.0/0\"]",
        "listen.address",
    );
    refused(
        "[listen]\naddress = \"[::]:2525\"\nallow_clients = [\"::/0\"]",
        "listen.address",
    );
    // A real allow-list, or required AUTH with users, is fine.
    parse("[listen]\naddress = \"0.0.0.0:2525\"\nallow_clients = [\"10.0.0.0/8\"]").unwrap();
    parse(&format!(
        "[listen]\naddress = \"0.0.0.0:2525\"\nallow_clients = [\"0.0.0.0/0\"]\n{USER}"
    ))
    .unwrap();
    // Explicitly not requiring AUTH brings the open relay back: refused.
    refused(
        &format!(
            "[listen]\naddress = \"0.0.0.0:2525\"\nallow_clients = [\"0.0.0.0/0\"]\nrequire_auth = false\n{USER}"
        ),
        "listen.address",
    );
}

#[test]
fn users_imply_require_auth_unless_set() {
    let c = parse(USER).unwrap();
    assert!(c.listen.require_auth);
    assert!(c.notices().iter().all(|n| !n.contains("require_auth")));
    let c = parse(&format!("[listen]\nrequire_auth = false\n{USER}")).unwrap();
    assert!(!c.listen.require_auth);
    assert!(
        c.notices()
            .iter()
            .any(|n| n.starts_with("listen.require_auth = false")),
        "{:?}",
        c.notices()
    );
    assert!(!parse("").unwrap().listen.require_auth);
}

#[test]
fn bind_sender_needs_users_with_addresses() {
    refused("[listen]\nbind_sender = true", "listen.bind_sender");
    let nameless = "[[users]]\nname = \"printer\"\npassword_hash = \"$argon2id$v=19$m=8,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$AAAAAAAAAAAAAAAAAAAAAA\"\n";
    refused(
        &format!("[listen]\nbind_sender = true\n{nameless}"),
        "users[0].mailbox",
    );
    // The default identity's mailbox stands in.
    let c = parse(&format!(
        "[listen]\nbind_sender = true\n[upstream]\nmailbox = \"relay@example.com\"\n{nameless}"
    ))
    .unwrap();
    assert_eq!(
        c.own_mailbox(&c.users[0]).as_deref(),
        Some("relay@example.com")
    );
    let c = parse(&format!("[listen]\nbind_sender = true\n{USER}")).unwrap();
    assert_eq!(
        c.own_mailbox(&c.users[0]).as_deref(),
        Some("app@example.com")
    );
}

#[test]
fn oauth_without_requires_auth_is_refused() {
    refused(
        "[upstream]\nprotocol = \"smtp\"\nserver = \"smtp.office365.com\"\nauth = \"oauth\"\n[upstream.oauth]\nclient_id = \"x\"",
        "upstream.requires_auth",
    );
}

#[test]
fn smtps_without_port_is_465() {
    let c = parse("[upstream]\nprotocol = \"smtps\"\nserver = \"a\"").unwrap();
    assert_eq!(c.upstream.port, 465);
    let c = parse("[upstream]\nprotocol = \"smtps\"\nserver = \"a\"\nport = 2465").unwrap();
    assert_eq!(c.upstream.port, 2465);
    let c = parse("[upstream]\nprotocol = \"smtp\"\nserver = \"a\"").unwrap();
    assert_eq!(c.upstream.port, 587);
    let c = parse(
        "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\n[upstream.alternate]\nprotocol = \"smtps\"\nserver = \"b\"",
    )
    .unwrap();
    assert_eq!(c.upstream.alternate.unwrap().port, 465);
}

const OAUTH: &str = "[upstream]\nprotocol = \"smtp\"\nserver = \"smtp.office365.com\"\nrequires_auth = true\nauth = \"oauth\"\nmailbox = \"relay@contoso.com\"\n[upstream.oauth]\nclient_id = \"x\"\n";

#[test]
fn redirect_url_must_reach_the_admin_endpoint() {
    // The default redirect with the default admin address is fine.
    parse(OAUTH).unwrap();
    refused(
        &format!("[admin]\naddress = \"127.0.0.1:9025\"\n{OAUTH}"),
        "upstream.oauth.redirect_url",
    );
    refused(
        &format!("{OAUTH}redirect_url = \"http://localhost:8025/callback\""),
        "upstream.oauth.redirect_url",
    );
    parse(&format!(
        "[admin]\naddress = \"127.0.0.1:9025\"\n{OAUTH}redirect_url = \"http://127.0.0.1:9025/oauth/callback\""
    ))
    .unwrap();
    // Port 0 (tests), a disabled endpoint, or a public name behind a proxy: not checked.
    parse(&format!("[admin]\naddress = \"127.0.0.1:0\"\n{OAUTH}")).unwrap();
    parse(&format!("[admin]\naddress = \"\"\n{OAUTH}")).unwrap();
    parse(&format!(
        "[admin]\naddress = \"127.0.0.1:9025\"\n{OAUTH}redirect_url = \"https://relay.contoso.com/oauth/callback\""
    ))
    .unwrap();
    // The device flow never uses the redirect.
    parse(&format!(
        "[admin]\naddress = \"127.0.0.1:9025\"\n{OAUTH}flow = \"device_code\""
    ))
    .unwrap();
}

#[test]
fn remote_admin_needs_allow_remote() {
    let e = parse("[admin]\naddress = \"0.0.0.0:8025\"").unwrap_err();
    assert!(
        e.contains(": admin.address: ") && e.contains("admin.allow_remote"),
        "{e}"
    );
    let c = parse("[admin]\naddress = \"0.0.0.0:8025\"\nallow_remote = true").unwrap();
    assert!(
        c.notices()
            .iter()
            .any(|n| n.starts_with("admin.address: 0.0.0.0:8025 is reachable")),
        "{:?}",
        c.notices()
    );
    assert!(parse("").unwrap().notices().is_empty());
    refused("[admin]\nhostnames = [\"a b\"]", "admin.hostnames[0]");
    parse("[admin]\nhostnames = [\"relay.contoso.com\"]").unwrap();
}

#[test]
fn dsn_to_values() {
    assert_eq!(parse("").unwrap().delivery.dsn_to, DsnTo::AllowedDomains);
    assert_eq!(
        parse("[delivery]\ndsn_to = \"local\"")
            .unwrap()
            .delivery
            .dsn_to,
        DsnTo::Local
    );
    assert_eq!(
        parse("[delivery]\ndsn_to = \"any\"")
            .unwrap()
            .delivery
            .dsn_to,
        DsnTo::Any
    );
    let e = parse("[delivery]\ndsn_to = \"everyone\"").unwrap_err();
    assert!(e.contains("dsn_to"), "{e}");
}

#[test]
fn loopback_hosts() {
    for h in [
        "localhost",
        "LOCALHOST.",
        "a.localhost",
        "127.0.0.1",
        "127.8.9.1",
        "[::1]",
        "::1",
    ] {
        assert!(is_loopback_host(h), "{h}");
    }
    for h in [
        "evil.example",
        "10.0.0.1",
        "localhost.evil.example",
        "[::2]",
        "",
    ] {
        assert!(!is_loopback_host(h), "{h}");
    }
}

#[test]
fn spool_probe_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let c = parse_in(dir.path(), "[spool]\npath = \"not/yet/there\"").unwrap();
    probe_spool(&c).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let c = parse_in(dir.path(), "[spool]\npath = \"file/spool\"").unwrap();
    let e = probe_spool(&c).unwrap_err();
    assert!(e.starts_with("spool.path: "), "{e}");
    // /proc refuses new files even to root.
    let c = parse_in(dir.path(), "[spool]\npath = \"/proc/mailbridge-spool\"").unwrap();
    let e = probe_spool(&c).unwrap_err();
    assert!(e.starts_with("spool.path: cannot create files"), "{e}");
}
