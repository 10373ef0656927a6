//! The token store: one JSON file (mode 0600, written atomically) holding each identity's refresh token, or why it needs a new sign-in.
//!
//! Access tokens are never written: they live an hour and stay in memory.
//! Every read-modify-write of a store file holds one process-wide lock, so
//! the daemon's managers and the admin callback never lose each other's
//! updates; the CLI (another process) writes only while signing in.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::common::Secret;

/// One identity's grant on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredGrant {
    /// The refresh token (empty once it was found expired or revoked).
    #[serde(with = "plain", default, skip_serializing_if = "Secret::is_empty")]
    pub refresh_token: Secret,
    /// The client it was issued to (a grant is bound to its client).
    #[serde(default)]
    pub client_id: String,
    /// The scope it was granted for.
    #[serde(default)]
    pub scope: String,
    /// When it was obtained or last rotated (Unix seconds).
    #[serde(default)]
    pub updated_at: u64,
    /// Set when the provider answered `invalid_grant`: why a new sign-in is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconsent: Option<String>,
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoreFile {
    /// Format version, for later changes.
    #[serde(default)]
    version: u32,
    /// Grants by identity (the mailbox, or `app` for client credentials).
    #[serde(default)]
    identities: BTreeMap<String, StoredGrant>,
}

/// Serialize a [`Secret`] as its value: only this file ever holds it in clear.
mod plain {
    use crate::common::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Secret, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.expose())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Serialises read-modify-write cycles of store files in this process.
static LOCK: Mutex<()> = Mutex::new(());

/// A token store file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStore {
    path: PathBuf,
}

impl TokenStore {
    /// The store at `path` (created on the first write).
    pub fn new(path: PathBuf) -> Self {
        TokenStore { path }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> io::Result<StoreFile> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a token store: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StoreFile::default()),
            Err(e) => Err(e),
        }
    }

    fn write(&self, file: &StoreFile) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            crate::common::fs::create_private_dir(dir)?;
        }
        let json = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
        crate::common::fs::write_atomic(&self.path, &json)?;
        // write_atomic creates 0600 files; make sure even so.
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
    }

    /// The grant stored for `identity`, if any.
    pub fn get(&self, identity: &str) -> io::Result<Option<StoredGrant>> {
        let _g = LOCK.lock();
        Ok(self.read()?.identities.remove(identity))
    }

    /// Every stored grant, by identity.
    pub fn all(&self) -> io::Result<BTreeMap<String, StoredGrant>> {
        let _g = LOCK.lock();
        Ok(self.read()?.identities)
    }

    /// Store (replace) the grant of `identity`.
    pub fn put(&self, identity: &str, grant: StoredGrant) -> io::Result<()> {
        let _g = LOCK.lock();
        let mut file = self.read()?;
        file.version = 1;
        file.identities.insert(identity.to_string(), grant);
        self.write(&file)
    }

    /// Forget `identity`; false when it was not stored.
    pub fn remove(&self, identity: &str) -> io::Result<bool> {
        let _g = LOCK.lock();
        let mut file = self.read()?;
        let was = file.identities.remove(identity).is_some();
        if was {
            file.version = 1;
            self.write(&file)?;
        }
        Ok(was)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_mode_and_masking() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("sub").join("tokens.json"));
        assert_eq!(store.get("a@example.com").unwrap(), None);
        let grant = StoredGrant {
            refresh_token: Secret::new("rt-SECRET-1"),
            client_id: "client".into(),
            scope: "s".into(),
            updated_at: 5,
            reconsent: None,
        };
        store.put("a@example.com", grant.clone()).unwrap();
        store
            .put(
                "b@example.com",
                StoredGrant {
                    reconsent: Some("invalid_grant".into()),
                    ..StoredGrant::default()
                },
            )
            .unwrap();
        assert_eq!(store.get("a@example.com").unwrap(), Some(grant));
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("rt-SECRET-1"));
        assert!(!format!("{:?}", store.all().unwrap()).contains("rt-SECRET-1"));
        assert!(store.remove("a@example.com").unwrap());
        assert!(!store.remove("a@example.com").unwrap());
        assert_eq!(store.all().unwrap().len(), 1);
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, "not json").unwrap();
        let store = TokenStore::new(path);
        assert!(store.get("x").is_err());
        assert!(store.put("x", StoredGrant::default()).is_err());
    }
}
