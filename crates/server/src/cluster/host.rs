//! Snapshot objects shared by the nodes of one machine, as files in one folder (`tern serve
//! --cluster URL --host-objects DIR`, the same DIR for each of those nodes).
//!
//! A node writes each snapshot object it puts into the object store, or reads from it, also
//! to `DIR/{actor}/{sha256}`, the object's name, and looks there before it reads the object
//! store. A move between two nodes of one machine then reads the chain at the speed of the
//! page cache instead of through the NATS server (which carries it at a few hundred MB/s
//! where it shares the machine's cores with the nodes).
//!
//! - The object store stays the source of truth: a file is only a copy of an immutable
//!   object, made under the object's name, so it is never stale; a missing or unreadable file
//!   just means reading the object store.
//! - A file is published by renaming a finished temporary file, never written in place, so a
//!   reader maps whole files only ([`tern_snapshot::SnapshotFile`]).
//! - A file read is checked as a snapshot before it is used (structure and its own XXH3
//!   checksum, [`tern_snapshot::parse`]); a damaged one is removed and the object read from
//!   the object store instead.
//! - The node that deletes an object (a newer chain replaced it, the actor was deleted)
//!   removes its file. What is left otherwise (objects a node elsewhere deleted, files of a
//!   node killed while it wrote them) a node joining the cluster sweeps away
//!   ([`HostObjects::sweep`]); the folder may also be emptied at any time.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::store::check_key;

/// The folder of objects shared by this machine's nodes.
pub struct HostObjects {
    dir: PathBuf,
    /// Names this process's temporary files apart.
    next_temporary: AtomicU64,
}

impl HostObjects {
    /// The folder `dir`, made (readable by this user alone) if missing.
    pub fn open(dir: &Path) -> std::io::Result<HostObjects> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(HostObjects {
            dir: dir.to_path_buf(),
            next_temporary: AtomicU64::new(0),
        })
    }

    /// The file of object `name` (`{actor}/{sha256}`, two segments as a store key's,
    /// [`check_key`]); `None` for any other shape of name.
    fn path(&self, name: &str) -> Option<PathBuf> {
        let (actor, digest) = name.split_once('/')?;
        let two_segments = check_key(name).is_ok() && !digest.contains('/');
        two_segments.then(|| self.dir.join(actor).join(digest))
    }

    /// Object `name`'s bytes, mapped from its file, if the file is there and holds a whole,
    /// undamaged snapshot (a damaged one is removed).
    pub fn read(&self, name: &str) -> Option<Bytes> {
        let path = self.path(name)?;
        let file = match tern_snapshot::SnapshotFile::open(&path) {
            Ok(file) => file,
            Err(tern_snapshot::SnapshotError::Io { error, .. })
                if error.kind() == std::io::ErrorKind::NotFound =>
            {
                return None;
            }
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "cannot read a host object");
                return None;
            }
        };
        if let Err(e) = tern_snapshot::parse(file.bytes()) {
            tracing::warn!(object = %name, error = %e, "a host object is damaged; removed");
            let _ = fs::remove_file(&path);
            return None;
        }
        Some(Bytes::from_owner(file))
    }

    /// Writes `bytes` as object `name`'s file (replacing any); failures are logged, as the
    /// object store has the object anyway.
    pub fn write(&self, name: &str, bytes: &[u8]) {
        let Some(path) = self.path(name) else {
            return;
        };
        if let Err(e) = self.publish(&path, bytes) {
            tracing::warn!(object = %name, error = %e, "cannot write a host object");
        }
    }

    fn publish(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let folder = path
            .parent()
            .expect("an object's file is in its actor's folder");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(folder)?;
        let temporary = folder.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            self.next_temporary.fetch_add(1, Ordering::Relaxed)
        ));
        let written = File::create(&temporary).and_then(|mut file| file.write_all(bytes));
        match written.and_then(|()| fs::rename(&temporary, path)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = fs::remove_file(&temporary);
                Err(e)
            }
        }
    }

    /// Removes every file older than `age` (by its last write) that is not an object `kept`
    /// names (`{actor}/{sha256}`), temporary files included, and the actor folders left
    /// empty; returns how many files went. Younger files may be objects put a moment ago and
    /// not yet in the directory. Only plain files in plain folders are touched: a link is
    /// never followed.
    pub fn sweep(&self, kept: &HashSet<String>, age: Duration) -> usize {
        let Ok(actors) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for actor in actors.flatten() {
            if !actor.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(files) = fs::read_dir(actor.path()) else {
                continue;
            };
            let folder = actor.file_name().to_string_lossy().into_owned();
            for file in files.flatten() {
                let name = format!("{folder}/{}", file.file_name().to_string_lossy());
                let old = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|written| written.elapsed().ok())
                    .is_some_and(|elapsed| elapsed >= age);
                let plain = file.file_type().is_ok_and(|t| t.is_file());
                if plain && old && !kept.contains(&name) && fs::remove_file(file.path()).is_ok() {
                    removed += 1;
                }
            }
            // Fails while anything is left in it.
            let _ = fs::remove_dir(actor.path());
        }
        removed
    }

    /// Removes object `name`'s file, and its actor's folder once empty.
    pub fn remove(&self, name: &str) {
        let Some(path) = self.path(name) else {
            return;
        };
        match fs::remove_file(&path) {
            Ok(()) => {
                // Fails while other objects (or another node's temporary file) are there.
                let _ = fs::remove_dir(path.parent().expect("in its actor's folder"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(object = %name, error = %e, "cannot remove a host object"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small whole snapshot's bytes.
    fn snapshot() -> Vec<u8> {
        let mut memory = vec![0u8; 1 << 16];
        memory[100..108].copy_from_slice(b"snapshot");
        let manifest = tern_snapshot::Manifest {
            abi_version: 1,
            module: tern_snapshot::ModuleRef {
                name: "m".into(),
                digest: "d".into(),
            },
            memory_bytes: memory.len() as u64,
            globals: Vec::new(),
            models: Vec::new(),
            sessions: Vec::new(),
            host: tern_snapshot::HostInfo {
                device: "cpu".into(),
                last_error: None,
                session_slots: 8,
                clock_unix_ms: None,
            },
            link: None,
        };
        let write = tern_snapshot::SnapshotWrite {
            manifest: &manifest,
            memory: &memory,
            kv: Vec::new(),
            changed_pages: None,
        };
        tern_snapshot::to_bytes(&write).expect("encodes")
    }

    /// A folder of its own under the temporary folder, removed when dropped.
    struct Folder(PathBuf);

    impl Folder {
        fn new(test: &str) -> Folder {
            let path = std::env::temp_dir()
                .join(format!("tern-host-objects-{}-{test}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Folder(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn an_object_written_is_read_back_mapped_and_a_removed_one_is_gone() {
        let dir = Folder::new("an_object_written_is");
        let host = HostObjects::open(&dir.path().join("objects")).unwrap();
        let bytes = snapshot();
        assert!(host.read("a1/abc").is_none());
        host.write("a1/abc", &bytes);
        assert_eq!(host.read("a1/abc").as_deref(), Some(&bytes[..]));
        // Another node of the machine opens the same folder.
        let other = HostObjects::open(&dir.path().join("objects")).unwrap();
        assert_eq!(other.read("a1/abc").as_deref(), Some(&bytes[..]));
        other.remove("a1/abc");
        assert!(host.read("a1/abc").is_none());
        assert!(
            !dir.path().join("objects/a1").exists(),
            "the empty folder goes"
        );
        host.remove("a1/abc");
    }

    #[test]
    fn a_damaged_file_is_removed_and_not_used() {
        let dir = Folder::new("a_damaged_file_is_re");
        let host = HostObjects::open(dir.path()).unwrap();
        let mut bytes = snapshot();
        bytes[120] ^= 1;
        host.write("a1/abc", &bytes);
        assert!(host.read("a1/abc").is_none());
        assert!(!dir.path().join("a1/abc").exists());
        host.write("a1/short", &snapshot()[..40]);
        assert!(host.read("a1/short").is_none());
    }

    #[test]
    fn a_sweep_removes_old_unnamed_files_only() {
        let dir = Folder::new("a_sweep_removes_old_");
        let host = HostObjects::open(&dir.path().join("objects")).unwrap();
        let bytes = snapshot();
        for name in ["a1/kept", "a1/gone", "a1/young", "a2/gone"] {
            host.write(name, &bytes);
        }
        let temporary = dir.path().join("objects/a1/.7.0.tmp");
        fs::write(&temporary, b"half").unwrap();
        // Elsewhere, reached through a link in the folder: never swept.
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::write(elsewhere.join("file"), b"mine").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("objects/a3")).unwrap();
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for path in [
            "objects/a1/kept",
            "objects/a1/gone",
            "objects/a2/gone",
            "objects/a1/.7.0.tmp",
            "elsewhere/file",
        ] {
            let file = File::options()
                .write(true)
                .open(dir.path().join(path))
                .unwrap();
            file.set_modified(long_ago).unwrap();
        }
        let kept: HashSet<String> = ["a1/kept".to_string()].into();
        assert_eq!(host.sweep(&kept, Duration::from_secs(60)), 3);
        assert!(host.read("a1/kept").is_some());
        assert!(
            host.read("a1/young").is_some(),
            "a young file may be an object just put"
        );
        assert!(host.read("a1/gone").is_none() && !temporary.exists());
        assert!(
            !dir.path().join("objects/a2").exists(),
            "an emptied folder goes"
        );
        assert!(elsewhere.join("file").exists());
    }

    #[test]
    fn names_that_would_leave_the_folder_are_never_files() {
        let dir = Folder::new("names_that_would_lea");
        let host = HostObjects::open(&dir.path().join("objects")).unwrap();
        let bytes = snapshot();
        for name in [
            "../x",
            "a/../../x",
            "a/.x",
            "/abs",
            "a",
            "a/b/c",
            ".a/b",
            "a/",
            "",
        ] {
            host.write(name, &bytes);
            assert!(host.read(name).is_none(), "{name}");
            host.remove(name);
        }
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only the folder"
        );
        assert_eq!(fs::read_dir(dir.path().join("objects")).unwrap().count(), 0);
    }
}
