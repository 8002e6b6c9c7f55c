//! The modules actors can be started from: bundled guests by name (compiled on first use)
//! and uploaded modules by the SHA-256 digest of their bytes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tern_actor::{ActorModule, Runtime};

use crate::ApiError;
use crate::actors::lock;

/// One entry of `GET /v1/modules`.
#[derive(serde::Serialize)]
pub struct ModuleInfo {
    /// The bundled guest's name, or `null` for an upload.
    pub name: Option<String>,
    /// SHA-256 of the module's bytes, once compiled.
    pub digest: Option<String>,
    /// `bundled` or `uploaded`.
    pub source: &'static str,
}

/// Bundled guests and uploaded modules, compiled once each.
pub struct Modules {
    bundled: Vec<(String, PathBuf)>,
    /// Compiled modules by bundled name and by digest.
    compiled: Mutex<HashMap<String, Arc<ActorModule>>>,
    /// Digests of uploads, in upload order.
    uploaded: Mutex<Vec<String>>,
}

impl Modules {
    pub fn new(bundled: Vec<(String, PathBuf)>) -> Modules {
        Modules {
            bundled,
            compiled: Mutex::default(),
            uploaded: Mutex::default(),
        }
    }

    /// The module a client names: a bundled guest's name, or a digest (bare or
    /// `sha256:`-prefixed). Compiles a bundled guest on first use, off the reactor.
    pub async fn find(
        &self,
        runtime: &Arc<Runtime>,
        name: &str,
    ) -> Result<(String, Arc<ActorModule>), ApiError> {
        let key = name.strip_prefix("sha256:").unwrap_or(name);
        if let Some(module) = lock(&self.compiled).get(key) {
            return Ok((key.to_string(), module.clone()));
        }
        let Some((_, path)) = self.bundled.iter().find(|(n, _)| n == name) else {
            return Err(ApiError::not_found(format!(
                "no module `{name}`: neither a bundled guest nor an uploaded digest"
            )));
        };
        let wasm = std::fs::read(path)
            .map_err(|e| ApiError::internal(format!("cannot read bundled guest `{name}`: {e}")))?;
        let module = compile(runtime, name, wasm).await?;
        let mut compiled = lock(&self.compiled);
        compiled.insert(module.digest().to_string(), module.clone());
        let module = compiled.entry(name.to_string()).or_insert(module).clone();
        Ok((name.to_string(), module))
    }

    /// Validates and compiles uploaded bytes; returns the digest and whether it is new.
    pub async fn upload(
        &self,
        runtime: &Arc<Runtime>,
        wasm: Vec<u8>,
    ) -> Result<(String, bool), ApiError> {
        let module = compile(runtime, "upload", wasm).await?;
        Ok(self.add_upload(module))
    }

    /// Compiles and lists an upload kept in the store (at recovery, off the reactor).
    pub fn add_stored(&self, runtime: &Runtime, wasm: &[u8]) -> Result<String, ApiError> {
        let module = Arc::new(ActorModule::new(runtime, "upload", wasm)?);
        Ok(self.add_upload(module).0)
    }

    /// The module a stored actor names, compiling a bundled guest if needed (at recovery,
    /// off the reactor).
    pub fn load(&self, runtime: &Runtime, name: &str) -> Result<Arc<ActorModule>, ApiError> {
        if let Some(module) = lock(&self.compiled).get(name) {
            return Ok(module.clone());
        }
        let Some((_, path)) = self.bundled.iter().find(|(n, _)| n == name) else {
            return Err(ApiError::not_found(format!("no module `{name}`")));
        };
        let wasm = std::fs::read(path)
            .map_err(|e| ApiError::internal(format!("cannot read bundled guest `{name}`: {e}")))?;
        let module = Arc::new(ActorModule::new(runtime, name, &wasm)?);
        let mut compiled = lock(&self.compiled);
        compiled.insert(module.digest().to_string(), module.clone());
        Ok(compiled.entry(name.to_string()).or_insert(module).clone())
    }

    /// Lists a compiled upload; returns its digest and whether it is new.
    fn add_upload(&self, module: Arc<ActorModule>) -> (String, bool) {
        let digest = module.digest().to_string();
        let fresh = lock(&self.compiled)
            .insert(digest.clone(), module)
            .is_none();
        let mut uploaded = lock(&self.uploaded);
        if !uploaded.contains(&digest) {
            uploaded.push(digest.clone());
        }
        (digest, fresh)
    }

    /// Bundled guests, then uploads.
    pub fn list(&self) -> Vec<ModuleInfo> {
        let compiled = lock(&self.compiled);
        let bundled = self.bundled.iter().map(|(name, _)| ModuleInfo {
            name: Some(name.clone()),
            digest: compiled.get(name).map(|m| m.digest().to_string()),
            source: "bundled",
        });
        let uploaded = lock(&self.uploaded);
        let uploads = uploaded.iter().map(|digest| ModuleInfo {
            name: None,
            digest: Some(digest.clone()),
            source: "uploaded",
        });
        bundled.chain(uploads).collect()
    }
}

/// Instruments and compiles `wasm` on a blocking worker.
async fn compile(
    runtime: &Arc<Runtime>,
    name: &str,
    wasm: Vec<u8>,
) -> Result<Arc<ActorModule>, ApiError> {
    let (runtime, name) = (runtime.clone(), name.to_string());
    tokio::task::spawn_blocking(move || ActorModule::new(&runtime, &name, &wasm))
        .await
        .map_err(|e| ApiError::internal(format!("compiling the module failed: {e}")))?
        .map(Arc::new)
        .map_err(ApiError::from)
}
