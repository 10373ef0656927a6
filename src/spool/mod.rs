//! The durable queue: one file per message (a metadata line, then the message), fsynced and renamed into place before the client hears `250`.
//!
//! Layout under the spool directory:
//! - `tmp/`: files being written; never loaded, emptied at start. Also up
//!   to [`MAX_FREE_FILES`] files of delivered messages, `tmp/free.<n>`, to
//!   be written over by new ones ([`Spool::recycle`]): on an ext4 mounted
//!   with `discard` an unlink waits for the blocks it frees, and a new file
//!   costs an inode and blocks to allocate.
//! - `queue/<id>.msg`: a committed message. Its first line is the metadata
//!   ([`Meta`]) as one line of JSON, the message (RFC 5322, CRLF) follows,
//!   so `less` shows both. Its rename into `queue/` is the commit point; one
//!   write, one `fdatasync`, one rename and a shared directory fsync per
//!   message.
//! - `queue/<id>.json` beside it, when present, overrides that first line:
//!   retry state written after an attempt ([`Spool::update`]), and the
//!   metadata of a message whose file was started before its metadata was
//!   known (a large one, written as it arrived: its first line is empty and
//!   the `.json`'s rename is the commit point). A message delivered at the
//!   first attempt never has one.
//! - `queue/<id>.eml` + `queue/<id>.json`: the layout of earlier versions
//!   (message and metadata apart), still loaded, updated and removed, so an
//!   upgrade keeps what was queued.
//! - `corrupt/`: entries that could not be loaded, moved aside for an operator.
//!
//! [`Spool::open`] only lists `queue/` by name; the entries are read later,
//! in batches ([`Spool::load_batch`], by the scheduler in the background).
//! - `lock`: held (`flock`, exclusive) by whoever has the spool open; see [`lock`].
//!
//! Directories mailbridge creates are mode 0700 and files 0600, whatever the
//! umask; files are created new (`O_EXCL`), or are the spool's own kept
//! files in `tmp/`, and never opened through a symlink (`O_NOFOLLOW`).

pub mod meta;

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::fs::{create_private, create_private_dir, write_synced};

pub use meta::{Meta, Rcpt, RcptStatus};

use meta::Head;

/// A new queue id: 13 hex digits of microseconds since the epoch and 6 random
/// hex digits, so ids sort by arrival and are safe as file names.
pub fn new_id() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    format!(
        "{:013x}{:06x}",
        micros & 0x1f_ffff_ffff_ffff,
        rand::random::<u32>() & 0xff_ffff
    )
}

/// True for strings that can be a queue id (and so a file name).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Why a message could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The queue holds `max_messages` already, or the disk is full.
    #[error("queue full: {0}")]
    Full(String),
    /// Writing or syncing failed.
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
}

/// An entry that could not be loaded at start, and where it went.
#[derive(Debug, Clone)]
pub struct Corrupt {
    /// The file name in `queue/`.
    pub name: String,
    /// What was wrong with it.
    pub reason: String,
}

/// How long [`Spool::open`] waits for a short-lived writer to let go of the lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The exclusive lock on a spool directory; released when dropped (or when
/// the process ends, however it ends).
#[derive(Debug)]
pub struct SpoolLock {
    _file: File,
}

/// Take the exclusive lock on the spool at `root` (`flock` on `root/lock`),
/// waiting up to `wait` for another holder to let go. Fails with
/// [`io::ErrorKind::WouldBlock`] and a message naming the spool when someone
/// else still holds it.
///
/// Who holds it: the daemon, for as long as it runs ([`Spool::open`] takes
/// it, the [`Spool`] keeps it). Anything else that changes the spool must
/// take it too, without waiting long, and give up when it cannot:
/// - the offline CLI (`queue retry/delete` when the admin endpoint does not
///   answer) opens the spool with [`Spool::open`] and refuses when a daemon
///   runs: the running daemon must make the change (its admin endpoint);
/// - a short-lived writer that only adds new entries while no daemon runs
///   (a `sendmail` command) calls `lock(root, Duration::ZERO)` (or
///   [`Spool::open`]), writes its entry with [`Spool::store`]-style
///   temp-file + fsync + rename, and drops the lock at once. When the lock is
///   held, a daemon runs: hand the message to it over SMTP instead. A daemon
///   starting meanwhile waits up to [`LOCK_WAIT`] for such a writer.
pub fn lock(root: &Path, wait: Duration) -> io::Result<SpoolLock> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(SpoolLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "the spool {} is in use by another mailbridge process (it holds {})",
                        root.display(),
                        path.display()
                    ),
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// The contents of `corrupt/` (for `/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorruptSummary {
    /// Files in `corrupt/`.
    pub count: usize,
    /// The newest: file name and when it was moved there (Unix seconds).
    pub newest: Option<(String, u64)>,
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    queue: PathBuf,
    tmp: PathBuf,
    corrupt: PathBuf,
    max_messages: usize,
    count: AtomicUsize,
    queue_sync: DirSync,
    /// `queue/`, kept open for its fsyncs (saves an open and a close each).
    queue_dir: File,
    /// What [`Spool::open`] found in `queue/`, until someone takes it.
    backlog: Mutex<Option<Backlog>>,
    /// Held while an entry's files leave `queue/` ([`Spool::remove`], an
    /// entry moved aside at load): an entry is two files, so each is
    /// counted out once, by whoever takes it.
    entries: Mutex<()>,
    /// Files of delivered messages in `tmp/`, to be written over.
    free: Mutex<FreeFiles>,
    _lock: SpoolLock,
}

/// The entries [`Spool::open`] found in `queue/`, still to be loaded (see
/// [`Spool::load_batch`]): the ids of the entries (a `.msg`, or a `.json`
/// of the earlier layout), oldest (smallest id) first, and the files to
/// move aside (`.eml` bodies without a `.json`, unexpected names). Only what was there at open: a message stored afterwards is
/// never in it.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Ids in reverse order, so that loading pops from the end.
    ids: Vec<Box<str>>,
    /// File names in `queue/` to move to `corrupt/`, with the reason.
    strays: Vec<(String, &'static str)>,
}

impl Backlog {
    /// Entries still to load.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when everything was loaded.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.strays.is_empty()
    }

    /// Take the `n` oldest entries (and the stray files) into a backlog of
    /// their own, to be loaded apart from the rest (in parallel).
    pub fn split_off(&mut self, n: usize) -> Backlog {
        let at = self.ids.len().saturating_sub(n);
        Backlog {
            ids: self.ids.split_off(at),
            strays: std::mem::take(&mut self.strays),
        }
    }
}

/// What became of an entry that failed to load (see [`Spool::set_aside`]).
enum Aside {
    Loaded(Meta),
    Gone,
    Moved(String, String),
}

/// Files of delivered messages, kept at most: the pool a burst of
/// deliveries fills and the next burst of new mail empties.
pub const MAX_FREE_FILES: usize = 64;

/// The files [`Spool::recycle`] kept in `tmp/`, oldest first, each with the
/// [`DirSync`] ticket of the rename that took it out of `queue/`.
#[derive(Debug, Default)]
struct FreeFiles {
    files: VecDeque<(PathBuf, u64)>,
    /// The number in the next file's name.
    next: u64,
}

/// Group commit of one directory's fsync: every caller returns only after an
/// fsync that *started after* its call, but concurrent callers share one
/// fsync instead of queueing one each (20 sessions storing at once cost one
/// or two directory syncs, not twenty).
#[derive(Debug, Default)]
struct DirSync {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Tickets handed out so far.
    issued: u64,
    /// Every ticket up to this one is covered by a completed fsync.
    synced: u64,
    /// An fsync is running now.
    running: bool,
}

impl DirSync {
    /// A ticket for a change already made to the directory, without waiting:
    /// [`DirSync::covered`] once an fsync that started after this call has
    /// completed.
    fn ticket(&self) -> u64 {
        let mut st = self.state.lock();
        st.issued += 1;
        st.issued
    }

    /// Whether a completed fsync covers `ticket`.
    fn covered(&self, ticket: u64) -> bool {
        self.state.lock().synced >= ticket
    }

    fn sync(&self, dir: &File) -> io::Result<()> {
        let mut st = self.state.lock();
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.synced >= ticket {
                return Ok(());
            }
            if !st.running {
                // Run one fsync for every ticket issued so far.
                st.running = true;
                let covers = st.issued;
                drop(st);
                let result = dir.sync_all();
                st = self.state.lock();
                st.running = false;
                if result.is_ok() {
                    st.synced = st.synced.max(covers);
                }
                self.done.notify_all();
                // On failure the waiters run their own fsync and see their own result.
                return result;
            }
            self.done.wait(&mut st);
        }
    }
}

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122)) // ENOSPC, EDQUOT
}

/// A failed write as the client will hear it: a full disk is "queue full".
fn spool_error(e: io::Error) -> SpoolError {
    if is_disk_full(&e) {
        SpoolError::Full(e.to_string())
    } else {
        SpoolError::Io(e)
    }
}

/// One message being written to `tmp/<id>.msg` as it arrives (see
/// [`Spool::draft`]). The file is created at the first write (a large
/// message; a small one is written whole at [`Spool::commit`]); dropped
/// without a successful commit (a refused message, a client gone mid-DATA,
/// a write error), the temp file is removed.
#[derive(Debug)]
pub struct Draft {
    id: String,
    path: PathBuf,
    file: Option<File>,
    /// Message bytes written so far (the first line not counted).
    len: u64,
}

impl Draft {
    /// The queue id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before anything was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `bytes` (blocking: call it off the async runtime). The file
    /// created by the first write opens with an empty line: its metadata is
    /// not known yet and will go beside it.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(bytes)?,
            None => {
                let f = self.file.insert(create_private(&self.path)?);
                write_all_parts(f, &[meta::STUB_LINE, bytes])?;
            }
        }
        self.len += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Spool {
    /// Open (creating if needed) the spool at `root`: take its lock, empty
    /// `tmp/` and list `queue/` (names only; no entry is read). The entries
    /// found count towards `max_messages` at once and wait in the spool's
    /// [`Backlog`] ([`Spool::take_backlog`]) to be loaded, in the background
    /// by the scheduler or all at once by [`Spool::load_all`].
    ///
    /// Takes the spool's [`lock`] first (waiting up to [`LOCK_WAIT`]): a
    /// second daemon, or an offline edit while a daemon runs, fails with
    /// [`io::ErrorKind::WouldBlock`] before anything is touched.
    pub fn open(root: &Path, max_messages: usize) -> io::Result<Spool> {
        create_private_dir(root)?;
        let lock = lock(root, LOCK_WAIT)?;
        let queue = root.join("queue");
        create_private_dir(&queue)?;
        let spool = Spool {
            queue_dir: File::open(&queue)?,
            root: root.to_path_buf(),
            queue: root.join("queue"),
            tmp: root.join("tmp"),
            corrupt: root.join("corrupt"),
            max_messages,
            count: AtomicUsize::new(0),
            queue_sync: DirSync::default(),
            backlog: Mutex::new(None),
            entries: Mutex::new(()),
            free: Mutex::default(),
            _lock: lock,
        };
        for d in [&spool.queue, &spool.tmp, &spool.corrupt] {
            create_private_dir(d)?;
        }
        // Nothing in tmp/ was ever acknowledged.
        for e in fs::read_dir(&spool.tmp)? {
            let _ = fs::remove_file(e?.path());
        }
        let backlog = spool.list_backlog()?;
        spool.count.store(backlog.ids.len(), Ordering::SeqCst);
        *spool.backlog.lock() = Some(backlog);
        Ok(spool)
    }

    /// The entries found at open, still to be loaded (empty when taken already).
    pub fn take_backlog(&self) -> Backlog {
        self.backlog.lock().take().unwrap_or_default()
    }

    /// Load the whole backlog now (offline tools, tests): every committed
    /// entry, oldest first, and the unreadable ones, moved to `corrupt/`.
    pub fn load_all(&self) -> (Vec<Meta>, Vec<Corrupt>) {
        let mut backlog = self.take_backlog();
        self.load_batch(&mut backlog, usize::MAX)
    }

    /// The spool's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Messages currently in the queue.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The queue's limit (`spool.max_messages`).
    pub fn max_messages(&self) -> usize {
        self.max_messages
    }

    /// True when the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn msg_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.msg"))
    }

    /// The message of an entry in the earlier layout.
    fn body_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.eml"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.json"))
    }

    /// List `queue/` by name alone (no entry is read): the ids of the
    /// entries (sorted) and what does not belong. An id is an entry when
    /// its `.msg` is there, or its `.json` (with the `.eml` of the earlier
    /// layout, or alone after a crash between the unlinks of
    /// [`Spool::remove`]: a lone `.json`, or a `.msg` that opens with an
    /// empty line and has no `.json`, fails at load and is moved aside
    /// then). An `.eml` without a `.json` is a stray.
    fn list_backlog(&self) -> io::Result<Backlog> {
        let mut ids: Vec<Box<str>> = Vec::new();
        let mut jsons: Vec<Box<str>> = Vec::new();
        let mut bodies: Vec<Box<str>> = Vec::new();
        let mut strays = Vec::new();
        for e in fs::read_dir(&self.queue)? {
            let Ok(e) = e else { continue };
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            match name.rsplit_once('.') {
                Some((stem, "msg")) if is_valid_id(stem) => ids.push(stem.into()),
                Some((stem, "json")) if is_valid_id(stem) => jsons.push(stem.into()),
                Some((stem, "eml")) if is_valid_id(stem) => bodies.push(stem.into()),
                Some((_, "eml")) => {
                    strays.push((name, "body without metadata (never acknowledged)"))
                }
                _ => strays.push((name, "unexpected file in queue")),
            }
        }
        // Sorted: a binary search per body, not a scan (100 000 entries).
        jsons.sort_unstable();
        for stem in bodies {
            if jsons.binary_search(&stem).is_err() {
                strays.push((
                    format!("{stem}.eml"),
                    "body without metadata (never acknowledged)",
                ));
            }
        }
        // An entry with both a `.msg` and a `.json` is listed once.
        ids.append(&mut jsons);
        ids.sort_unstable();
        ids.dedup();
        ids.reverse();
        ids.shrink_to_fit();
        strays.sort();
        Ok(Backlog { ids, strays })
    }

    /// Load up to `n` entries of `backlog`, oldest first: their metadata, and
    /// the entries that could not be loaded, moved to `corrupt/` (with the
    /// backlog's stray files, at the first call). Never fails because of one
    /// bad entry. An entry removed since the listing is skipped.
    pub fn load_batch(&self, backlog: &mut Backlog, n: usize) -> (Vec<Meta>, Vec<Corrupt>) {
        let mut metas = Vec::new();
        let mut corrupt = Vec::new();
        for (name, reason) in std::mem::take(&mut backlog.strays) {
            self.move_aside(&name);
            corrupt.push(Corrupt {
                name,
                reason: reason.to_string(),
            });
        }
        for _ in 0..n {
            let Some(id) = backlog.ids.pop() else { break };
            match self.load_one(&id) {
                Ok(m) => metas.push(m),
                Err(_) => match self.set_aside(&id) {
                    Aside::Loaded(m) => metas.push(m),
                    Aside::Gone => {}
                    Aside::Moved(name, reason) => corrupt.push(Corrupt { name, reason }),
                },
            }
        }
        if backlog.ids.is_empty() {
            backlog.ids = Vec::new();
        }
        (metas, corrupt)
    }

    /// An entry that failed to load, looked at again under the lock
    /// [`Spool::remove`] takes (the load may have read it half-removed, or
    /// half-replaced by a new store under its id): loaded now, gone (removed
    /// since the listing, and counted out by `remove`), or moved to
    /// `corrupt/` with all its files and counted out once.
    fn set_aside(&self, id: &str) -> Aside {
        let _entries = self.entries.lock();
        let reason = match self.load_one(id) {
            Ok(m) => return Aside::Loaded(m),
            Err(reason) => reason,
        };
        let (msg, json) = (format!("{id}.msg"), format!("{id}.json"));
        let had_json = self.move_aside(&json);
        let had_msg = self.move_aside(&msg);
        if !(had_json || had_msg) {
            return Aside::Gone;
        }
        if had_json {
            self.move_aside(&format!("{id}.eml"));
        }
        self.count.fetch_sub(1, Ordering::SeqCst);
        // Known by its `.json` if it has one, else by its `.msg`.
        Aside::Moved(if had_json { json } else { msg }, reason)
    }

    fn load_one(&self, id: &str) -> Result<Meta, String> {
        let found = find(&self.queue, id).map_err(|e| e.to_string())?;
        let meta = found.meta;
        if meta.id != id {
            return Err(format!("metadata names id {:?}", meta.id));
        }
        meta.check().map_err(|e| format!("bad metadata: {e}"))?;
        let len = found
            .file
            .metadata()
            .map_err(|e| format!("cannot read the message file: {e}"))?
            .len();
        match len.checked_sub(found.start) {
            Some(n) if n == meta.size => Ok(meta),
            n => Err(format!(
                "message is {} bytes, metadata says {} (a torn write)",
                n.unwrap_or(0),
                meta.size
            )),
        }
    }

    /// Move `queue/<name>` to `corrupt/`; true if it was there and moved.
    fn move_aside(&self, name: &str) -> bool {
        fs::rename(self.queue.join(name), self.corrupt.join(name)).is_ok()
    }

    /// A new message file for queue id `id` in `tmp/`, written as the
    /// message arrives ([`Draft::write`]) and made durable by
    /// [`Spool::commit`]. Nothing touches the disk before the first write.
    pub fn draft(&self, id: &str) -> Draft {
        Draft {
            path: self.tmp.join(format!("{id}.msg")),
            id: id.to_string(),
            file: None,
            len: 0,
        }
    }

    /// Store a new message held in memory (a DSN, a test message): a
    /// [`Draft`] with `body`, committed at once.
    pub fn store(&self, meta: &Meta, body: &[u8]) -> Result<(), SpoolError> {
        let draft = self.draft(&meta.id);
        let mut meta = meta.clone();
        self.commit(draft, &mut meta, body)
    }

    /// Make a message durable: `tail` is appended to what `draft` holds,
    /// `meta.size` is set to the message's length, and the message goes
    /// into `queue/` (see the module's layout): a draft never written is
    /// written now as one file, metadata line first, fdatasynced and
    /// renamed (the commit point); a draft already started is
    /// fdatasynced, its metadata written beside it and fdatasynced, both
    /// renamed (the `.json` last: the commit point). Then the directory is
    /// fsynced (shared with concurrent commits). Returns only then; on error
    /// nothing is left behind.
    pub fn commit(&self, mut draft: Draft, meta: &mut Meta, tail: &[u8]) -> Result<(), SpoolError> {
        meta.size = draft.len + tail.len() as u64;
        let reserved = self.count.fetch_add(1, Ordering::SeqCst);
        if reserved >= self.max_messages {
            self.count.fetch_sub(1, Ordering::SeqCst);
            return Err(SpoolError::Full(format!("{} messages queued", reserved)));
        }
        let result = self.commit_files(&mut draft, meta, tail);
        if let Err(e) = result {
            self.count.fetch_sub(1, Ordering::SeqCst);
            let _ = fs::remove_file(self.meta_path(&meta.id));
            let _ = fs::remove_file(self.msg_path(&meta.id));
            let _ = fs::remove_file(self.tmp.join(format!("{}.json", meta.id)));
            // Dropping the draft removes tmp/<id>.eml.
            return Err(spool_error(e));
        }
        Ok(())
    }

    fn commit_files(&self, draft: &mut Draft, meta: &Meta, tail: &[u8]) -> io::Result<()> {
        if draft.id != meta.id {
            return Err(io::Error::other("draft and metadata name different ids"));
        }
        match &mut draft.file {
            None => {
                // The whole message is here: one file (a delivered message's
                // written over, or a new one), one write, one sync.
                let head = meta::head_line(meta).map_err(io::Error::other)?;
                let kept = self.take_free();
                let reused = kept.is_some();
                let (mut f, path) = match kept {
                    Some(found) => found,
                    None => (create_private(&draft.path)?, draft.path.clone()),
                };
                let len = (head.len() + tail.len()) as u64;
                let written = write_all_parts(&mut f, &[&head, tail])
                    .and_then(|()| if reused { f.set_len(len) } else { Ok(()) })
                    .and_then(|()| f.sync_data())
                    .and_then(|()| fs::rename(&path, self.msg_path(&meta.id)));
                if written.is_err() {
                    let _ = fs::remove_file(&path);
                }
                written?;
            }
            Some(f) => {
                f.write_all(tail)?;
                f.sync_data()?;
                let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
                let tmp_meta = self.tmp.join(format!("{}.json", meta.id));
                write_synced(&tmp_meta, &json)?;
                fs::rename(&draft.path, self.msg_path(&meta.id))?;
                draft.file = None;
                fs::rename(&tmp_meta, self.meta_path(&meta.id))?;
            }
        }
        self.queue_sync.sync(&self.queue_dir)
    }

    /// Replace an entry's metadata atomically: `queue/<id>.json`, which
    /// overrides the first line of the entry's file.
    pub fn update(&self, meta: &Meta) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        let tmp = self
            .tmp
            .join(format!("{}.json.{:08x}", meta.id, rand::random::<u32>()));
        let result =
            write_synced(&tmp, &json).and_then(|()| fs::rename(&tmp, self.meta_path(&meta.id)));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        self.queue_sync.sync(&self.queue_dir)
    }

    /// Read a message (the whole RFC 5322 message, without the metadata line).
    pub fn read_body(&self, id: &str) -> io::Result<Vec<u8>> {
        let (file, start) = self.open_body(id)?;
        read_from(&file, start)
    }

    /// Open a message for reading (delivery reads it in chunks; see
    /// [`crate::transport::Body::open_from`]), with the offset of its first
    /// byte: past the metadata line, or 0 for an entry in the earlier
    /// layout. From there to its end the file holds the whole RFC 5322
    /// message. Never followed through a symlink.
    pub fn open_body(&self, id: &str) -> io::Result<(File, u64)> {
        match open_nofollow(&self.msg_path(id)) {
            Ok(file) => {
                let start = first_line(&file)?.len() as u64;
                Ok((file, start))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                open_nofollow(&self.body_path(id)).map(|f| (f, 0))
            }
            Err(e) => Err(e),
        }
    }

    /// Read one entry's metadata as it is on disk (its `.json` if it has
    /// one, else its first line).
    pub fn read_meta(&self, id: &str) -> io::Result<Meta> {
        if !is_valid_id(id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a queue id",
            ));
        }
        find(&self.queue, id).map(|f| f.meta)
    }

    /// Remove an entry. The message file goes first and its `.json` (if
    /// any) after it, so a crash in between leaves a lone `.json`, moved
    /// aside at start, never the message with its first, stale metadata
    /// line to be delivered again. An entry in the earlier layout loses its
    /// metadata first, so a crash leaves at most an orphan body.
    ///
    /// The directory is not fsynced: if the machine loses power before the
    /// kernel writes the unlink, the message comes back at start and is
    /// delivered again. At-least-once is the promise (as Postfix's), and it
    /// saves an fsync per message.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let _entries = self.entries.lock();
        let had = match fs::remove_file(self.msg_path(id)) {
            Ok(()) => {
                remove_if_there(&self.meta_path(id))?;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let had = remove_if_there(&self.meta_path(id))?;
                remove_if_there(&self.body_path(id))?;
                had
            }
            Err(e) => return Err(e),
        };
        if had {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Remove a delivered entry and keep its file in `tmp/` to be written
    /// over by a new message ([`Spool::commit`]), up to [`MAX_FREE_FILES`];
    /// otherwise (more kept already, an entry in the earlier layout, a
    /// rename that fails) as [`Spool::remove`].
    ///
    /// Only for a message nobody reads any more: the caller holds no handle
    /// of its file (a delivery that read it whole into memory). A kept file
    /// is written over only once an fsync of `queue/` has completed after
    /// the rename that took it out, so that after a crash its old name can
    /// never come back holding another message's bytes.
    pub fn recycle(&self, id: &str) -> io::Result<()> {
        let path = {
            let mut free = self.free.lock();
            if free.files.len() >= MAX_FREE_FILES {
                drop(free);
                return self.remove(id);
            }
            free.next += 1;
            self.tmp.join(format!("free.{}", free.next))
        };
        let entries = self.entries.lock();
        match fs::rename(self.msg_path(id), &path) {
            Ok(()) => {
                let ticket = self.queue_sync.ticket();
                let mut free = self.free.lock();
                // Concurrent recycles may have filled the pool meanwhile.
                if free.files.len() < MAX_FREE_FILES {
                    free.files.push_back((path, ticket));
                } else {
                    drop(free);
                    let _ = fs::remove_file(&path);
                }
                remove_if_there(&self.meta_path(id))?;
                self.count.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
            // No `.msg` (the earlier layout, or gone already), or `tmp/`
            // unusable: removed as usual.
            Err(_) => {
                drop(entries);
                self.remove(id)
            }
        }
    }

    /// The oldest kept file whose rename out of `queue/` is durable, opened
    /// to be written over from its start (see [`Spool::recycle`]). A file
    /// that cannot be opened is removed.
    fn take_free(&self) -> Option<(File, PathBuf)> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = {
            let mut free = self.free.lock();
            let (_, ticket) = free.files.front()?;
            if !self.queue_sync.covered(*ticket) {
                return None;
            }
            free.files.pop_front()?.0
        };
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => Some((f, path)),
            Err(_) => {
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// What `corrupt/` holds now: how many files, and the newest (by the
    /// time it was moved there) with that time in Unix seconds.
    pub fn corrupt_summary(&self) -> CorruptSummary {
        let mut summary = CorruptSummary::default();
        let Ok(rd) = fs::read_dir(&self.corrupt) else {
            return summary;
        };
        for e in rd.flatten() {
            summary.count += 1;
            // rename() keeps mtime; ctime is when the entry was moved aside.
            let changed = e.metadata().ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ctime().max(0) as u64
            });
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(at) = changed
                && summary
                    .newest
                    .as_ref()
                    .is_none_or(|(n, t)| (at, &name) > (*t, n))
            {
                summary.newest = Some((name, at));
            }
        }
        summary
    }

    /// Every committed entry's metadata, read from disk, oldest first (a
    /// whole queue in memory: see [`Spool::list_ids`] for a paged list).
    pub fn list(root: &Path) -> io::Result<Vec<Meta>> {
        let ids = Spool::list_ids(root)?;
        Spool::read_metas(root, &ids)
    }

    /// The ids of the committed entries, sorted (ids sort by arrival), from
    /// the directory listing alone: a list reads the metadata one page at a
    /// time with [`Spool::read_metas`].
    pub fn list_ids(root: &Path) -> io::Result<Vec<String>> {
        let queue = root.join("queue");
        let rd = match fs::read_dir(&queue) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (stem, ext) = name.rsplit_once('.')?;
                (matches!(ext, "msg" | "json") && is_valid_id(stem)).then(|| stem.to_string())
            })
            .collect();
        // An entry with both a `.msg` and a `.json` is listed once.
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// The metadata of the entries `ids` as it is on disk (an entry's
    /// `.json` if it has one, else the first line of its `.msg`), in that
    /// order; an entry gone or unreadable meanwhile is left out, but a file
    /// this user may not read is an error (not "nothing queued").
    pub fn read_metas(root: &Path, ids: &[String]) -> io::Result<Vec<Meta>> {
        let queue = root.join("queue");
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.iter().filter(|id| is_valid_id(id)) {
            match find(&queue, id) {
                Ok(found) => out.push(found.meta),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(e),
                Err(_) => continue,
            }
        }
        Ok(out)
    }
}

/// Entry `id` of the spool at `root`, read without opening the spool (the
/// CLI's `queue show` while a daemon holds it): its metadata and its
/// message.
pub fn read_entry(root: &Path, id: &str) -> io::Result<(Meta, Vec<u8>)> {
    if !is_valid_id(id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a queue id",
        ));
    }
    let found = find(&root.join("queue"), id)?;
    let message = read_from(&found.file, found.start)?;
    Ok((found.meta, message))
}

/// The bytes of `file` from offset `start` to its end.
fn read_from(file: &File, start: u64) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len().checked_sub(start).ok_or_else(|| {
        io::Error::new(io::ErrorKind::UnexpectedEof, "the message file ended early")
    })?;
    let mut out = vec![0u8; len as usize];
    file.read_exact_at(&mut out, start)?;
    Ok(out)
}

/// An entry as found in `queue/`.
struct Found {
    meta: Meta,
    /// The file that holds the message, from `start` to its end.
    file: File,
    start: u64,
}

/// Read entry `id` in `queue`: the `.json` beside its `.msg` overrides the
/// `.msg`'s first line; an entry in the earlier layout is `.eml` + `.json`.
/// No entry at all is [`io::ErrorKind::NotFound`]; an unreadable one
/// [`io::ErrorKind::InvalidData`]. Errors name the file.
fn find(queue: &Path, id: &str) -> io::Result<Found> {
    let named =
        |e: io::Error, path: &Path| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let bad = |why: String, path: &Path| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let json_path = queue.join(format!("{id}.json"));
    let sidecar = match fs::read(&json_path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(named(e, &json_path)),
    };
    let msg_path = queue.join(format!("{id}.msg"));
    let (file, head, path) = match open_nofollow(&msg_path) {
        Ok(file) => {
            let line = first_line(&file).map_err(|e| named(e, &msg_path))?;
            (file, Some(line), msg_path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && sidecar.is_some() => {
            let eml = queue.join(format!("{id}.eml"));
            let file = open_nofollow(&eml).map_err(|e| {
                io::Error::new(e.kind(), format!("message missing: {}: {e}", eml.display()))
            })?;
            (file, None, eml)
        }
        Err(e) => return Err(named(e, &msg_path)),
    };
    let start = head.as_ref().map_or(0, |l| l.len() as u64);
    let meta = match sidecar {
        Some(text) => serde_json::from_slice(&text)
            .map_err(|e| bad(format!("bad metadata: {e}"), &json_path))?,
        None => match meta::parse_head(head.as_deref().unwrap_or_default()) {
            Ok(Head::Meta(meta, _)) => *meta,
            Ok(_) => return Err(bad("metadata missing (never acknowledged)".into(), &path)),
            Err(why) => return Err(bad(why, &path)),
        },
    };
    Ok(Found { meta, file, start })
}

/// The first line of a spool entry file, its newline included (read in
/// growing pieces: the metadata line is usually well under 4 KiB). A file
/// without one within [`meta::MAX_HEAD_LINE`] is an error.
fn first_line(file: &File) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    loop {
        let n = file.read_at(&mut buf[have..], have as u64)?;
        have += n;
        match meta::line_end(&buf[..have]) {
            Ok(Some(end)) => {
                buf.truncate(end as usize);
                return Ok(buf);
            }
            Ok(None) if n == 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no metadata line (a torn write)",
                ));
            }
            Ok(None) => {
                if have == buf.len() {
                    buf.resize((buf.len() * 2).min(meta::MAX_HEAD_LINE), 0);
                }
            }
            Err(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
        }
    }
}

/// Open `path` for reading, never through a symlink.
fn open_nofollow(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Remove `path`; whether it was there.
fn remove_if_there(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Write all of `parts` to `f` in as few `writev` calls as the kernel allows.
fn write_all_parts(f: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut left = &mut slices[..];
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        match f.write_vectored(left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
