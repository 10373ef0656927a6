//! The durable queue: one `.eml` body and one `.json` metadata file per message, fsynced and renamed into place before the client hears `250`.
//!
//! Layout under the spool directory:
//! - `tmp/`: files being written; never loaded, emptied at start.
//! - `queue/<id>.eml` + `queue/<id>.json`: a committed message. The `.json`
//!   is renamed in last, so its presence is the commit point.
//! - `corrupt/`: entries that could not be loaded, moved aside for an operator.
//! - `lock`: held (`flock`, exclusive) by whoever has the spool open; see [`lock`].
//!
//! Directories mailbridge creates are mode 0700 and files 0600, whatever the
//! umask; files are created new (`O_EXCL`) and never through a symlink
//! (`O_NOFOLLOW`).

pub mod meta;

use parking_lot::{Condvar, Mutex};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::fs::{create_private, create_private_dir, write_synced};

pub use meta::{Meta, Rcpt, RcptStatus};

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

impl SpoolError {
    /// A failed write of a message file (a full disk is [`SpoolError::Full`]).
    pub fn from_write(e: io::Error) -> SpoolError {
        spool_error(e)
    }
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
    _lock: SpoolLock,
}

/// The entries [`Spool::open`] found in `queue/`, still to be loaded (see
/// [`Spool::load_batch`]): the ids with metadata, oldest (smallest id)
/// first, and the files to move aside (bodies without metadata, unexpected
/// names). Only what was there at open: a message stored afterwards is
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

/// One message being written to `tmp/<id>.eml` as it arrives (see
/// [`Spool::draft`]). The file is created at the first write; dropped
/// without a successful [`Spool::commit`] (a refused message, a client gone
/// mid-DATA, a write error), the temp file is removed.
#[derive(Debug)]
pub struct Draft {
    id: String,
    path: PathBuf,
    file: Option<File>,
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

    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            self.file = Some(create_private(&self.path)?);
        }
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("draft file not open"))
    }

    /// Append `bytes` (blocking: call it off the async runtime).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file()?.write_all(bytes)?;
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

    fn body_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.eml"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.json"))
    }

    /// List `queue/`: the ids with metadata (sorted), and what does not belong.
    fn list_backlog(&self) -> io::Result<Backlog> {
        let mut ids: Vec<Box<str>> = Vec::new();
        let mut bodies: Vec<Box<str>> = Vec::new();
        let mut strays = Vec::new();
        for e in fs::read_dir(&self.queue)? {
            let Ok(e) = e else { continue };
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            match name.rsplit_once('.') {
                Some((stem, "json")) if is_valid_id(stem) => ids.push(stem.into()),
                Some((stem, "eml")) if is_valid_id(stem) => bodies.push(stem.into()),
                Some((_, "eml")) => {
                    strays.push((name, "body without metadata (never acknowledged)"))
                }
                _ => strays.push((name, "unexpected file in queue")),
            }
        }
        // Sorted: a binary search per body, not a scan (100 000 entries).
        ids.sort_unstable();
        for stem in bodies {
            if ids.binary_search(&stem).is_err() {
                strays.push((
                    format!("{stem}.eml"),
                    "body without metadata (never acknowledged)",
                ));
            }
        }
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
                // Removed since the listing (by `remove`, which counted it).
                Err(_) if !self.meta_path(&id).exists() => {}
                Err(reason) => {
                    if self.move_aside(&format!("{id}.json")) {
                        self.count.fetch_sub(1, Ordering::SeqCst);
                    }
                    self.move_aside(&format!("{id}.eml"));
                    corrupt.push(Corrupt {
                        name: format!("{id}.json"),
                        reason,
                    });
                }
            }
        }
        if backlog.ids.is_empty() {
            backlog.ids = Vec::new();
        }
        (metas, corrupt)
    }

    fn load_one(&self, id: &str) -> Result<Meta, String> {
        let text =
            fs::read(self.meta_path(id)).map_err(|e| format!("cannot read metadata: {e}"))?;
        let meta: Meta = serde_json::from_slice(&text).map_err(|e| format!("bad metadata: {e}"))?;
        if meta.id != id {
            return Err(format!("metadata names id {:?}", meta.id));
        }
        meta.check().map_err(|e| format!("bad metadata: {e}"))?;
        match fs::metadata(self.body_path(id)) {
            Ok(m) if m.len() == meta.size => Ok(meta),
            Ok(m) => Err(format!(
                "body is {} bytes, metadata says {}",
                m.len(),
                meta.size
            )),
            Err(e) => Err(format!("body missing: {e}")),
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
            path: self.tmp.join(format!("{id}.eml")),
            id: id.to_string(),
            file: None,
            len: 0,
        }
    }

    /// Store a new message held in memory (a DSN, a test message): a
    /// [`Draft`] with `body`, committed at once.
    pub fn store(&self, meta: &Meta, body: &[u8]) -> Result<(), SpoolError> {
        let mut draft = self.draft(&meta.id);
        let mut meta = meta.clone();
        if let Err(e) = draft.write(body) {
            return Err(spool_error(e));
        }
        self.commit(draft, &mut meta)
    }

    /// Make a written message durable: `meta.size` is set to the file's
    /// length, the body and the metadata are fdatasynced, renamed into
    /// `queue/` (metadata last: the commit point) and the directory is
    /// fsynced (shared with concurrent commits). Returns only then; on error
    /// nothing is left behind.
    pub fn commit(&self, mut draft: Draft, meta: &mut Meta) -> Result<(), SpoolError> {
        meta.size = draft.len;
        let reserved = self.count.fetch_add(1, Ordering::SeqCst);
        if reserved >= self.max_messages {
            self.count.fetch_sub(1, Ordering::SeqCst);
            return Err(SpoolError::Full(format!("{} messages queued", reserved)));
        }
        let result = self.commit_files(&mut draft, meta);
        if let Err(e) = result {
            self.count.fetch_sub(1, Ordering::SeqCst);
            let _ = fs::remove_file(self.meta_path(&meta.id));
            let _ = fs::remove_file(self.body_path(&meta.id));
            let _ = fs::remove_file(self.tmp.join(format!("{}.json", meta.id)));
            // Dropping the draft removes tmp/<id>.eml.
            return Err(spool_error(e));
        }
        Ok(())
    }

    fn commit_files(&self, draft: &mut Draft, meta: &Meta) -> io::Result<()> {
        if draft.id != meta.id {
            return Err(io::Error::other("draft and metadata name different ids"));
        }
        let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        let tmp_meta = self.tmp.join(format!("{}.json", meta.id));
        draft.file()?.sync_data()?;
        write_synced(&tmp_meta, &json)?;
        fs::rename(&draft.path, self.body_path(&meta.id))?;
        // Renamed: no longer ours to remove when dropped.
        draft.file = None;
        fs::rename(&tmp_meta, self.meta_path(&meta.id))?;
        self.queue_sync.sync(&self.queue_dir)
    }

    /// Replace an entry's metadata atomically.
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

    /// Read a message body.
    pub fn read_body(&self, id: &str) -> io::Result<Vec<u8>> {
        fs::read(self.body_path(id))
    }

    /// Open a message body for reading (delivery reads it in chunks; see
    /// [`crate::transport::Body`]). The file holds the whole RFC 5322
    /// message; it is never followed through a symlink.
    pub fn open_body(&self, id: &str) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.body_path(id))
    }

    /// Read one entry's metadata as it is on disk.
    pub fn read_meta(&self, id: &str) -> io::Result<Meta> {
        if !is_valid_id(id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a queue id",
            ));
        }
        let text = fs::read(self.meta_path(id))?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Remove an entry (metadata first, so a crash leaves at most an orphan body).
    ///
    /// The directory is not fsynced: if the machine loses power before the
    /// kernel writes the unlink, the message comes back at start and is
    /// delivered again. At-least-once is the promise (as Postfix's), and it
    /// saves an fsync per message.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let had = match fs::remove_file(self.meta_path(id)) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        match fs::remove_file(self.body_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if had {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
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
                let stem = name.strip_suffix(".json")?;
                is_valid_id(stem).then(|| stem.to_string())
            })
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The metadata of the entries `ids` as it is on disk, in that order; an
    /// entry gone or unreadable meanwhile is left out, but a file this user
    /// may not read is an error (not "nothing queued").
    pub fn read_metas(root: &Path, ids: &[String]) -> io::Result<Vec<Meta>> {
        let queue = root.join("queue");
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let p = queue.join(format!("{id}.json"));
            let text = match fs::read(&p) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display())));
                }
                Err(_) => continue,
            };
            if let Ok(m) = serde_json::from_slice::<Meta>(&text) {
                out.push(m);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
