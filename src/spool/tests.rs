//! Tests of the spool: store, reload, remove, one file per message with its metadata beside it once updated, entries of the earlier two-file layout, corrupt and torn entries, group-committed directory syncs, the lock, and files never written through a symlink.

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
    // A torn write: the file shorter than its metadata line says.
    let short = fs::read(q.join("short.msg")).unwrap();
    fs::write(q.join("short.msg"), &short[..short.len() - 2]).unwrap();
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
    assert!(
        bad.iter()
            .any(|c| c.name == "short.msg" && c.reason.contains("torn write")),
        "{bad:?}"
    );
    assert_eq!(s.len(), 1);
    let left: Vec<_> = fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["good.msg"]);
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
    std::os::unix::fs::symlink(&victim, dir.path().join("tmp").join("evil.msg")).unwrap();
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

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

#[test]
fn a_small_message_is_one_readable_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let body = b"Subject: x\r\n\r\nhi\r\n";
    s.store(&meta("one", body), body).unwrap();
    let q = dir.path().join("queue");
    assert_eq!(names(&q), ["one.msg"]);
    let file = fs::read(q.join("one.msg")).unwrap();
    let nl = file.iter().position(|&b| b == b'\n').unwrap();
    let line: Meta = serde_json::from_slice(&file[..nl]).unwrap();
    assert_eq!((line.id.as_str(), line.size), ("one", body.len() as u64));
    assert_eq!(
        &file[nl + 1..],
        body,
        "the message follows the metadata line"
    );
    assert_eq!(s.read_body("one").unwrap(), body);
    let (f, start) = s.open_body("one").unwrap();
    assert_eq!(
        start,
        nl as u64 + 1,
        "the message starts past the metadata line"
    );
    assert_eq!(read_from(&f, start).unwrap(), body);
    assert_eq!(s.read_meta("one").unwrap().size, body.len() as u64);
    let (m, msg) = read_entry(dir.path(), "one").unwrap();
    assert_eq!((m.id.as_str(), msg.as_slice()), ("one", &body[..]));
    s.remove("one").unwrap();
    assert!(names(&q).is_empty());
    assert_eq!(s.len(), 0);
}

#[test]
fn an_update_goes_beside_the_file_and_overrides_its_first_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let mut m = meta("u2", b"x");
    s.store(&m, b"x").unwrap();
    m.attempts = 2;
    s.update(&m).unwrap();
    let q = dir.path().join("queue");
    assert_eq!(names(&q), ["u2.json", "u2.msg"]);
    assert_eq!(s.read_meta("u2").unwrap().attempts, 2);
    assert_eq!(Spool::list(dir.path()).unwrap()[0].attempts, 2);
    assert_eq!(s.read_body("u2").unwrap(), b"x");
    drop(s);
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert_eq!((loaded.len(), loaded[0].attempts, bad.len()), (1, 2, 0));
    s.remove("u2").unwrap();
    assert!(names(&q).is_empty());
    assert_eq!(s.len(), 0);
}

#[test]
fn a_message_written_as_it_arrived_gets_its_metadata_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let mut draft = s.draft("big");
    draft.write(b"Subject: big\r\n\r\n").unwrap();
    draft.write(b"part one\r\n").unwrap();
    assert_eq!(draft.len(), 26);
    let mut m = meta("big", b"");
    s.commit(draft, &mut m, b"tail\r\n").unwrap();
    assert_eq!(m.size, 32);
    let q = dir.path().join("queue");
    assert_eq!(names(&q), ["big.json", "big.msg"]);
    assert!(names(&dir.path().join("tmp")).is_empty());
    let want = b"Subject: big\r\n\r\npart one\r\ntail\r\n";
    assert_eq!(
        fs::read(q.join("big.msg")).unwrap(),
        [&b"\n"[..], want].concat()
    );
    assert_eq!(s.read_body("big").unwrap(), want);
    drop(s);
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert_eq!((loaded.len(), loaded[0].size, bad.len()), (1, 32, 0));
    s.remove("big").unwrap();
    assert!(names(&q).is_empty());
}

#[test]
fn a_file_without_metadata_is_never_loaded() {
    // Renamed into queue/ but its .json never followed (a crash between
    // the two renames of a large message): never acknowledged.
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    drop(s);
    let q = dir.path().join("queue");
    fs::write(q.join("stub.msg"), b"\nSubject: x\r\n\r\nhi\r\n").unwrap();
    fs::write(q.join("noline.msg"), b"{\"id\":\"noline\"").unwrap();
    let (loaded, bad) = Spool::open(dir.path(), 10).unwrap().load_all();
    assert!(loaded.is_empty());
    let mut reasons: Vec<_> = bad
        .iter()
        .map(|c| (c.name.as_str(), c.reason.as_str()))
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2);
    assert!(
        reasons[0].0 == "noline.msg" && reasons[0].1.contains("no metadata line"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].0 == "stub.msg" && reasons[1].1.contains("never acknowledged"),
        "{reasons:?}"
    );
    assert!(names(&q).is_empty());
    assert_eq!(
        names(&dir.path().join("corrupt")),
        ["noline.msg", "stub.msg"]
    );
}

#[test]
fn entries_of_the_two_file_layout_still_load_update_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    drop(s);
    // As earlier versions wrote them: the message alone in .eml, pretty JSON beside it.
    let q = dir.path().join("queue");
    let body = b"Subject: old\r\n\r\nqueued before the upgrade\r\n";
    let m = meta("old1", body);
    fs::write(q.join("old1.eml"), body).unwrap();
    fs::write(q.join("old1.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert_eq!((loaded.len(), bad.len()), (1, 0), "{bad:?}");
    assert_eq!(s.read_body("old1").unwrap(), body);
    let (f, start) = s.open_body("old1").unwrap();
    assert_eq!(start, 0);
    assert_eq!(read_from(&f, 0).unwrap(), body);
    assert_eq!(read_entry(dir.path(), "old1").unwrap().1, body);
    assert_eq!(Spool::list(dir.path()).unwrap().len(), 1);
    let mut m = loaded[0].clone();
    m.attempts = 1;
    s.update(&m).unwrap();
    assert_eq!(s.read_meta("old1").unwrap().attempts, 1);
    assert_eq!(names(&q), ["old1.eml", "old1.json"]);
    s.remove("old1").unwrap();
    assert!(names(&q).is_empty());
    assert_eq!(s.len(), 0);
    // A torn body of the old layout is still caught.
    fs::write(q.join("old2.eml"), b"Subj").unwrap();
    fs::write(
        q.join("old2.json"),
        serde_json::to_vec(&meta("old2", body)).unwrap(),
    )
    .unwrap();
    drop(s);
    let (loaded, bad) = Spool::open(dir.path(), 10).unwrap().load_all();
    assert!(loaded.is_empty());
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(
        names(&dir.path().join("corrupt")),
        ["old2.eml", "old2.json"]
    );
}

#[test]
fn a_failed_commit_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    // Draft and metadata disagree: refused before anything is renamed.
    let draft = s.draft("a");
    let mut m = meta("b", b"x");
    assert!(s.commit(draft, &mut m, b"x").is_err());
    let mut draft = s.draft("c");
    draft.write(b"started").unwrap();
    let mut m = meta("d", b"x");
    assert!(s.commit(draft, &mut m, b"x").is_err());
    assert!(names(&dir.path().join("tmp")).is_empty());
    assert!(names(&dir.path().join("queue")).is_empty());
    assert_eq!(s.len(), 0);
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
    assert!(dir.path().join("corrupt").join("b3.msg").exists());
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

#[test]
fn the_listing_knows_both_layouts_and_counts_each_entry_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 20).unwrap();
    for id in ["d1", "d2", "d3"] {
        s.store(&meta(id, b"x"), b"x").unwrap();
    }
    // d2 tried once: its .json beside its .msg.
    let mut m = meta("d2", b"x");
    m.attempts = 1;
    s.update(&m).unwrap();
    drop(s);
    let q = dir.path().join("queue");
    // An entry of the earlier layout.
    fs::write(q.join("d4.eml"), b"x").unwrap();
    fs::write(
        q.join("d4.json"),
        serde_json::to_vec(&meta("d4", b"x")).unwrap(),
    )
    .unwrap();
    // A crash between the two unlinks of a removal: a lone .json.
    fs::write(
        q.join("d5.json"),
        serde_json::to_vec(&meta("d5", b"x")).unwrap(),
    )
    .unwrap();
    // A large message renamed in, its .json never followed.
    fs::write(q.join("d6.msg"), b"\nSubject: x\r\n\r\nhi\r\n").unwrap();
    // A body without metadata, beside a .msg of its own or not.
    fs::write(q.join("d1.eml"), b"x").unwrap();
    fs::write(q.join("d7.eml"), b"x").unwrap();
    assert_eq!(
        Spool::list_ids(dir.path()).unwrap(),
        ["d1", "d2", "d3", "d4", "d5", "d6"]
    );
    let listed = Spool::list(dir.path()).unwrap();
    assert_eq!(ids(&listed), ["d1", "d2", "d3", "d4"]);
    assert_eq!(listed[1].attempts, 1, "the .json overrides the first line");
    let s = Spool::open(dir.path(), 20).unwrap();
    assert_eq!(s.len(), 6, "d1..d6, each once, before anything is read");
    let mut backlog = s.take_backlog();
    assert_eq!(backlog.len(), 6);
    // Removed after the listing, before it was read: skipped, counted once.
    s.remove("d3").unwrap();
    assert_eq!(s.len(), 5);
    let (loaded, bad) = s.load_batch(&mut backlog, usize::MAX);
    assert_eq!(ids(&loaded), ["d1", "d2", "d4"]);
    assert_eq!(loaded[1].attempts, 1);
    let mut names_bad: Vec<&str> = bad.iter().map(|c| c.name.as_str()).collect();
    names_bad.sort();
    assert_eq!(
        names_bad,
        ["d1.eml", "d5.json", "d6.msg", "d7.eml"],
        "{bad:?}"
    );
    assert_eq!(s.len(), 3, "d1, d2 and d4");
    assert_eq!(
        names(&q),
        ["d1.msg", "d2.json", "d2.msg", "d4.eml", "d4.json"]
    );
    assert_eq!(
        names(&dir.path().join("corrupt")),
        ["d1.eml", "d5.json", "d6.msg", "d7.eml"]
    );
    for id in ["d1", "d2", "d4"] {
        s.remove(id).unwrap();
    }
    assert_eq!(s.len(), 0);
    assert!(names(&q).is_empty());
}

#[test]
fn an_entry_removed_while_its_load_failed_is_counted_out_once() {
    // The load read a half-removed entry (its .msg gone, its .json not
    // yet): looked at again under the removal's lock, it is gone.
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let mut m = meta("e1", b"x");
    s.store(&m, b"x").unwrap();
    m.attempts = 1;
    s.update(&m).unwrap();
    s.store(&meta("e2", b"x"), b"x").unwrap();
    drop(s);
    let s = Spool::open(dir.path(), 10).unwrap();
    assert_eq!(s.len(), 2);
    s.remove("e1").unwrap();
    assert!(
        matches!(s.set_aside("e1"), Aside::Gone),
        "removed: not counted again"
    );
    assert_eq!(s.len(), 1);
    // Written again under its id since (a DSN rewritten): loaded after all.
    s.store(&meta("e1", b"y"), b"y").unwrap();
    assert_eq!(s.len(), 2);
    assert!(matches!(s.set_aside("e1"), Aside::Loaded(m) if m.id == "e1"));
    assert_eq!(s.len(), 2);
    fs::write(dir.path().join("queue").join("e2.msg"), b"{torn").unwrap();
    assert!(matches!(s.set_aside("e2"), Aside::Moved(n, _) if n == "e2.msg"));
    assert_eq!(s.len(), 1);
    s.remove("e2").unwrap();
    assert_eq!(s.len(), 1, "moved aside: not counted again");
}

fn ino(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().ino()
}

#[test]
fn a_delivered_file_is_written_over_only_after_a_queue_sync() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let long = b"Subject: long\r\n\r\nsome words that make it the longest\r\n";
    s.store(&meta("a1", long), long).unwrap();
    let kept = ino(&dir.path().join("queue/a1.msg"));
    s.recycle("a1").unwrap();
    assert_eq!(s.len(), 0);
    assert_eq!(names(&dir.path().join("tmp")), ["free.1"]);
    // No fsync of queue/ since the rename: a new file.
    let short = b"Subject: a\r\n\r\nhi\r\n";
    s.store(&meta("a2", short), short).unwrap();
    assert_ne!(ino(&dir.path().join("queue/a2.msg")), kept);
    // a2's commit synced queue/: the kept file is written over, and cut to
    // the new message's length.
    let shorter = b"Subject: b\r\n\r\n.\r\n";
    s.store(&meta("a3", shorter), shorter).unwrap();
    assert_eq!(ino(&dir.path().join("queue/a3.msg")), kept);
    assert!(names(&dir.path().join("tmp")).is_empty());
    assert_eq!(s.read_body("a3").unwrap(), shorter);
    assert_eq!(s.len(), 2);
    drop(s);
    let s = Spool::open(dir.path(), 10).unwrap();
    let (loaded, bad) = s.load_all();
    assert_eq!(ids(&loaded), ["a2", "a3"]);
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(s.read_body("a2").unwrap(), short);
}

#[test]
fn at_most_max_free_files_are_kept_and_open_empties_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 1000).unwrap();
    let n = MAX_FREE_FILES + 3;
    for i in 0..n {
        s.store(&meta(&format!("m{i:03}"), b"x"), b"x").unwrap();
    }
    for i in 0..n {
        s.recycle(&format!("m{i:03}")).unwrap();
    }
    assert_eq!(s.len(), 0);
    assert!(names(&dir.path().join("queue")).is_empty());
    assert_eq!(names(&dir.path().join("tmp")).len(), MAX_FREE_FILES);
    drop(s);
    let s = Spool::open(dir.path(), 1000).unwrap();
    assert!(names(&dir.path().join("tmp")).is_empty());
    assert!(s.is_empty());
}

#[test]
fn recycling_an_entry_takes_its_metadata_and_the_earlier_layout_too() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    let mut m = meta("r1", b"x");
    s.store(&m, b"x").unwrap();
    m.attempts = 2;
    s.update(&m).unwrap();
    s.recycle("r1").unwrap();
    assert!(names(&dir.path().join("queue")).is_empty());
    assert_eq!(s.len(), 0);
    drop(s);
    // An entry of the two-file layout is removed as by `remove`.
    let q = dir.path().join("queue");
    let old = meta("r2", b"y");
    fs::write(q.join("r2.eml"), b"y").unwrap();
    fs::write(q.join("r2.json"), serde_json::to_vec(&old).unwrap()).unwrap();
    let s = Spool::open(dir.path(), 10).unwrap();
    assert_eq!(s.len(), 1);
    s.recycle("r2").unwrap();
    assert!(names(&q).is_empty());
    assert_eq!(s.len(), 0);
    // Gone already: nothing to do.
    s.recycle("r2").unwrap();
    assert_eq!(s.len(), 0);
}
