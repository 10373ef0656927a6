//! The module layers (docs/architecture.md) hold: no file under `src/` refers (`use crate::…` or a `crate::x::` path) to a module of a higher layer, except the known exceptions listed here, each of which must still exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, bottom to top. A file may refer to its own layer and the
/// layers below it. Each entry: the layer's name and the modules in it (a
/// top-level module of `src/`; `scheduler::governor` is a sub-module that
/// belongs to the transport layer wherever it lives).
const LAYERS: &[(&str, &[&str])] = &[
    // Types and leaf helpers that use no other mailbridge module.
    (
        "common",
        &["common", "address", "text", "outcome", "tls", "listener"],
    ),
    ("config", &["config"]),
    ("spool, message", &["spool", "message", "http"]),
    ("oauth", &["oauth"]),
    // The governor throttles transports; it moves from src/scheduler/ to
    // src/transport/, and either path is the transport layer.
    ("transport", &["transport", "scheduler::governor"]),
    ("routing", &["routing"]),
    ("scheduler", &["scheduler"]),
    (
        "inbound, admin, maildrop, metrics, reload",
        &["inbound", "admin", "maildrop", "metrics", "reload"],
    ),
    ("cli", &["cli"]),
    // The crate root (`run`, `admin_token`, `Listeners`) and the binary.
    ("lib", &["lib", "main"]),
];

/// References that break the order today, outside this layering's own
/// files: (file, referenced module, why). Each must still occur (a fixed
/// one is removed from this list).
const KNOWN_EXCEPTIONS: &[(&str, &str, &str)] = &[
    (
        "src/scheduler/sink.rs",
        "inbound",
        "the scheduler implements inbound's Sink/Incoming; the sink trait belongs below both",
    ),
    (
        "src/scheduler/dsn_policy.rs",
        "inbound",
        "the DSN policy reuses inbound::access::domain_allowed",
    ),
    (
        "src/cli/mod.rs",
        "lib",
        "`mailbridge run` calls lib::run with lib::Listeners; `queue` reads lib::admin_token",
    ),
    (
        "src/cli/auth.rs",
        "lib",
        "the auth commands read lib::admin_token to call the admin endpoint",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules of the crate: `src/x.rs` and `src/x/`.
fn top_modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_string();
            (p.is_dir() || p.extension().is_some_and(|x| x == "rs")).then_some(name)
        })
        .collect()
}

/// The layer index of a module path (`["scheduler", "governor"]`).
fn layer_of(path: &[&str]) -> usize {
    let two = path.iter().take(2).copied().collect::<Vec<_>>().join("::");
    for (i, (_, mods)) in LAYERS.iter().enumerate() {
        if mods.contains(&two.as_str()) {
            return i;
        }
    }
    for (i, (_, mods)) in LAYERS.iter().enumerate() {
        if mods.contains(&path[0]) {
            return i;
        }
    }
    panic!(
        "module `{}` is in no layer: add it to LAYERS in tests/layers.rs",
        path[0]
    );
}

/// The module path of a file: `src/scheduler/governor.rs` → scheduler, governor.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .components()
        .skip(1)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.last_mut()
        && let Some(stem) = last.strip_suffix(".rs")
    {
        *last = stem.to_string();
    }
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths after each `crate::` in `code`, as their first two segments;
/// `crate::{a::b, c}` gives `a::b` and `c`.
fn crate_refs(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| is_ident(c) && c != '$') {
            continue; // e.g. `mycrate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(group.len());
            let mut item = String::new();
            let mut d = 0;
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => d += 1,
                    '}' => d -= 1,
                    ',' if d == 0 => {
                        out.push(segments(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            continue;
        }
        out.push(segments(rest));
    }
    out.retain(|p| !p.is_empty() && !p[0].is_empty());
    out
}

/// The first two `::`-separated identifiers at the start of `s`.
fn segments(s: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut rest = s;
    for _ in 0..2 {
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        v.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(r) if r.starts_with(is_ident) => rest = r,
            _ => break,
        }
    }
    v
}

/// The source without comment lines (doc links are not imports).
fn code_of(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every (file, referenced top module, file layer, referenced layer) that
/// goes upwards.
fn upward_refs(root: &Path) -> Vec<(String, String, usize, usize)> {
    let src = root.join("src");
    let tops = top_modules(&src);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_path_buf();
        let module = module_of(&rel);
        let own: Vec<&str> = module.iter().map(String::as_str).collect();
        let own_layer = layer_of(&own);
        let text = std::fs::read_to_string(&f).unwrap();
        let mut seen = BTreeSet::new();
        for r in crate_refs(&code_of(&text)) {
            // An item of the crate root (`crate::run`) is the lib layer.
            let path: Vec<&str> = if tops.contains(&r[0]) {
                r.iter().map(String::as_str).collect()
            } else {
                vec!["lib"]
            };
            let layer = layer_of(&path);
            if layer > own_layer && seen.insert(path[0].to_string()) {
                out.push((
                    rel.display().to_string(),
                    path[0].to_string(),
                    own_layer,
                    layer,
                ));
            }
        }
    }
    out
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = upward_refs(root);
    let mut errors = Vec::new();
    for (file, to, from_layer, to_layer) in &found {
        if KNOWN_EXCEPTIONS
            .iter()
            .any(|(f, m, _)| f == file && m == to)
        {
            continue;
        }
        errors.push(format!(
            "{file} (layer {}) refers to crate::{to} (layer {})",
            LAYERS[*from_layer].0, LAYERS[*to_layer].0
        ));
    }
    for (f, m, why) in KNOWN_EXCEPTIONS {
        if !found.iter().any(|(file, to, _, _)| file == f && to == m) {
            errors.push(format!(
                "known exception {f} -> {m} ({why}) no longer occurs: remove it from tests/layers.rs"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "layer order broken:\n{}",
        errors.join("\n")
    );
}

#[test]
fn every_top_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for m in top_modules(&src) {
        layer_of(&[m.as_str()]);
    }
}

#[test]
fn references_are_read_from_use_groups_and_paths() {
    let code = "use crate::{config::{Config, Flow}, oauth::Registries};\nlet x = crate::scheduler::governor::Limits::none();\nuse crate::run;\nlet y = $crate::text::clean(z);";
    let refs: Vec<String> = crate_refs(code).iter().map(|r| r.join("::")).collect();
    assert_eq!(
        refs,
        [
            "config",
            "oauth::Registries",
            "scheduler::governor",
            "run",
            "text::clean"
        ]
    );
    assert_eq!(
        layer_of(&["scheduler", "governor"]),
        layer_of(&["transport"])
    );
    assert!(layer_of(&["scheduler", "mod"]) > layer_of(&["routing"]));
    assert_eq!(
        module_of(Path::new("src/scheduler/governor.rs")),
        ["scheduler", "governor"]
    );
    assert_eq!(module_of(Path::new("src/config/mod.rs")), ["config"]);
    assert_eq!(module_of(Path::new("src/lib.rs")), ["lib"]);
    assert!(
        code_of("/// [`crate::cli`]\nuse x;")
            .find("crate::")
            .is_none()
    );
}
