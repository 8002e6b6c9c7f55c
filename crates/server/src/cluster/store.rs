//! The cluster as the server's [`SnapshotStore`]: the durable layer's keys mapped onto the
//! directory and the object stores.
//!
//! - `actors/{id}.json` (the record): creating it makes the directory entry (a create, so
//!   an existing actor is never overwritten) owned by this node; later writes are fenced
//!   updates.
//! - `actors/{id}.tern` (the snapshot chain): writing a whole snapshot puts the immutable
//!   object `{id}/{sha256}`, moves the entry to it (with no links) by a fenced update, then
//!   deletes the previous chain's objects; appending a link puts its object and adds it to
//!   the entry's links by a fenced update. A read (a restore) claims the actor first when
//!   this node does not own it, then reads the entry's objects, checks each one's SHA-256
//!   against its name, and lays them out as a chain file.
//! - `modules/{digest}.wasm`: an object per uploaded module.
//!
//! Deleting the record claims the actor if needed, deletes its entry on the token's
//! revision and then its snapshot; deleting the snapshot key alone does nothing (the
//! object goes with the entry).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{ActorEntry, Cluster, remote, sha256_hex};
use crate::durable::ActorRecord;
use crate::store::{SnapshotStore, StoreError, check_key, writer};

/// The cluster's directory and object stores behind the durable layer's keys.
pub struct ClusterStore(pub Arc<Cluster>);

enum Key<'a> {
    Record(&'a str),
    Snapshot(&'a str),
    Module(&'a str),
}

fn parse(key: &str) -> Result<Key<'_>, StoreError> {
    check_key(key)?;
    let actor = key.strip_prefix("actors/");
    if let Some(id) = actor.and_then(|k| k.strip_suffix(".json")) {
        return Ok(Key::Record(id));
    }
    if let Some(id) = actor.and_then(|k| k.strip_suffix(".tern")) {
        return Ok(Key::Snapshot(id));
    }
    if let Some(digest) = key
        .strip_prefix("modules/")
        .and_then(|k| k.strip_suffix(".wasm"))
    {
        return Ok(Key::Module(digest));
    }
    Err(StoreError::Key(key.to_string()))
}

/// The longest a read of an object may wait for its next chunk.
const READ_STALL: Duration = Duration::from_secs(5);
/// As [`READ_STALL`] for a move's copy ahead, which reads while the owner runs on: an
/// object its owner replaced meanwhile is deleted under the read, and the restore that
/// follows reads the newer one anyway.
const AHEAD_STALL: Duration = Duration::from_secs(1);

/// The whole object `name` and the digest it was checked against as it was read
/// (`SHA-256=` and the URL-safe base64 of the hash), or `None` if there is none; it fails
/// when no data comes for `stall`.
async fn read_object(
    store: &async_nats::jetstream::object_store::ObjectStore,
    name: &str,
    stall: Duration,
) -> Result<Option<(Vec<u8>, Option<String>)>, StoreError> {
    use async_nats::jetstream::object_store::GetErrorKind;
    let mut object = match store.get(name).await {
        Ok(object) => object,
        Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(remote(e)),
    };
    let mut bytes = Vec::with_capacity(object.info().size);
    // The client hashes what it reads and fails the read on a mismatch with the digest. An
    // object deleted while it is read (a newer snapshot replaced it) stops sending chunks
    // without an error: a read that stalls fails.
    loop {
        let read = tokio::time::timeout(stall, object.read_buf(&mut bytes))
            .await
            .map_err(|_| {
                StoreError::Remote(format!(
                    "object `{name}`: no data for {} ms (deleted while read?)",
                    stall.as_millis()
                ))
            })?;
        if read.map_err(remote)? == 0 {
            break;
        }
    }
    Ok(Some((bytes, object.info().digest.clone())))
}

/// The object-store digest of content whose SHA-256 is `hex`.
fn digest_of_hex(hex: &str) -> Option<String> {
    use base64::Engine;
    if hex.len() != 64 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..32)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    Some(format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(bytes?)
    ))
}

impl ClusterStore {
    fn put_record(&self, id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let record: ActorRecord = serde_json::from_slice(bytes).map_err(remote)?;
        let cluster = self.0.clone();
        let id = id.to_string();
        let writer = writer();
        if cluster.holds(&id) {
            return self.0.block(async move {
                cluster
                    .update_owned(&id, writer, |e| e.record = record)
                    .await?;
                Ok(())
            });
        }
        self.0.block(async move {
            let entry = ActorEntry {
                record,
                node: Some(cluster.node.clone()),
                epoch: 1,
                snapshot: None,
                links: Vec::new(),
            };
            let revision = cluster
                .actors
                .create(&id, super::encode(&entry)?)
                .await
                .map_err(remote)?;
            let token = super::Token {
                revision,
                writer,
                entry,
            };
            super::lock(&cluster.tokens).insert(id, token);
            Ok(())
        })
    }

    /// Puts `bytes` as actor `id`'s immutable object `{id}/{sha256}`, when this node holds the
    /// actor, and keeps it in the node's memory; returns its name.
    fn put_object(&self, id: &str, bytes: Bytes) -> Result<String, StoreError> {
        if !self.0.holds(id) {
            return Err(StoreError::Fenced(id.to_string()));
        }
        let name = format!("{id}/{}", sha256_hex(&bytes));
        let (snapshots, put) = (self.0.snapshots.clone(), bytes.clone());
        let meta = super::object_meta(&self.0.client, &name);
        // The machine's copy is written while the object store takes the object.
        let copy = self.0.host.clone().map(|host| {
            let (name, bytes) = (name.clone(), bytes.clone());
            std::thread::spawn(move || host.write(&name, &bytes))
        });
        let put = self.0.block(async move {
            snapshots
                .put(meta, &mut put.as_ref())
                .await
                .map_err(remote)?;
            Ok(())
        });
        if let Some(copy) = copy {
            let _ = copy.join();
            if put.is_err() {
                self.0.forget_object(&name);
            }
        }
        put?;
        self.0.objects().replace(&name, bytes);
        Ok(name)
    }

    /// Makes `bytes`, a whole snapshot, actor `id`'s chain, and deletes the old chain's
    /// objects.
    fn put_snapshot(&self, id: &str, bytes: Bytes) -> Result<(), StoreError> {
        let name = self.put_object(id, bytes)?;
        let cluster = self.0.clone();
        let (id, writer) = (id.to_string(), writer());
        self.0.block(async move {
            let (before, _) = cluster
                .update_owned(&id, writer, |e| {
                    e.snapshot = Some(name.clone());
                    e.links.clear();
                })
                .await?;
            let replaced = before.snapshot.into_iter().chain(before.links);
            for old in replaced.filter(|old| *old != name) {
                cluster.forget_object(&old);
                if let Err(e) = cluster.snapshots.delete(&old).await {
                    tracing::warn!(%id, error = %e, "cannot delete a replaced snapshot");
                }
            }
            Ok(())
        })
    }

    /// Appends `link` to actor `id`'s chain, whose layout as a chain file ends at `end`;
    /// returns where it ends now.
    fn append_link(&self, id: &str, end: u64, link: &[u8]) -> Result<u64, StoreError> {
        let name = self.put_object(id, Bytes::copy_from_slice(link))?;
        let cluster = self.0.clone();
        let (id, writer) = (id.to_string(), writer());
        self.0.block(async move {
            cluster
                .update_owned(&id, writer, |e| e.links.push(name))
                .await?;
            Ok(())
        })?;
        Ok(tern_snapshot::next_link_at(end) + link.len() as u64)
    }

    /// Actor `id`'s chain: its whole snapshot's object, then each link's, claimed first.
    fn get_chain(&self, id: &str) -> Result<Option<Vec<Bytes>>, StoreError> {
        let cluster = self.0.clone();
        let id = id.to_string();
        let writer = writer();
        self.0.block(async move {
            let Some(entry) = cluster.claim_if_needed(&id, writer).await? else {
                return Ok(None);
            };
            let Some(whole) = entry.snapshot else {
                return Ok(None);
            };
            let mut chain = Vec::new();
            for name in std::iter::once(&whole).chain(&entry.links) {
                chain.push(cluster.object(&id, name, READ_STALL).await?.0);
            }
            Ok(Some(chain))
        })
    }

    fn delete_actor(&self, id: &str) -> Result<(), StoreError> {
        let cluster = self.0.clone();
        let id = id.to_string();
        let writer = writer();
        self.0.block(async move {
            let Some(entry) = cluster.claim_if_needed(&id, writer).await? else {
                return Ok(());
            };
            let revision = super::lock(&cluster.tokens)
                .get(&id)
                .filter(|t| t.writer == writer)
                .map(|t| t.revision)
                .ok_or_else(|| StoreError::Fenced(id.clone()))?;
            cluster
                .actors
                .delete_expect_revision(&id, Some(revision))
                .await
                .map_err(|e| {
                    cluster.drop_token(&id);
                    remote(e)
                })?;
            cluster.drop_token(&id);
            for name in entry.snapshot.into_iter().chain(entry.links) {
                cluster.forget_object(&name);
                if let Err(e) = cluster.snapshots.delete(&name).await {
                    tracing::warn!(%id, error = %e, "cannot delete a deleted actor's snapshot");
                }
            }
            Ok(())
        })
    }
}

impl Cluster {
    /// Actor `id`'s snapshot object `name`, and whether it was read from the store: kept in
    /// this node's memory, else mapped from this machine's shared folder, else read from the
    /// object store ([`Self::store_object`]); then kept.
    async fn object(
        &self,
        id: &str,
        name: &str,
        stall: Duration,
    ) -> Result<(Bytes, bool), StoreError> {
        // An object is kept whole, as the one piece of its entry.
        if let Some(bytes) = self
            .objects()
            .get(name)
            .and_then(|kept| kept.first().cloned())
        {
            return Ok((bytes, false));
        }
        let (bytes, from_store) = match self.host_object(name).await {
            Some(bytes) => (bytes, false),
            None => (self.store_object(id, name, stall).await?, true),
        };
        self.objects().replace(name, bytes.clone());
        Ok((bytes, from_store))
    }

    /// Object `name` from this machine's shared folder, if it is there whole.
    async fn host_object(&self, name: &str) -> Option<Bytes> {
        let host = self.host.clone()?;
        let name = name.to_string();
        tokio::task::spawn_blocking(move || host.read(&name))
            .await
            .ok()
            .flatten()
    }

    /// Actor `id`'s object `name` read from the object store (failing if no data comes for
    /// `stall`), its content checked against the SHA-256 its name gives, and copied into
    /// this machine's shared folder, if any, on the side.
    async fn store_object(
        &self,
        id: &str,
        name: &str,
        stall: Duration,
    ) -> Result<Bytes, StoreError> {
        let Some((bytes, digest)) = read_object(&self.snapshots, name, stall).await? else {
            return Err(StoreError::Remote(format!(
                "actor `{id}`'s snapshot object {name} is missing"
            )));
        };
        // The content matched the digest as it was read; the digest must be the name's.
        let named = name.rsplit('/').next().and_then(digest_of_hex);
        if named.is_none() || named != digest {
            return Err(StoreError::Remote(format!(
                "actor `{id}`'s snapshot object {name} does not match its SHA-256"
            )));
        }
        let bytes = Bytes::from(bytes);
        if let Some(host) = self.host.clone() {
            let (name, bytes) = (name.to_string(), bytes.clone());
            tokio::task::spawn_blocking(move || host.write(&name, &bytes));
        }
        Ok(bytes)
    }

    /// Reads into this node's memory the objects of actor `id`'s chain that it does not keep
    /// yet, without claiming the actor (its owner runs on): a move's copy ahead, so that the
    /// actor's restore here reads from the store only what its owner saves after it. Returns
    /// the bytes read and the chain's objects (its whole snapshot, then each link).
    pub(crate) async fn prefetch(&self, id: &str) -> Result<(u64, Vec<Bytes>), StoreError> {
        let Some(found) = self.entry(id).await? else {
            return Err(StoreError::Missing(id.to_string()));
        };
        let (mut read, mut chain) = (0, Vec::new());
        for name in found.entry.snapshot.iter().chain(&found.entry.links) {
            let (bytes, from_store) = self.object(id, name, AHEAD_STALL).await?;
            if from_store {
                read += bytes.len() as u64;
            }
            chain.push(bytes);
        }
        Ok((read, chain))
    }

    /// The entry of actor `id`, claimed first unless `writer` holds it already; `None` when
    /// the directory has no such actor.
    async fn claim_if_needed(
        self: &Arc<Self>,
        id: &str,
        writer: u64,
    ) -> Result<Option<ActorEntry>, StoreError> {
        let held = super::lock(&self.tokens)
            .get(id)
            .filter(|t| t.writer == writer)
            .map(|t| t.entry.clone());
        match held {
            Some(entry) => Ok(Some(entry)),
            None => match self.claim(id, writer).await {
                Ok(entry) => Ok(Some(entry)),
                Err(StoreError::Missing(_)) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }
}

impl SnapshotStore for ClusterStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        match parse(key)? {
            Key::Record(id) => self.put_record(id, bytes),
            Key::Snapshot(id) => self.put_snapshot(id, Bytes::copy_from_slice(bytes)),
            Key::Module(digest) => {
                let modules = self.0.modules.clone();
                let meta = super::object_meta(&self.0.client, digest);
                let bytes = Bytes::copy_from_slice(bytes);
                self.0.block(async move {
                    modules
                        .put(meta, &mut bytes.as_ref())
                        .await
                        .map_err(remote)?;
                    Ok(())
                })
            }
        }
    }

    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match parse(key)? {
            Key::Snapshot(id) => self.put_snapshot(id, Bytes::from(bytes)),
            _ => self.put(key, &bytes),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match parse(key)? {
            Key::Record(id) => {
                let cluster = self.0.clone();
                let id = id.to_string();
                self.0.block(async move {
                    match cluster.entry(&id).await? {
                        Some(found) => serde_json::to_vec(&found.entry.record)
                            .map(Some)
                            .map_err(remote),
                        None => Ok(None),
                    }
                })
            }
            Key::Snapshot(id) => Ok(self.get_chain(id)?.map(|chain| {
                // The chain file: the whole snapshot, then each link at a multiple of 64.
                let mut file = Vec::new();
                for object in chain {
                    file.resize(tern_snapshot::next_link_at(file.len() as u64) as usize, 0);
                    file.extend_from_slice(&object);
                }
                file
            })),
            Key::Module(digest) => {
                let modules = self.0.modules.clone();
                let name = digest.to_string();
                self.0.block(async move {
                    Ok(read_object(&modules, &name, READ_STALL)
                        .await?
                        .map(|(bytes, _)| bytes))
                })
            }
        }
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        match parse(key)? {
            Key::Record(id) => self.delete_actor(id),
            Key::Snapshot(_) => Ok(()),
            Key::Module(digest) => {
                let modules = self.0.modules.clone();
                let name = digest.to_string();
                self.0.block(async move {
                    modules.delete(&name).await.map_err(remote)?;
                    Ok(())
                })
            }
        }
    }

    fn get_chain(&self, key: &str) -> Result<Option<Vec<Bytes>>, StoreError> {
        match parse(key)? {
            Key::Snapshot(id) => self.get_chain(id),
            _ => Ok(self.get(key)?.map(|bytes| vec![Bytes::from(bytes)])),
        }
    }

    fn release(&self, id: &str) -> Result<(), StoreError> {
        self.0.release(id, writer())
    }

    fn appends(&self) -> bool {
        true
    }

    fn shared(&self) -> bool {
        true
    }

    fn append(&self, key: &str, end: u64, bytes: &[u8]) -> Result<u64, StoreError> {
        match parse(key)? {
            Key::Snapshot(id) => self.append_link(id, end, bytes),
            _ => Err(StoreError::Key(format!(
                "{key}: only a snapshot chain grows"
            ))),
        }
    }

    /// The uploaded modules and every actor's record.
    fn list(&self) -> Result<Vec<String>, StoreError> {
        use futures_util::StreamExt;
        let cluster = self.0.clone();
        self.0.block(async move {
            let mut keys = Vec::new();
            let mut modules = cluster.modules.list().await.map_err(remote)?;
            while let Some(info) = modules.next().await {
                let info = info.map_err(remote)?;
                if !info.deleted {
                    keys.push(format!("modules/{}.wasm", info.name));
                }
            }
            for id in super::keys(&cluster.actors).await? {
                keys.push(format!("actors/{id}.json"));
            }
            keys.sort();
            Ok(keys)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn keys_map_onto_records_snapshots_and_modules_and_nothing_else() {
        assert!(matches!(parse("actors/a12.json"), Ok(Key::Record("a12"))));
        assert!(matches!(parse("actors/a12.tern"), Ok(Key::Snapshot("a12"))));
        assert!(matches!(parse("modules/ab.wasm"), Ok(Key::Module("ab"))));
        for bad in [
            "write-check",
            "actors/a12",
            "actors/../x.json",
            "other/a.json",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_snapshot_name_gives_the_digest_the_object_store_checks() {
        use base64::Engine;
        let bytes = b"some snapshot bytes";
        let expected = format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(Sha256::digest(bytes))
        );
        assert_eq!(digest_of_hex(&sha256_hex(bytes)), Some(expected));
        assert_eq!(digest_of_hex("not hex"), None);
        assert_eq!(digest_of_hex(&"zz".repeat(32)), None);
    }
}
