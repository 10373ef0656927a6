//! `check` refuses every configuration `run` refuses, naming the key: each file in `tests/config/refused/` (its first line says `# key: <key>`) is run through both commands of the real binary.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailbridge")
}

/// Run `mailbridge --config cfg <cmd>` for at most 20 s; exit code and stderr.
fn run(cfg: &Path, cmd: &str) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(cfg)
        .arg(cmd)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            return (None, "still running after 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn check_refuses_what_run_refuses() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/refused");
    let mut seen = 0;
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let src = e.unwrap().path();
        if src.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&src).unwrap();
        let key = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# key: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# key: …`", src.display()))
            .trim()
            .to_string();
        // A private copy, so nothing is created in the source tree.
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixtures.join("not-pem.txt"), dir.path().join("not-pem.txt")).unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, &text).unwrap();
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        let (code, err) = run(&cfg, "check");
        assert_eq!(code, Some(2), "{name}: check: {err}");
        assert!(
            err.contains(&format!("{key}:")),
            "{name}: check does not name {key}: {err}"
        );
        let (code, err) = run(&cfg, "run");
        // 2 for a file `load` refuses, 1 for what only starting finds out.
        assert!(matches!(code, Some(1 | 2)), "{name}: run: {code:?} {err}");
        assert!(
            err.contains(&format!("{key}:")),
            "{name}: run does not name {key}: {err}"
        );
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} fixtures");
}
