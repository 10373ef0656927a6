//! Tests of the spool: store, reload, remove, corrupt entries, group-committed directory syncs, the lock, and files never written through a symlink.

use super::*;

fn meta(id: &str, body: &[u8]) -> Meta {
    Meta::new(
        id.into(),
        "s@example.com".into(),
        vec!["r@example.com".into()],
        body.len() as u64,
        1000,
    )
}

#[test]
fn store_reload_remove() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert!(loaded.is_empty() && bad.is_empty());
    let body = b"Subject: x\r\n\r\nhi\r\n";
    s.store(&meta("a1", body), body).unwrap();
    assert_eq!(s.len(), 1);
    drop(s);
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert_eq!(loaded.len(), 1);
    assert!(bad.is_empty());
    assert_eq!(s.read_body("a1").unwrap(), body);
    s.remove("a1").unwrap();
    assert_eq!(s.len(), 0);
    assert!(
        fs::read_dir(dir.path().join("queue"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn full_queue_refuses_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 1).unwrap();
    s.store(&meta("a1", b"x"), b"x").unwrap();
    assert!(matches!(
        s.store(&meta("a2", b"y"), b"y"),
        Err(SpoolError::Full(_))
    ));
    assert_eq!(Spool::list(dir.path()).unwrap().len(), 1);
}

#[test]
fn bad_entries_are_moved_aside_and_good_ones_load() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    s.store(&meta("good", b"hello"), b"hello").unwrap();
    s.store(&meta("short", b"hello"), b"hello").unwrap();
    drop(s);
    let q = dir.path().join("queue");
    fs::write(q.join("short.eml"), b"hel").unwrap(); // truncated body
    fs::write(q.join("garbage.json"), b"{not json").unwrap();
    fs::write(q.join("empty.json"), b"").unwrap();
    fs::write(q.join("empty.eml"), b"").unwrap();
    fs::write(q.join("orphan.eml"), b"x").unwrap();
    fs::write(q.join("weird.txt"), b"x").unwrap();
    fs::write(dir.path().join("tmp").join("half.eml"), b"x").unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert_eq!(
        loaded.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["good"]
    );
    assert_eq!(bad.len(), 5, "{bad:?}");
    assert_eq!(s.len(), 1);
    let left: Vec<_> = fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    // A second start finds nothing more to move.
    drop(s);
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert_eq!((loaded.len(), bad.len()), (1, 0));
}

#[test]
fn corrupt_entries_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    assert_eq!(s.corrupt_summary(), CorruptSummary::default());
    drop(s);
    fs::write(dir.path().join("queue").join("garbage.json"), b"{").unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let (_, bad) = s.load_all();
    assert_eq!(bad.len(), 1);
    let c = s.corrupt_summary();
    assert_eq!(c.count, 1);
    assert_eq!(c.newest.map(|(n, _)| n).as_deref(), Some("garbage.json"));
}

#[test]
fn update_is_visible_after_reload() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let mut m = meta("u1", b"x");
    s.store(&m, b"x").unwrap();
    m.attempts = 3;
    m.last_error = Some("451 try later".into());
    s.update(&m).unwrap();
    drop(s);
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, _) = s.load_all();
    assert_eq!(loaded[0].attempts, 3);
}

#[test]
fn concurrent_stores_share_directory_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 1000).unwrap();
    let s = std::sync::Arc::new(s);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    let id = format!("t{t}m{i}");
                    s.store(&meta(&id, b"x"), b"x").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = s.queue_sync.state.lock();
    assert_eq!(st.issued, 160);
    assert_eq!(
        st.synced, 160,
        "every store was covered by a completed sync"
    );
    assert!(!st.running);
    drop(st);
    drop(s);
    let s = Spool::open(dir.path(), 1000).unwrap();
    let (loaded, _) = s.load_all();
    assert_eq!(loaded.len(), 160);
}

#[test]
fn one_holder_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    s.store(&meta("held", b"x"), b"x").unwrap();
    // A second open (a second daemon, an offline CLI edit) is refused
    // and touches nothing: tmp/ is not emptied.
    fs::write(dir.path().join("tmp").join("in-progress.eml"), b"x").unwrap();
    let e = Spool::open(dir.path(), 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(
        e.to_string()
            .contains("in use by another mailbridge process"),
        "{e}"
    );
    assert!(dir.path().join("tmp").join("in-progress.eml").exists());
    assert!(
        matches!(lock(dir.path(), Duration::ZERO), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    );
    drop(s);
    // Released with the spool: a short-lived writer gets it, then a daemon.
    let l = lock(dir.path(), Duration::ZERO).unwrap();
    drop(l);
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, _) = s.load_all();
    assert_eq!(loaded.len(), 1);
}

#[test]
fn files_are_created_new_and_never_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"keep").unwrap();
    // A symlink planted where the next temp file goes.
    std::os::unix::fs::symlink(&victim, dir.path().join("tmp").join("evil.eml")).unwrap();
    assert!(s.store(&meta("evil", b"payload"), b"payload").is_err());
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    assert!(write_synced(&dir.path().join("victim"), b"x").is_err());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let e = write_synced(&link, b"x").unwrap_err();
    assert!(
        e.kind() == io::ErrorKind::AlreadyExists || e.raw_os_error() == Some(libc::ELOOP),
        "{e}"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
}

#[test]
fn ids_are_unique_and_safe() {
    let a = new_id();
    let b = new_id();
    assert_ne!(a, b);
    assert!(is_valid_id(&a) && a.len() == 19);
    assert!(!is_valid_id("../x") && !is_valid_id(""));
}

fn ids(metas: &[Meta]) -> Vec<&str> {
    metas.iter().map(|m| m.id.as_str()).collect()
}

#[test]
fn open_counts_the_queue_and_the_backlog_loads_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    for id in ["b1", "b2", "b3", "b4"] {
        s.store(&meta(id, b"x"), b"x").unwrap();
    }
    drop(s);
    fs::write(dir.path().join("queue").join("b3.json"), b"{").unwrap();
    fs::write(dir.path().join("queue").join("orphan.eml"), b"x").unwrap();
    let s = Spool::open(dir.path(), 5).unwrap();
    assert_eq!(
        s.len(),
        4,
        "counted from the listing, before anything is read"
    );
    let mut backlog = s.take_backlog();
    assert_eq!(backlog.len(), 4);
    assert!(s.take_backlog().is_empty(), "taken once");
    // New mail while loading: counted with the entries not read yet, and
    // never in the backlog.
    s.store(&meta("new", b"y"), b"y").unwrap();
    assert_eq!(s.len(), 5);
    assert!(matches!(
        s.store(&meta("over", b"y"), b"y"),
        Err(SpoolError::Full(_))
    ));
    // Removed before it was read: skipped, counted once.
    s.remove("b2").unwrap();
    assert_eq!(s.len(), 4);
    let (first, bad) = s.load_batch(&mut backlog, 1);
    assert_eq!(ids(&first), ["b1"], "oldest first");
    assert_eq!(bad.len(), 1, "the stray body goes first: {bad:?}");
    assert_eq!(bad[0].name, "orphan.eml");
    let (rest, bad) = s.load_batch(&mut backlog, 10);
    assert_eq!(ids(&rest), ["b4"]);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].name, "b3.json");
    assert!(backlog.is_empty());
    assert_eq!(s.len(), 3, "b1, b4 and the new one");
    assert!(dir.path().join("corrupt").join("b3.eml").exists());
    let (more, bad) = s.load_batch(&mut backlog, 10);
    assert!(more.is_empty() && bad.is_empty());
}

#[test]
fn a_backlog_splits_off_its_oldest_entries_with_the_strays() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    for id in ["c1", "c2", "c3"] {
        s.store(&meta(id, b"x"), b"x").unwrap();
    }
    drop(s);
    fs::write(dir.path().join("queue").join("stray.txt"), b"x").unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let mut rest = s.take_backlog();
    let mut first = rest.split_off(2);
    assert_eq!((first.len(), rest.len()), (2, 1));
    let (metas, bad) = s.load_batch(&mut rest, usize::MAX);
    assert_eq!((ids(&metas), bad.len()), (vec!["c3"], 0));
    let (metas, bad) = s.load_batch(&mut first, usize::MAX);
    assert_eq!(ids(&metas), ["c1", "c2"]);
    assert_eq!(bad.len(), 1, "the strays go with the first part");
    assert!(first.is_empty() && rest.is_empty());
}
