//! Model identities: [`ModelDigest`], the SHA-256 of a model's files, computed once per file
//! and cached beside it.
//!
//! A GGUF model's digest is the SHA-256 of the whole file, what `sha256sum` prints. A Hugging
//! Face checkpoint's is [`ModelDigest::of_checkpoint`] of every file that shapes the model
//! (`config.json`, `tokenizer.json`, `tokenizer_config.json` when there is one, every
//! `*.safetensors` shard): the SHA-256 of the list of `(file name, file digest)` sorted by
//! name, each entry as the name's length in bytes (`u64`, little-endian), the name's UTF-8
//! bytes and the file's 32-byte digest.
//!
//! # The cache
//!
//! Hashing reads the whole file (about 1.7 GB/s on one core with the SHA extensions: 57 ms for
//! the 98 MB default model), so the digest of a weight file of [`CACHE_MIN_BYTES`] or more is
//! kept in a small text file beside it, `<file>.tern-digest`, which takes 0.02 ms to read:
//!
//! ```text
//! tern-model-digest 1
//! bytes 98765432
//! mtime_ns 1733246567123456789
//! path /home/me/.cache/tern/models/SmolLM2-135M-Instruct.Q4_1.gguf
//! sha256 <64 lowercase hex digits>
//! ```
//!
//! An entry is used only when it is exactly these five lines (the first is the magic and the
//! format version) and its size and modification time (nanoseconds since the Unix epoch)
//! equal the file's; anything else is ignored and written anew. Entries are written to a
//! temporary file and renamed into place, so no reader sees half of one. Where the model's
//! directory is not writable, the entry goes to `$TERN_MODELS/../digests`, else
//! `$XDG_CACHE_HOME/tern/digests` or `~/.cache/tern/digests`, named after the file and the
//! SHA-256 of its canonical path, and is used there only when its `path` is that canonical
//! path; where that fails too, the digest is computed on every open.
//!
//! Guarantees: no failure of the cache fails an open (a damaged, foreign or stale entry is
//! ignored, an unwritable one skipped); an entry is never used once the file's size or
//! modification time changed. A rewrite that keeps both (which takes setting the time back
//! on purpose, `touch -d`) is not noticed: delete the `.tern-digest` file after one.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::ModelError;

/// Files smaller than this are hashed on every open and never cached: that takes at most
/// about 20 ms.
pub const CACHE_MIN_BYTES: u64 = 32 << 20;

/// Bytes handed to the hasher at a time.
const CHUNK_BYTES: usize = 16 << 20;
/// The first line of a cache entry: its magic and format version.
const ENTRY_MAGIC: &str = "tern-model-digest 1";
/// The extension a cache entry adds to the model file's name.
const ENTRY_EXTENSION: &str = "tern-digest";
/// Largest cache entry read; a longer file is not an entry.
const MAX_ENTRY_BYTES: u64 = 8 << 10;

/// The SHA-256 of a model's files (see the [module docs](self)); displayed and parsed as 64
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelDigest([u8; 32]);

impl ModelDigest {
    pub const fn from_bytes(bytes: [u8; 32]) -> ModelDigest {
        ModelDigest(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The SHA-256 of `bytes`, fed to the hasher in large chunks.
    pub fn of_bytes(bytes: &[u8]) -> ModelDigest {
        let mut hasher = Sha256::new();
        for chunk in bytes.chunks(CHUNK_BYTES) {
            hasher.update(chunk);
        }
        ModelDigest(hasher.finalize().into())
    }

    /// The SHA-256 of `bytes`, the contents of the file at `path` (its memory map), from the
    /// cache when it holds the digest of the file as it is now (see the [module docs](self)).
    pub fn of_file(path: &Path, bytes: &[u8]) -> ModelDigest {
        of_file_cached(path, bytes, CACHE_MIN_BYTES, fallback_dir().as_deref())
    }

    /// The digest of a checkpoint of several files from each file's name and digest, in any
    /// order (see the [module docs](self)).
    pub fn of_checkpoint(files: &[(String, ModelDigest)]) -> ModelDigest {
        let mut sorted: Vec<&(String, ModelDigest)> = files.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = Sha256::new();
        for (name, digest) in sorted {
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(digest.0);
        }
        ModelDigest(hasher.finalize().into())
    }
}

impl fmt::Display for ModelDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ModelDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelDigest({self})")
    }
}

impl FromStr for ModelDigest {
    type Err = ModelError;

    /// Exactly 64 lowercase hex digits.
    fn from_str(text: &str) -> Result<ModelDigest, ModelError> {
        let invalid = || {
            ModelError::Invalid(format!(
                "{text:?} is not a SHA-256 digest (64 lowercase hex digits)"
            ))
        };
        let digits = text.as_bytes();
        if digits.len() != 64 {
            return Err(invalid());
        }
        let nibble = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (nibble(pair[0]).ok_or_else(invalid)? << 4)
                | nibble(pair[1]).ok_or_else(invalid)?;
        }
        Ok(ModelDigest(bytes))
    }
}

/// A file's size and modification time: what a cache entry must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    bytes: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let meta = fs::metadata(path).ok()?;
        let mtime = meta.modified().ok()?;
        let mtime_ns = match mtime.duration_since(UNIX_EPOCH) {
            Ok(after) => i128::try_from(after.as_nanos()).ok()?,
            Err(before) => -i128::try_from(before.duration().as_nanos()).ok()?,
        };
        Some(Stamp {
            bytes: meta.len(),
            mtime_ns,
        })
    }
}

/// One cache entry.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    stamp: Stamp,
    /// The canonical path of the file, as text.
    path: String,
    digest: ModelDigest,
}

impl Entry {
    fn render(&self) -> String {
        format!(
            "{ENTRY_MAGIC}\nbytes {}\nmtime_ns {}\npath {}\nsha256 {}\n",
            self.stamp.bytes, self.stamp.mtime_ns, self.path, self.digest
        )
    }

    /// The entry `text` holds, if it is exactly one.
    fn parse(text: &str) -> Option<Entry> {
        let mut lines = text.strip_suffix('\n')?.split('\n');
        if lines.next()? != ENTRY_MAGIC {
            return None;
        }
        let mut field = |name: &str| {
            lines
                .next()?
                .strip_prefix(name)?
                .strip_prefix(' ')
                .map(str::to_string)
        };
        let bytes = field("bytes")?.parse().ok()?;
        let mtime_ns = field("mtime_ns")?.parse().ok()?;
        let path = field("path")?;
        let digest = field("sha256")?.parse().ok()?;
        if lines.next().is_some() {
            return None;
        }
        Some(Entry {
            stamp: Stamp { bytes, mtime_ns },
            path,
            digest,
        })
    }

    fn read(at: &Path) -> Option<Entry> {
        let mut text = String::new();
        fs::File::open(at)
            .ok()?
            .take(MAX_ENTRY_BYTES)
            .read_to_string(&mut text)
            .ok()?;
        Entry::parse(&text)
    }

    /// Writes the entry to `at` through a temporary file and a rename.
    fn write(&self, at: &Path) -> std::io::Result<()> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut tmp = at.as_os_str().to_os_string();
        tmp.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written = (|| {
            let mut file = fs::File::create_new(&tmp)?;
            file.write_all(self.render().as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, at)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }
}

/// Where entries go when a model's directory is not writable: `$TERN_MODELS/../digests`,
/// else `$XDG_CACHE_HOME/tern/digests` or `~/.cache/tern/digests`.
fn fallback_dir() -> Option<PathBuf> {
    if let Some(models) = std::env::var_os("TERN_MODELS") {
        return Some(PathBuf::from(models).join("../digests"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tern/digests"))
}

/// `<path>.tern-digest`.
fn entry_beside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".");
    name.push(ENTRY_EXTENSION);
    PathBuf::from(name)
}

/// `<dir>/<file name>-<16 hex digits of the SHA-256 of canonical>.tern-digest`.
fn entry_in(dir: &Path, canonical: &Path) -> PathBuf {
    let key = ModelDigest::of_bytes(canonical.as_os_str().as_encoded_bytes()).to_string();
    let name = canonical
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy());
    dir.join(format!("{name}-{}.{ENTRY_EXTENSION}", &key[..16]))
}

/// [`ModelDigest::of_file`], caching files of `min_bytes` or more beside themselves or in
/// `fallback`.
fn of_file_cached(
    path: &Path,
    bytes: &[u8],
    min_bytes: u64,
    fallback: Option<&Path>,
) -> ModelDigest {
    let stamp = Stamp::of(path);
    let Some(before) = stamp.filter(|s| s.bytes == bytes.len() as u64 && s.bytes >= min_bytes)
    else {
        // Small, or the path no longer holds these bytes: no entry can vouch for them.
        return ModelDigest::of_bytes(bytes);
    };
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let beside = entry_beside(path);
    let elsewhere = fallback.map(|dir| entry_in(dir, &canonical));
    let canonical_text = canonical.to_string_lossy().into_owned();
    if let Some(entry) = Entry::read(&beside).filter(|e| e.stamp == before) {
        return entry.digest;
    }
    if let Some(entry) = elsewhere
        .as_deref()
        .and_then(Entry::read)
        .filter(|e| e.stamp == before && e.path == canonical_text)
    {
        return entry.digest;
    }
    let digest = ModelDigest::of_bytes(bytes);
    if Stamp::of(path) != Some(before) {
        return digest; // changed while hashed: cache nothing
    }
    let entry = Entry {
        stamp: before,
        path: canonical_text,
        digest,
    };
    if entry.write(&beside).is_err()
        && let Some(at) = elsewhere
    {
        let _ = at.parent().map(fs::create_dir_all);
        let _ = entry.write(&at);
    }
    digest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory for one test.
    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tern-digest-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sha256_of_known_inputs() {
        assert_eq!(
            ModelDigest::of_bytes(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            ModelDigest::of_bytes(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = vec![7u8; CHUNK_BYTES + 3];
        let mut whole = Sha256::new();
        whole.update(&long);
        assert_eq!(
            ModelDigest::of_bytes(&long).0,
            <[u8; 32]>::from(whole.finalize())
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_malformed() {
        let d = ModelDigest::of_bytes(b"model");
        assert_eq!(d.to_string().parse::<ModelDigest>().unwrap(), d);
        let hex = d.to_string();
        for bad in [
            String::new(),
            hex[..63].to_string(),
            format!("{hex}0"),
            hex.to_uppercase(),
            format!("g{}", &hex[1..]),
            format!("+{}", &hex[1..]),
        ] {
            let err = bad.parse::<ModelDigest>().unwrap_err();
            assert!(err.to_string().contains("64 lowercase hex"), "{err}");
        }
    }

    #[test]
    fn checkpoint_digest_ignores_order_and_names_every_file() {
        let (a, b) = (ModelDigest::of_bytes(b"a"), ModelDigest::of_bytes(b"b"));
        let one = ModelDigest::of_checkpoint(&[("x".into(), a), ("y".into(), b)]);
        assert_eq!(
            one,
            ModelDigest::of_checkpoint(&[("y".into(), b), ("x".into(), a)])
        );
        assert_ne!(
            one,
            ModelDigest::of_checkpoint(&[("x".into(), b), ("y".into(), a)])
        );
        assert_ne!(one, ModelDigest::of_checkpoint(&[("x".into(), a)]));
        // The length prefix keeps a name from running into the next entry.
        assert_ne!(
            ModelDigest::of_checkpoint(&[("ab".into(), a)]),
            ModelDigest::of_checkpoint(&[("a".into(), a)])
        );
    }

    #[test]
    fn entries_parse_only_when_exact() {
        let entry = Entry {
            stamp: Stamp {
                bytes: 12,
                mtime_ns: -5,
            },
            path: "/m/x.gguf".into(),
            digest: ModelDigest::of_bytes(b"x"),
        };
        let text = entry.render();
        assert_eq!(Entry::parse(&text), Some(entry));
        for bad in [
            text.replace("digest 1", "digest 2"),
            text.replace("bytes 12", "bytes twelve"),
            text.replace("mtime_ns", "mtime"),
            format!("{text}extra\n"),
            text.trim_end().to_string(),
            text[..text.len() - 10].to_string(),
        ] {
            assert_eq!(Entry::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_cached_digest_is_used_until_the_file_changes() {
        let dir = test_dir("cache");
        let path = dir.join("m.gguf");
        fs::write(&path, b"weights one").unwrap();
        let bytes = fs::read(&path).unwrap();
        let digest = of_file_cached(&path, &bytes, 0, None);
        assert_eq!(digest, ModelDigest::of_bytes(&bytes));
        let beside = entry_beside(&path);
        let text = fs::read_to_string(&beside).unwrap();
        assert!(
            text.starts_with("tern-model-digest 1\nbytes 11\n"),
            "{text}"
        );

        // A planted entry with the file's stamp is believed: the file is not read again.
        let planted = ModelDigest::of_bytes(b"planted");
        let digest_hex = digest.to_string();
        fs::write(&beside, text.replace(&digest_hex, &planted.to_string())).unwrap();
        assert_eq!(of_file_cached(&path, &bytes, 0, None), planted);

        // A new size (or time) makes it stale: recomputed and rewritten.
        fs::write(&path, b"weights two!").unwrap();
        let bytes = fs::read(&path).unwrap();
        let digest = of_file_cached(&path, &bytes, 0, None);
        assert_eq!(digest, ModelDigest::of_bytes(&bytes));
        assert!(
            fs::read_to_string(&beside)
                .unwrap()
                .contains(&digest.to_string())
        );

        // A damaged entry is ignored and replaced.
        fs::write(&beside, b"tern-model-digest 1\nbytes").unwrap();
        assert_eq!(of_file_cached(&path, &bytes, 0, None), digest);
        assert!(Entry::read(&beside).is_some());

        // Small files are never cached.
        fs::remove_file(&beside).unwrap();
        assert_eq!(of_file_cached(&path, &bytes, 1 << 20, None), digest);
        assert!(!beside.exists());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["m.gguf"], "no temporary file is left");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_falls_back_to_the_cache_directory() {
        let dir = test_dir("fallback");
        let model = dir.join("m.gguf");
        fs::write(&model, b"weights").unwrap();
        let bytes = fs::read(&model).unwrap();
        let digest = ModelDigest::of_bytes(&bytes);
        // A non-empty directory where the entry beside would go: renaming onto it fails
        // (even for root, whom permissions do not stop).
        let beside = entry_beside(&model);
        fs::create_dir_all(beside.join("x")).unwrap();
        let cache = dir.join("cache");
        let canonical = fs::canonicalize(&model).unwrap();
        let entry_at = entry_in(&cache, &canonical);

        assert_eq!(of_file_cached(&model, &bytes, 0, Some(&cache)), digest);
        let entry = Entry::read(&entry_at).expect("an entry in the cache directory");
        assert_eq!(entry.digest, digest);
        assert_eq!(entry.path, canonical.to_string_lossy());

        // The entry there is believed...
        let planted = ModelDigest::of_bytes(b"planted");
        let planted_entry = Entry {
            digest: planted,
            ..entry
        };
        planted_entry.write(&entry_at).unwrap();
        assert_eq!(of_file_cached(&model, &bytes, 0, Some(&cache)), planted);

        // ... unless it names another path.
        let other = Entry {
            path: "/elsewhere/m.gguf".into(),
            ..planted_entry
        };
        other.write(&entry_at).unwrap();
        assert_eq!(of_file_cached(&model, &bytes, 0, Some(&cache)), digest);

        // Nothing writable anywhere (the cache directory would be under a file): still the
        // right digest.
        let nowhere = model.join("cache");
        fs::remove_dir_all(&cache).unwrap();
        assert_eq!(of_file_cached(&model, &bytes, 0, Some(&nowhere)), digest);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["m.gguf", "m.gguf.tern-digest"],
            "no temporary file is left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
