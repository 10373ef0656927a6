//! Durable, private files: directories created 0700, files written 0600 through a synced temp file and a rename, never through a symlink.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Create `dir` and any missing parents with mode 0700 (the umask can only
/// remove bits from that). Existing directories are left as they are.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// fsync a directory, so the names created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `path` (a new file, mode 0600; an existing file or a
/// symlink there is an error, never followed or overwritten) and sync it.
/// `fdatasync` suffices for a new file: it flushes the data and the metadata
/// needed to read it back (size, blocks); the name becomes durable by the
/// rename and the directory fsync that follow.
pub fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = create_private(path)?;
    f.write_all(data)?;
    f.sync_data()
}

/// Like [`write_synced`], with the content written by `fill` (through a
/// buffer, so large content can be streamed in pieces).
pub fn write_synced_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let mut w = io::BufWriter::with_capacity(64 * 1024, create_private(path)?);
    fill(&mut w)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_data()
}

/// Create `path` new (`O_EXCL`, never through a symlink) with mode 0600.
pub fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // A umask that takes the owner's bits away (never seen, but possible):
    // put them back. The usual umask leaves 0600 alone, and the `fchmod` is
    // saved (one syscall per file).
    if umask_strips_owner_bits() {
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// Whether the process umask removes read or write for the owner (read once
/// from `/proc/self/status`; when that cannot be read, assume it does).
fn umask_strips_owner_bits() -> bool {
    static STRIPS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STRIPS.get_or_init(|| {
        let Ok(status) = fs::read_to_string("/proc/self/status") else {
            return true;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .is_none_or(|mask| mask & 0o600 != 0)
    })
}

/// Write `data` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |w| w.write_all(data))
}

/// Like [`write_atomic`], with the content written by `fill`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{:08x}.tmp", rand::random::<u32>()));
    let result = write_synced_with(&tmp, fill)
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| sync_dir(dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        create_private_dir(&sub).unwrap();
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = sub.join("f.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp file is left beside it.
        assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
    }

    #[test]
    fn synced_write_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        assert!(write_synced(&victim, b"x").is_err());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = write_synced(&link, b"x").unwrap_err();
        assert!(
            e.kind() == io::ErrorKind::AlreadyExists || e.raw_os_error() == Some(libc::ELOOP),
            "{e}"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }
}
