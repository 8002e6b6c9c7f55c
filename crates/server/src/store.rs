//! Where durable state lives: a [`SnapshotStore`] keeps blobs by key (actor snapshots, actor
//! records, uploaded modules), and [`LocalStore`] keeps them as files under one folder.
//!
//! Guarantees of every implementation:
//! - [`SnapshotStore::put`] is crash-safe: after a crash the key holds either its previous
//!   bytes or the new ones, whole, never a mix or a truncated file.
//! - Keys are checked in one place ([`check_key`]): segments of `[A-Za-z0-9._-]` joined by
//!   `/`, none empty or starting with `.`, so a key never leaves the store.

use std::fs::{self, File};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store key `{0}`")]
    Key(String),
    #[error("the state folder {0} is in use by another process (another tern serve?)")]
    InUse(PathBuf),
    #[error("the cluster: {0}")]
    Remote(String),
    #[error("no actor `{0}` in the cluster")]
    Missing(String),
    #[error("actor `{id}` is owned by node `{node}`")]
    Moved { id: String, node: String },
    #[error("actor `{0}` was taken over by another node; this node's state of it is stale")]
    Fenced(String),
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Blobs by key, written crash-safely. Narrow on purpose: a local folder implements it
/// today, the cluster's directory and object stores
/// ([`crate::cluster`]) too.
pub trait SnapshotStore: Send + Sync {
    /// Stores `bytes` under `key`, replacing what was there, crash-safely.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// As [`SnapshotStore::put`], taking the bytes (a store that hands them to another
    /// thread need not copy them).
    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.put(key, &bytes)
    }
    /// The bytes under `key`, or `None` if there are none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// A snapshot chain's bytes under `key` in pieces: a chain file, then links each
    /// without padding (a store that keeps a chain's parts apart need not lay them out in
    /// one buffer); or `None` if there are none.
    fn get_chain(&self, key: &str) -> Result<Option<Vec<Bytes>>, StoreError> {
        Ok(self.get(key)?.map(|bytes| vec![Bytes::from(bytes)]))
    }
    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every key, sorted.
    fn list(&self) -> Result<Vec<String>, StoreError>;
    /// Gives up actor `id` once it is saved and passivated, so that another server sharing
    /// the store may take it; a store of one server has nothing to do.
    fn release(&self, id: &str) -> Result<(), StoreError> {
        let _ = id;
        Ok(())
    }

    /// Whether [`append`](Self::append) works: values can grow in place.
    fn appends(&self) -> bool {
        false
    }

    /// Whether other servers write the store too (a cluster's), so that nothing read from it
    /// may be kept beside it.
    fn shared(&self) -> bool {
        false
    }

    /// Keeps the first `end` bytes of the value at `key`, cutting off the rest, and appends
    /// `bytes` at the next multiple of 64 (zero padding between), durably; returns the new
    /// length. An interruption leaves the first `end` bytes as they were. Only where
    /// [`appends`](Self::appends).
    fn append(&self, key: &str, end: u64, bytes: &[u8]) -> Result<u64, StoreError> {
        let _ = (end, bytes);
        Err(StoreError::Key(format!(
            "{key}: this store does not append"
        )))
    }
}

thread_local! {
    static WRITER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Names the actor instance whose thread this is (0: none), for stores that fence each
/// instance's writes ([`crate::cluster`]): an instance that lost its actor to another
/// keeps being refused even after its node takes the actor back in a new instance.
pub fn set_writer(instance: u64) {
    WRITER.with(|w| w.set(instance));
}

/// The instance [`set_writer`] named on this thread.
pub fn writer() -> u64 {
    WRITER.with(|w| w.get())
}

/// Refuses a key that is empty, absolute, or has an empty, hidden or odd segment.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::Key(key.to_string()))
    }
}

/// A store in a local folder: key `a/b` is the file `ROOT/a/b`. A put writes a hidden
/// temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
/// folder.
pub struct LocalStore {
    root: PathBuf,
    next_tmp: AtomicU64,
    /// `ROOT/.lock`, locked while the store is open: one server per folder.
    _lock: File,
}

impl LocalStore {
    /// Opens (creating it if needed) the folder `root`, locks it against a second opener
    /// (in this process or another, until the store is dropped), and checks that it can be
    /// written.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalStore, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("cannot create the state folder", &root))?;
        let lock_path = root.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::InUse(root)),
            Err(fs::TryLockError::Error(e)) => return Err(io("cannot lock", &lock_path)(e)),
        }
        let store = LocalStore {
            root,
            next_tmp: AtomicU64::new(0),
            _lock: lock,
        };
        // A probe, so that a read-only folder is an error now rather than at the first save.
        store.put("write-check", b"ok")?;
        store.delete("write-check")?;
        Ok(store)
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

impl SnapshotStore for LocalStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let written = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        if let Err(error) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io("cannot write", &tmp)(error));
        }
        if let Err(error) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io("cannot rename onto", &path)(error));
        }
        // The rename itself is durable once the folder is synced.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync", &dir))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(key)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("cannot read", &path)(e)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot delete", &path)(e)),
        }
    }

    fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        walk(&self.root, "", &mut keys)?;
        keys.sort();
        Ok(keys)
    }

    fn appends(&self) -> bool {
        true
    }

    fn append(&self, key: &str, end: u64, bytes: &[u8]) -> Result<u64, StoreError> {
        let path = self.path(key)?;
        let appended = (|| {
            let mut file = File::options().write(true).open(&path)?;
            if file.metadata()?.len() < end {
                return Err(std::io::Error::other(format!(
                    "it holds fewer than the {end} bytes it had"
                )));
            }
            file.set_len(end)?;
            file.seek(std::io::SeekFrom::Start(end))?;
            let pad = tern_snapshot::next_link_at(end) - end;
            file.write_all(&[0; 64][..pad as usize])?;
            file.write_all(bytes)?;
            file.sync_data()?;
            Ok(end + pad + bytes.len() as u64)
        })();
        appended.map_err(io("cannot append to", &path))
    }
}

/// Collects the keys under `dir` (prefixed by `prefix`), skipping temporary files left by
/// an interrupted put and anything that is not a valid key.
fn walk(dir: &Path, prefix: &str, keys: &mut Vec<String>) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(io("cannot list", dir))?;
    for entry in entries {
        let entry = entry.map_err(io("cannot list", dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let key = format!("{prefix}{name}");
        if check_key(&key).is_err() {
            continue;
        }
        let kind = entry.file_type().map_err(io("cannot list", dir))?;
        if kind.is_dir() {
            walk(&entry.path(), &format!("{key}/"), keys)?;
        } else if kind.is_file() {
            keys.push(key);
        }
    }
    Ok(())
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |error| StoreError::Io { what, path, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_gets_lists_and_deletes() {
        let dir = std::env::temp_dir().join(format!("tern-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = LocalStore::open(&dir).unwrap();
        store.put("actors/a1.tern", b"one").unwrap();
        store.put("actors/a1.tern", b"two").unwrap();
        store.put("modules/m.wasm", b"m").unwrap();
        // A temporary file left by an interrupted put is not a key.
        fs::write(dir.join("actors/.tmp-1-1"), b"half").unwrap();
        assert_eq!(store.get("actors/a1.tern").unwrap().unwrap(), b"two");
        assert_eq!(store.get("actors/a2.tern").unwrap(), None);
        assert_eq!(store.list().unwrap(), ["actors/a1.tern", "modules/m.wasm"]);
        store.delete("actors/a1.tern").unwrap();
        store.delete("actors/a1.tern").unwrap();
        assert_eq!(store.list().unwrap(), ["modules/m.wasm"]);
        for bad in ["", "../x", "a//b", "/abs", "a/.hidden", "a b"] {
            assert!(store.put(bad, b"x").is_err(), "{bad}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_is_open_in_one_store_at_a_time() {
        let dir = std::env::temp_dir().join(format!("tern-store-lock-{}", std::process::id()));
        let first = LocalStore::open(&dir).unwrap();
        let err = LocalStore::open(&dir).err().unwrap();
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        drop(first);
        let again = LocalStore::open(&dir).unwrap();
        assert!(
            again.list().unwrap().is_empty(),
            "the lock file is not a key"
        );
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_that_cannot_be_created_is_an_error() {
        let file = std::env::temp_dir().join(format!("tern-store-file-{}", std::process::id()));
        fs::write(&file, b"not a folder").unwrap();
        let err = LocalStore::open(file.join("state")).err().unwrap();
        assert!(
            err.to_string().contains("cannot create the state folder"),
            "{err}"
        );
        fs::remove_file(&file).unwrap();
    }
}
