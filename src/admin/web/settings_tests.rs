//! Tests of the settings form: edits keep comments and stored secrets, wrong types and the loader's errors name the field, the atomic write keeps the file's mode.

use super::*;

const FILE: &str = "# The relay's settings.\n[upstream]\n# Where mail goes.\nprotocol = \"smtp\" # primary\nserver = \"old.example:587\"\npassword = \"s3cret\"\n";

fn form(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn edits_keep_comments_and_secrets() {
    let mut doc: DocumentMut = FILE.parse().unwrap();
    apply_form(
        &mut doc,
        &form(&[
            ("upstream.protocol", "smtp"),
            ("upstream.server", "new.example:587"),
            ("upstream.port", "587"),
            ("upstream.tls", "on"),
            ("upstream.password", ""),
            ("upstream.sender_name", "Help Desk"),
            ("upstream.proxy.url", "http://proxy.example:3128"),
        ]),
    )
    .unwrap();
    let text = doc.to_string();
    assert!(text.contains("# The relay's settings.\n"), "{text}");
    assert!(
        text.contains("# Where mail goes.\nprotocol = \"smtp\" # primary\n"),
        "{text}"
    );
    assert!(text.contains("server = \"new.example:587\""), "{text}");
    assert!(text.contains("password = \"s3cret\""), "{text}");
    assert!(text.contains("sender_name = \"Help Desk\""), "{text}");
    assert!(
        text.contains("[upstream.proxy]\nurl = \"http://proxy.example:3128\""),
        "{text}"
    );
    // The port was the default and not in the file: it stays out.
    assert!(!text.contains("port"), "{text}");
}

#[test]
fn wrong_types_name_the_field() {
    let mut doc: DocumentMut = FILE.parse().unwrap();
    let e = apply_form(&mut doc, &form(&[("upstream.port", "five")])).unwrap_err();
    assert_eq!(e.0, "upstream.port");
    let e = apply_form(&mut doc, &form(&[("upstream.protocol", "pigeon")])).unwrap_err();
    assert_eq!(e.0, "upstream.protocol");
}

#[test]
fn the_form_never_carries_a_secret() {
    let doc: DocumentMut = FILE.parse().unwrap();
    let html = form_html(&doc, None, "csrf-token", None);
    assert!(!html.contains("s3cret"));
    assert!(html.contains("stored: leave empty to keep"));
    assert!(html.contains("value=\"old.example:587\""));
}

#[test]
fn validation_is_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let e = validate("[upstream]\nprotocol = \"smtp\"\n", &path).unwrap_err();
    assert!(e.contains("upstream.server"), "{e}");
    validate(
        "[upstream]\nprotocol = \"smtp\"\nserver = \"smtp.example:587\"\n",
        &path,
    )
    .unwrap();
    assert_eq!(
        named_key("config.toml: upstream.oauth.client_id: required"),
        Some("upstream.oauth.client_id".into())
    );
}

#[test]
fn atomic_write_keeps_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "a = 1\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    write_atomic(&path, "a = 2\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "a = 2\n");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
