//! Files and directories mailbridge creates are private whatever the umask: the spool and token directories 0700, spool files, the token store and `admin.token` 0600. One test in its own process, because it sets the umask to 0.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use mailbridge::config::Config;
use mailbridge::oauth::store::{StoredGrant, TokenStore};
use mailbridge::spool::{Meta, Spool};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn private_modes_under_umask_0() {
    // SAFETY: umask only changes the process's file mode creation mask;
    // this binary runs only this test.
    unsafe { libc::umask(0) };
    let dir = tempfile::tempdir().unwrap();
    // A canary: what the umask gives a plain create_dir_all.
    std::fs::create_dir_all(dir.path().join("canary")).unwrap();
    assert_eq!(mode(&dir.path().join("canary")), 0o777, "umask 0 in effect");

    let root = dir.path().join("a/b/spool");
    let spool = Spool::open(&root, 10).unwrap();
    for d in [
        "a",
        "a/b",
        "a/b/spool",
        "a/b/spool/queue",
        "a/b/spool/tmp",
        "a/b/spool/corrupt",
    ] {
        assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
    }
    let body = b"Subject: s\r\n\r\nx\r\n";
    let mut m = Meta::new(
        "m1".into(),
        "a@b.test".into(),
        vec!["c@d.test".into()],
        body.len() as u64,
        1,
    );
    spool.store(&m, body).unwrap();
    m.attempts = 1;
    spool.update(&m).unwrap();
    for f in ["queue/m1.msg", "queue/m1.json", "lock"] {
        assert_eq!(mode(&root.join(f)), 0o600, "{f}");
    }
    drop(spool);

    // The token store, in a directory of its own.
    let tokens = dir.path().join("state/oauth/tokens.json");
    let store = TokenStore::new(tokens.clone());
    store
        .put(
            "a@contoso.com",
            StoredGrant {
                refresh_token: mailbridge::common::Secret::new("rt-secret"),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&dir.path().join("state/oauth")), 0o700);
    assert_eq!(mode(&tokens), 0o600);

    // admin.token, created before the spool exists.
    let cfg = Config::from_toml(
        "[spool]\npath = \"fresh-spool\"\n[upstream]\nprotocol = \"file\"\noutbox = \"out\"\n",
        "t",
        dir.path(),
    )
    .unwrap();
    mailbridge::admin_token(&cfg, true).unwrap();
    assert_eq!(mode(&dir.path().join("fresh-spool")), 0o700);
    assert_eq!(mode(&dir.path().join("fresh-spool/admin.token")), 0o600);
}
