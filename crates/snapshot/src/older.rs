//! The manifests of versions 1 and 2, read and converted to the current [`Manifest`].
//!
//! Version 2 differs from version 3 only in what incremental snapshots added: no `link` (every
//! version-2 snapshot is whole), and sessions without `kv_from` (0) and `kv_type` (f32).
//! Version 1 differs from version 2 in a model's identity and the host state: a model has
//! `digest` (a sampled FNV-1a, now [`ModelRef::legacy_digest`]) and no `sha256` or
//! `numerics`; the host has no `clock_unix_ms`. The converted manifest has `None` for each of
//! these. Like the current types, these refuse unknown fields, so an older file carrying a
//! newer field is refused. [`ModuleRef`] and [`Global`] are shared by all versions,
//! [`ModelRef`] and [`HostInfo`] by versions 2 and 3: a change to one of them needs its older
//! copy here first.

use serde::Deserialize;

use crate::{Global, HostInfo, KvType, Manifest, ModelRef, ModuleRef, SessionInfo};

/// [`Manifest`] as version 2 wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManifestV2 {
    abi_version: u32,
    module: ModuleRef,
    memory_bytes: u64,
    globals: Vec<Global>,
    models: Vec<ModelRef>,
    sessions: Vec<SessionInfoV2>,
    host: HostInfo,
}

/// [`SessionInfo`] as versions 1 and 2 wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionInfoV2 {
    slot: u32,
    model: u32,
    n_ctx: u32,
    tokens: Vec<u32>,
}

impl From<SessionInfoV2> for SessionInfo {
    fn from(s: SessionInfoV2) -> SessionInfo {
        SessionInfo {
            slot: s.slot,
            model: s.model,
            n_ctx: s.n_ctx,
            tokens: s.tokens,
            kv_from: 0,
            kv_type: KvType::F32,
        }
    }
}

impl From<ManifestV2> for Manifest {
    fn from(v2: ManifestV2) -> Manifest {
        Manifest {
            abi_version: v2.abi_version,
            module: v2.module,
            memory_bytes: v2.memory_bytes,
            globals: v2.globals,
            models: v2.models,
            sessions: v2.sessions.into_iter().map(SessionInfo::from).collect(),
            host: v2.host,
            link: None,
        }
    }
}

/// [`Manifest`] as version 1 wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManifestV1 {
    abi_version: u32,
    module: ModuleRef,
    memory_bytes: u64,
    globals: Vec<Global>,
    models: Vec<ModelRefV1>,
    sessions: Vec<SessionInfoV2>,
    host: HostInfoV1,
}

/// [`ModelRef`] as version 1 wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRefV1 {
    name: String,
    digest: u64,
    arch: String,
    n_layer: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_vocab: u32,
}

/// [`HostInfo`] as version 1 wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostInfoV1 {
    device: String,
    last_error: Option<String>,
    session_slots: u32,
}

impl From<ManifestV1> for Manifest {
    fn from(v1: ManifestV1) -> Manifest {
        let models = v1
            .models
            .into_iter()
            .map(|m| ModelRef {
                name: m.name,
                sha256: None,
                legacy_digest: m.digest,
                numerics: None,
                arch: m.arch,
                n_layer: m.n_layer,
                n_head_kv: m.n_head_kv,
                head_dim: m.head_dim,
                n_vocab: m.n_vocab,
            })
            .collect();
        Manifest {
            abi_version: v1.abi_version,
            module: v1.module,
            memory_bytes: v1.memory_bytes,
            globals: v1.globals,
            models,
            sessions: v1.sessions.into_iter().map(SessionInfo::from).collect(),
            host: HostInfo {
                device: v1.host.device,
                last_error: v1.host.last_error,
                session_slots: v1.host.session_slots,
                clock_unix_ms: None,
            },
            link: None,
        }
    }
}

/// Reads a manifest section of a file of format `version` into the current [`Manifest`].
pub(crate) fn read_manifest(version: u32, json: &[u8]) -> Result<Manifest, serde_json::Error> {
    match version {
        1 => serde_json::from_slice::<ManifestV1>(json).map(Manifest::from),
        2 => serde_json::from_slice::<ManifestV2>(json).map(Manifest::from),
        _ => serde_json::from_slice(json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"abi_version":3,"module":{"name":"chat","digest":"00ff"},
        "memory_bytes":65536,"globals":[],
        "models":[{"name":"tiny","digest":18446744073709551615,"arch":"llama","n_layer":2,
                   "n_head_kv":2,"head_dim":4,"n_vocab":100}],
        "sessions":[],"host":{"device":"cpu fast","last_error":null,"session_slots":4}}"#;

    #[test]
    fn a_version_1_manifest_reads_with_the_new_fields_absent() {
        let m = read_manifest(1, V1.as_bytes()).unwrap();
        let model = &m.models[0];
        assert_eq!(model.legacy_digest, u64::MAX);
        assert_eq!((&model.sha256, &model.numerics), (&None, &None));
        assert_eq!(m.host.device, "cpu fast");
        assert_eq!(m.host.clock_unix_ms, None);
        m.validate_as(1).unwrap();
        // It is not a version-2 manifest.
        let err = read_manifest(2, V1.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("unknown field `digest`"), "{err}");
    }

    #[test]
    fn a_version_2_manifest_reads_as_a_whole_snapshot_and_refuses_version_3_fields() {
        let v2 = V1
            .replace(
                r#""digest":18446744073709551615"#,
                &format!(
                    r#""sha256":"{}","legacy_digest":1,"numerics":{{"backend":"cpu","precision":"fast","kernels":"1","architecture":"x"}}"#,
                    "ab".repeat(32)
                ),
            )
            .replace(r#""session_slots":4"#, r#""session_slots":4,"clock_unix_ms":null"#)
            .replace(r#""sessions":[]"#, r#""sessions":[{"slot":0,"model":0,"n_ctx":8,"tokens":[1]}]"#);
        let m = read_manifest(2, v2.as_bytes()).unwrap();
        assert_eq!(m.link, None);
        assert_eq!(
            (m.sessions[0].kv_from, m.sessions[0].kv_type),
            (0, KvType::F32)
        );
        m.validate_as(2).unwrap();
        for (from, to) in [
            (r#""host""#, r#""link":null,"host""#),
            (r#""tokens""#, r#""kv_from":0,"tokens""#),
        ] {
            let json = v2.replacen(from, to, 1);
            let err = read_manifest(2, json.as_bytes()).map(|_| ()).unwrap_err();
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
    }

    #[test]
    fn a_version_1_manifest_with_version_2_fields_is_refused() {
        for (from, to) in [
            (r#""arch""#, r#""sha256":"00","arch""#),
            (r#""session_slots""#, r#""clock_unix_ms":1,"session_slots""#),
        ] {
            let json = V1.replacen(from, to, 1);
            let err = read_manifest(1, json.as_bytes()).map(|_| ()).unwrap_err();
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
    }
}
