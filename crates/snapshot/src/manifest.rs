//! The manifest: everything about an actor that is not memory or KV data, stored as JSON.
//!
//! Every struct refuses unknown fields, so a file from a writer that knows more than this build
//! is refused rather than half-read, and the fields version 2 added must be present (`null`
//! only where the type is an option of its own: `clock_unix_ms`). A global's bit pattern is a
//! `"0x…"` hex string, so JSON never rounds it. [`Manifest::validate`] is the one place the
//! manifest's own consistency is checked; the reader and the writer both call it. Version-1
//! manifests are read by [`crate::v1`] into these types.

use serde::{Deserialize, Serialize};

use crate::{
    MAX_CTX_TOKENS, MAX_GLOBALS, MAX_MEMORY_BYTES, MAX_NUMERICS_BYTES, MAX_SESSION_SLOTS,
    MAX_STRING_BYTES, PAGE_BYTES, SnapshotError, VERSION, check_limit, corrupt,
};

/// What a snapshot says about the actor as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Version of the host ABI the guest was running against.
    pub abi_version: u32,
    /// The Wasm module the actor instantiates.
    pub module: ModuleRef,
    /// Linear memory size in bytes; a multiple of [`PAGE_BYTES`], at most
    /// [`MAX_MEMORY_BYTES`](crate::MAX_MEMORY_BYTES).
    pub memory_bytes: u64,
    /// The module's globals, in the module's order.
    pub globals: Vec<Global>,
    /// Loaded models; the index is the actor's model handle.
    pub models: Vec<ModelRef>,
    /// Open sessions; each has one KV blob, in this order.
    pub sessions: Vec<SessionInfo>,
    /// Host-side state the guest can observe.
    pub host: HostInfo,
    /// For an incremental snapshot, the snapshot it continues; `None` for a whole one.
    /// Present (possibly `null`) from version 3.
    #[serde(deserialize_with = "nullable")]
    pub link: Option<Link>,
}

/// Where an incremental snapshot sits in its chain: a chain is a whole snapshot (depth 0)
/// followed by links, each holding only what changed since the one before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The [`digest`](crate::SnapshotView::digest) of the snapshot this one continues, as 32
    /// lowercase hex digits.
    pub parent: String,
    /// This link's place in its chain: 1 for the first link after the whole snapshot; at most
    /// [`MAX_CHAIN_LINKS`](crate::MAX_CHAIN_LINKS) − 1.
    pub depth: u32,
}

/// The Wasm module an actor runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleRef {
    pub name: String,
    /// Digest of the module's bytes as lowercase hex, computed by the caller.
    pub digest: String,
}

/// One Wasm global and its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Global {
    pub name: String,
    pub ty: ValType,
    pub mutable: bool,
    /// The value's bit pattern: `i32`/`f32` in the low 32 bits, `i64`/`f64` in the low 64,
    /// `v128` all of it. Bits above the type's width must be zero.
    #[serde(with = "hex_bits")]
    pub bits: u128,
}

/// A Wasm value type, serialized in lowercase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValType {
    I32,
    I64,
    F32,
    F64,
    V128,
}

impl ValType {
    /// Width of the type's values in bits.
    pub fn bits(self) -> u32 {
        match self {
            ValType::I32 | ValType::F32 => 32,
            ValType::I64 | ValType::F64 => 64,
            ValType::V128 => 128,
        }
    }
}

/// A model an actor has loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    pub name: String,
    /// The SHA-256 of the model's files as 64 lowercase hex digits, computed by the caller:
    /// the model's identity. `None` only in a version-1 file.
    #[serde(deserialize_with = "present")]
    pub sha256: Option<String>,
    /// The digest version 1 identified the model by (its `digest`: a sampled FNV-1a of the
    /// weights, computed by the caller), for restoring version-1 files.
    pub legacy_digest: u64,
    /// What decided the bits of the model's forward pass. `None` only in a version-1 file.
    #[serde(deserialize_with = "present")]
    pub numerics: Option<Numerics>,
    pub arch: String,
    pub n_layer: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_vocab: u32,
}

impl ModelRef {
    /// Floats per token per layer in each of K and V: `n_head_kv × head_dim`.
    pub fn kv_dim(&self) -> u64 {
        u64::from(self.n_head_kv) * u64::from(self.head_dim)
    }
}

/// What decides the bits a model's forward pass computes, as the writer describes it: two
/// runs whose numerics are equal field by field compute the same bits. Each field is at most
/// [`MAX_NUMERICS_BYTES`](crate::MAX_NUMERICS_BYTES); `backend` is not empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Numerics {
    /// Where the forward pass ran (`cpu`, `cuda`, `wgpu`).
    pub backend: String,
    /// How it rounded (`fast`, `reference`, `f32, bf16 prefill GEMMs`).
    pub precision: String,
    /// The version of the backend's kernels.
    pub kernels: String,
    /// The hardware or platform the results depend on (`x86_64-linux-gnu`, `sm_90`).
    pub architecture: String,
}

impl Numerics {
    /// The four fields by name, in order.
    pub fn fields(&self) -> [(&'static str, &str); 4] {
        [
            ("backend", &self.backend),
            ("precision", &self.precision),
            ("kernels", &self.kernels),
            ("architecture", &self.architecture),
        ]
    }
}

/// Deserializes a field that must be present and not `null` into `Some`: the fields version
/// 2 added, which are `None` only in manifests read from version 1.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// Deserializes a field that must be present but may be `null`.
fn nullable<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)
}

/// One open inference session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionInfo {
    /// The host slot the session occupies; below `host.session_slots`, distinct per session.
    pub slot: u32,
    /// Index into [`Manifest::models`].
    pub model: u32,
    /// Capacity in tokens; at most [`MAX_CTX_TOKENS`](crate::MAX_CTX_TOKENS).
    pub n_ctx: u32,
    /// Tokens whose keys and values are in the KV cache, in order; each below the model's
    /// `n_vocab`.
    pub tokens: Vec<u32>,
    /// The first position whose keys and values this snapshot stores: 0 in a whole snapshot;
    /// in a link, the positions before it are those of the same slot's session in the
    /// parent. From version 3.
    pub kv_from: u32,
    /// How the KV cache stores its values. From version 3.
    pub kv_type: KvType,
}

/// The element type of a KV cache, serialized in lowercase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    /// 32-bit IEEE floats.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
}

impl KvType {
    /// Bytes per value.
    pub fn bytes(self) -> u64 {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }

    /// The safetensors dtype of its KV blob: `F32`, `F16`.
    pub fn dtype(self) -> &'static str {
        match self {
            KvType::F32 => "F32",
            KvType::F16 => "F16",
        }
    }

    /// Its name in the manifest: `f32`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }
}

/// Host state the guest can observe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// Where the forward passes computed, in words (`cpu fast`), for messages; version-1 files
    /// have nothing else to tell devices apart by.
    pub device: String,
    pub last_error: Option<String>,
    /// Number of session slots; at most [`MAX_SESSION_SLOTS`](crate::MAX_SESSION_SLOTS).
    pub session_slots: u32,
    /// The actor's virtual clock: the wall-clock reading, in milliseconds since the Unix
    /// epoch, that the guest saw (templates' `strftime_now` among others), so that a restored
    /// actor sees the same time. `None` when the actor never read the clock, and in version-1
    /// files.
    #[serde(deserialize_with = "nullable")]
    pub clock_unix_ms: Option<i64>,
}

impl Manifest {
    /// Checks the manifest against the format's limits and against itself: string lengths,
    /// model digests and numerics, memory size, global count and bit widths, model indices,
    /// token counts and vocabularies, distinct session slots. It does not look at the
    /// sections; [`parse`](crate::parse) checks those against the manifest.
    ///
    /// This is the check of a manifest that can be written: as [`VERSION`] requires, every
    /// model has its `sha256` and `numerics` (a manifest read from a version-1 file has
    /// neither, and is refused here).
    pub fn validate(&self) -> Result<(), SnapshotError> {
        self.validate_as(VERSION)
    }

    /// [`validate`](Self::validate) for a manifest of format `version`: version 1 lacks each
    /// model's `sha256` and `numerics`, later versions require them.
    pub(crate) fn validate_as(&self, version: u32) -> Result<(), SnapshotError> {
        check_string("module name", &self.module.name)?;
        check_string("module digest", &self.module.digest)?;
        let digest = self.module.digest.as_bytes();
        if digest.is_empty()
            || !digest
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(corrupt(format!(
                "module digest {:?} is not lowercase hex",
                self.module.digest
            )));
        }

        check_limit("memory_bytes", self.memory_bytes, MAX_MEMORY_BYTES)?;
        if !self.memory_bytes.is_multiple_of(PAGE_BYTES as u64) {
            return Err(corrupt(format!(
                "memory_bytes {} is not a multiple of the page size {PAGE_BYTES}",
                self.memory_bytes
            )));
        }

        check_limit("global count", self.globals.len() as u64, MAX_GLOBALS)?;
        for (i, global) in self.globals.iter().enumerate() {
            check_string("global name", &global.name)?;
            let width = global.ty.bits();
            if width < 128 && global.bits >> width != 0 {
                return Err(corrupt(format!(
                    "global {i} ({:?}) is {:?} but its bits {:#x} do not fit in {width} bits",
                    global.name, global.ty, global.bits
                )));
            }
        }

        for (i, model) in self.models.iter().enumerate() {
            check_string("model name", &model.name)?;
            check_string("model arch", &model.arch)?;
            model.validate(i, version)?;
        }

        check_string("host device", &self.host.device)?;
        if let Some(error) = &self.host.last_error {
            check_string("host last_error", error)?;
        }
        check_limit(
            "host session_slots",
            u64::from(self.host.session_slots),
            u64::from(MAX_SESSION_SLOTS),
        )?;
        self.validate_link()?;
        self.validate_sessions()
    }

    fn validate_link(&self) -> Result<(), SnapshotError> {
        let Some(link) = &self.link else {
            if let Some(i) = self.sessions.iter().position(|s| s.kv_from != 0) {
                return Err(corrupt(format!(
                    "session {i} stores keys and values from position {}, but a whole snapshot stores them from 0",
                    self.sessions[i].kv_from
                )));
            }
            return Ok(());
        };
        if crate::chain::parse_digest(&link.parent).is_none() {
            let shown: String = link.parent.chars().take(80).collect();
            return Err(corrupt(format!(
                "link parent {shown:?} is not 32 lowercase hex digits"
            )));
        }
        if link.depth == 0 || link.depth >= crate::MAX_CHAIN_LINKS {
            return Err(corrupt(format!(
                "link depth {} is not between 1 and {}",
                link.depth,
                crate::MAX_CHAIN_LINKS - 1
            )));
        }
        Ok(())
    }

    fn validate_sessions(&self) -> Result<(), SnapshotError> {
        // session_slots <= 64, so one bit per slot fits in a u64.
        let mut used_slots = 0u64;
        for (i, session) in self.sessions.iter().enumerate() {
            if session.slot >= self.host.session_slots {
                return Err(corrupt(format!(
                    "session {i} uses slot {} but the host has {} slots",
                    session.slot, self.host.session_slots
                )));
            }
            let bit = 1u64 << session.slot;
            if used_slots & bit != 0 {
                return Err(corrupt(format!(
                    "session {i} uses slot {} which another session already uses",
                    session.slot
                )));
            }
            used_slots |= bit;

            let Some(model) = self.models.get(session.model as usize) else {
                return Err(corrupt(format!(
                    "session {i} uses model {} but there are {} models",
                    session.model,
                    self.models.len()
                )));
            };
            check_limit(
                "session n_ctx",
                u64::from(session.n_ctx),
                u64::from(MAX_CTX_TOKENS),
            )?;
            if session.tokens.len() as u64 > u64::from(session.n_ctx) {
                return Err(corrupt(format!(
                    "session {i} holds {} tokens but its capacity n_ctx is {}",
                    session.tokens.len(),
                    session.n_ctx
                )));
            }
            if session.kv_from as usize > session.tokens.len() {
                return Err(corrupt(format!(
                    "session {i} stores keys and values from position {} but holds {} tokens",
                    session.kv_from,
                    session.tokens.len()
                )));
            }
            if let Some(pos) = session.tokens.iter().position(|&t| t >= model.n_vocab) {
                return Err(corrupt(format!(
                    "session {i} token {pos} is {} but model {} has a vocabulary of {}",
                    session.tokens[pos], session.model, model.n_vocab
                )));
            }
        }
        Ok(())
    }
}

impl ModelRef {
    /// Checks model `i`'s digest and numerics as format `version` requires them.
    fn validate(&self, i: usize, version: u32) -> Result<(), SnapshotError> {
        let name = &self.name;
        match (&self.sha256, version) {
            (None, 1) => {}
            (None, _) => {
                return Err(corrupt(format!(
                    "model {i} ({name:?}) has no sha256: version {version} requires one (only a version-1 file lacks it)"
                )));
            }
            (Some(sha256), _) => {
                let hex = sha256.as_bytes();
                if hex.len() != 64 || !hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    let shown: String = sha256.chars().take(80).collect();
                    return Err(corrupt(format!(
                        "model {i} ({name:?}) sha256 {shown:?} is not 64 lowercase hex digits"
                    )));
                }
            }
        }
        match (&self.numerics, version) {
            (None, 1) => Ok(()),
            (None, _) => Err(corrupt(format!(
                "model {i} ({name:?}) has no numerics: version {version} requires them (only a version-1 file lacks them)"
            ))),
            (Some(numerics), _) => {
                for (field, value) in numerics.fields() {
                    check_limit(
                        "model numerics field",
                        value.len() as u64,
                        MAX_NUMERICS_BYTES,
                    )?;
                    if field == "backend" && value.is_empty() {
                        return Err(corrupt(format!(
                            "model {i} ({name:?}) numerics name no backend"
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

fn check_string(what: &'static str, value: &str) -> Result<(), SnapshotError> {
    check_limit(what, value.len() as u64, MAX_STRING_BYTES)
}

/// `u128` as a `"0x…"` string of lowercase hex digits, shortest form when writing.
mod hex_bits {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bits: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{bits:#x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).ok_or_else(|| {
            D::Error::custom(format!(
                "global bits {text:?} are not \"0x\" and 1 to 32 lowercase hex digits"
            ))
        })
    }

    pub(super) fn parse(text: &str) -> Option<u128> {
        let digits = text.strip_prefix("0x")?;
        let valid = matches!(digits.len(), 1..=32)
            && digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return None;
        }
        u128::from_str_radix(digits, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            abi_version: 3,
            module: ModuleRef {
                name: "chat".into(),
                digest: "00ff".into(),
            },
            memory_bytes: 2 * PAGE_BYTES as u64,
            globals: vec![Global {
                name: "__stack_pointer".into(),
                ty: ValType::I32,
                mutable: true,
                bits: 0x1_0000,
            }],
            models: vec![ModelRef {
                name: "tiny".into(),
                sha256: Some("ab".repeat(32)),
                legacy_digest: u64::MAX,
                numerics: Some(Numerics {
                    backend: "cpu".into(),
                    precision: "fast".into(),
                    kernels: "1".into(),
                    architecture: "x86_64-linux-gnu".into(),
                }),
                arch: "llama".into(),
                n_layer: 2,
                n_head_kv: 2,
                head_dim: 4,
                n_vocab: 100,
            }],
            sessions: vec![SessionInfo {
                slot: 1,
                model: 0,
                n_ctx: 8,
                tokens: vec![1, 2, 99],
                kv_from: 0,
                kv_type: KvType::F32,
            }],
            host: HostInfo {
                device: "cpu".into(),
                last_error: None,
                session_slots: 4,
                clock_unix_ms: Some(-1),
            },
            link: None,
        }
    }

    #[test]
    fn json_round_trip_keeps_every_bit() {
        let mut m = manifest();
        m.globals.push(Global {
            name: "v".into(),
            ty: ValType::V128,
            mutable: false,
            bits: u128::MAX - 1,
        });
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#""bits":"0xfffffffffffffffffffffffffffffffe""#),
            "{json}"
        );
        assert!(json.contains(r#""ty":"v128""#), "{json}");
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }

    #[test]
    fn hex_bits_refuses_malformed() {
        assert_eq!(hex_bits::parse("0x0"), Some(0));
        assert_eq!(hex_bits::parse("0xdeadbeef"), Some(0xdead_beef));
        for bad in [
            "",
            "0x",
            "dead",
            "0X1",
            "0xABC",
            "0x+1",
            "0x-1",
            "0x 1",
            &"f".repeat(33),
        ] {
            assert_eq!(hex_bits::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn version_2_fields_must_be_present() {
        let json = serde_json::to_value(manifest()).unwrap();
        for (path, field) in [
            ("/models/0", "sha256"),
            ("/models/0", "legacy_digest"),
            ("/models/0", "numerics"),
            ("/models/0/numerics", "kernels"),
            ("/host", "clock_unix_ms"),
        ] {
            let mut missing = json.clone();
            missing
                .pointer_mut(path)
                .and_then(|v| v.as_object_mut())
                .unwrap()
                .remove(field);
            let err = serde_json::from_value::<Manifest>(missing).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("missing field `{field}`")),
                "{err}"
            );
        }
        for field in ["sha256", "numerics"] {
            let mut null = json.clone();
            null["models"][0][field] = serde_json::Value::Null;
            assert!(serde_json::from_value::<Manifest>(null).is_err(), "{field}");
        }
        let mut no_clock = json.clone();
        no_clock["host"]["clock_unix_ms"] = serde_json::Value::Null;
        let read: Manifest = serde_json::from_value(no_clock).unwrap();
        assert_eq!(read.host.clock_unix_ms, None);
        let mut no_error = json.clone();
        no_error["host"]
            .as_object_mut()
            .unwrap()
            .remove("last_error");
        assert!(serde_json::from_value::<Manifest>(no_error).is_ok());
    }

    #[test]
    fn validate_requires_the_version_2_fields_except_for_version_1() {
        let mut m = manifest();
        m.models[0].sha256 = None;
        let err = m.validate().unwrap_err();
        assert!(err.to_string().contains("has no sha256"), "{err}");
        m.models[0].numerics = None;
        m.validate_as(1).unwrap();
        m.models[0].sha256 = Some("00".repeat(32));
        let err = m.validate().unwrap_err();
        assert!(err.to_string().contains("has no numerics"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = serde_json::to_string(&manifest()).unwrap();
        let extra = json.replacen('{', r#"{"future":1,"#, 1);
        let err = serde_json::from_str::<Manifest>(&extra).unwrap_err();
        assert!(err.to_string().contains("unknown field `future`"), "{err}");
    }

    /// An in-place change to a manifest.
    type Mutation = fn(&mut Manifest);

    #[test]
    fn validate_accepts_the_fixture() {
        manifest().validate().unwrap();
    }

    #[test]
    fn validate_names_each_inconsistency() {
        let cases: Vec<(Mutation, &str)> = vec![
            (|m| m.memory_bytes += 1, "not a multiple"),
            (|m| m.module.digest = "ABC".into(), "not lowercase hex"),
            (
                |m| m.models[0].sha256 = Some("AB".repeat(32)),
                "is not 64 lowercase hex digits",
            ),
            (
                |m| m.models[0].sha256 = Some("ab".repeat(31)),
                "is not 64 lowercase hex digits",
            ),
            (
                |m| m.models[0].sha256 = Some(format!("{}g", "a".repeat(63))),
                "is not 64 lowercase hex digits",
            ),
            (
                |m| m.models[0].numerics.as_mut().unwrap().backend.clear(),
                "numerics name no backend",
            ),
            (|m| m.globals[0].bits = 1 << 32, "do not fit in 32 bits"),
            (|m| m.sessions[0].slot = 4, "host has 4 slots"),
            (|m| m.sessions[0].model = 1, "there are 1 models"),
            (|m| m.sessions[0].n_ctx = 2, "capacity n_ctx is 2"),
            (|m| m.sessions[0].tokens[0] = 100, "vocabulary of 100"),
            (
                |m| {
                    let s = m.sessions[0].clone();
                    m.sessions.push(s);
                },
                "another session already uses",
            ),
        ];
        for (mutate, expected) in cases {
            let mut m = manifest();
            mutate(&mut m);
            let err = m.validate().unwrap_err();
            assert!(matches!(err, SnapshotError::Corrupt(_)), "{err:?}");
            assert!(
                err.to_string().contains(expected),
                "{err} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn validate_enforces_limits() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                |m| m.memory_bytes = MAX_MEMORY_BYTES + 65536,
                "memory_bytes",
            ),
            (|m| m.host.session_slots = 65, "host session_slots"),
            (
                |m| m.sessions[0].n_ctx = MAX_CTX_TOKENS + 1,
                "session n_ctx",
            ),
            (|m| m.host.device = "x".repeat(64 * 1024 + 1), "host device"),
            (
                |m| m.models[0].numerics.as_mut().unwrap().architecture = "x".repeat(257),
                "model numerics field",
            ),
        ];
        for (mutate, expected) in cases {
            let mut m = manifest();
            mutate(&mut m);
            match m.validate() {
                Err(SnapshotError::TooLarge { what, .. }) => assert_eq!(what, expected),
                other => panic!("expected TooLarge for {expected}, got {other:?}"),
            }
        }
    }
}
