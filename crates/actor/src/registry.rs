//! [`ModelRegistry`]: the models a runtime offers its actors, by name. A model is loaded once,
//! on first use (a `model_open`, a restore, or [`crate::Runtime::model`]), put on the
//! runtime's device and shared by every actor; a module that never opens a model never pays
//! for loading one.
//!
//! The first configured model also answers to `default` (unless one is itself named
//! `default`): what a guest asks for before it is told a name.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tern_compute::Device;
use tern_model::{KvType, Model, ModelError, Precision};

/// Finds a model file when it is first needed (fetching it, say); the error says why not.
pub type Locate = Arc<dyn Fn() -> Result<PathBuf, String> + Send + Sync>;

/// Where a configured model comes from.
#[derive(Clone)]
pub enum ModelSource {
    /// A GGUF file or a Hugging Face checkpoint, opened on first use.
    File(PathBuf),
    /// A file that `Locate` finds on first use.
    Located(Locate),
    /// A model already loaded (and already on the runtime's device).
    Loaded(Arc<Model>),
}

/// Why a name gave no model.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unknown model `{name}` (this host offers {offered})")]
    Unknown { name: String, offered: String },
    #[error("cannot find model `{name}`: {reason}")]
    Locate { name: String, reason: String },
    /// (The model error is in the message, not a `source()`, so that a chain of causes
    /// does not print it twice.)
    #[error("cannot load model `{name}`: {error}")]
    Load { name: String, error: ModelError },
}

impl OpenError {
    /// Whether the compute device failed (rather than a name or a file).
    pub fn is_device(&self) -> bool {
        matches!(self, OpenError::Load { error, .. } if error.is_device())
    }
}

/// How the registry opens models: on which device, with how many CPU threads and which
/// CPU precision.
#[derive(Clone)]
pub(crate) struct OpenOptions {
    pub(crate) device: Arc<dyn Device>,
    pub(crate) threads: usize,
    pub(crate) precision: Precision,
    pub(crate) kv_type: KvType,
}

struct Entry {
    name: String,
    source: ModelSource,
    /// The loaded model; the lock also makes concurrent first uses load it once.
    loaded: Mutex<Option<Arc<Model>>>,
}

/// The models a runtime's actors may open, by name. Cloning shares the same models.
#[derive(Clone)]
pub struct ModelRegistry {
    entries: Arc<[Entry]>,
    options: OpenOptions,
}

impl ModelRegistry {
    /// A registry of `models` (names distinct, checked by the builder), in order.
    pub(crate) fn new(models: Vec<(String, ModelSource)>, options: OpenOptions) -> ModelRegistry {
        let entries = models
            .into_iter()
            .map(|(name, source)| Entry {
                loaded: Mutex::new(match &source {
                    ModelSource::Loaded(model) => Some(model.clone()),
                    _ => None,
                }),
                name,
                source,
            })
            .collect();
        ModelRegistry { entries, options }
    }

    /// The configured names, in order (the first is also `default`).
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// What the registry offers, for messages: its names, or "none".
    pub fn offered(&self) -> String {
        match self.names() {
            names if names.is_empty() => "none".to_string(),
            names => names.join(", "),
        }
    }

    /// Whether `name` names a configured model (`default` included), without loading it.
    pub fn contains(&self, name: &str) -> bool {
        self.entry(name).is_some()
    }

    /// The model named `name`, loaded on first use.
    pub fn open(&self, name: &str) -> Result<Arc<Model>, OpenError> {
        let entry = self.entry(name).ok_or_else(|| OpenError::Unknown {
            name: name.to_string(),
            offered: self.offered(),
        })?;
        let mut loaded = entry.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = &*loaded {
            return Ok(model.clone());
        }
        let model = self.load(entry)?;
        *loaded = Some(model.clone());
        Ok(model)
    }

    /// Every model loaded so far.
    pub fn loaded(&self) -> Vec<Arc<Model>> {
        self.entries
            .iter()
            .filter_map(|e| e.loaded.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .or_else(|| (name == "default").then(|| self.entries.first()).flatten())
    }

    fn load(&self, entry: &Entry) -> Result<Arc<Model>, OpenError> {
        let name = || entry.name.clone();
        let path = match &entry.source {
            ModelSource::File(path) => path.clone(),
            ModelSource::Located(locate) => locate().map_err(|reason| OpenError::Locate {
                name: name(),
                reason,
            })?,
            ModelSource::Loaded(model) => return Ok(model.clone()),
        };
        let o = &self.options;
        Model::open(&entry.name, &path, o.threads)
            .map(|m| m.with_precision(o.precision).with_kv_type(o.kv_type))
            .and_then(|m| m.on_device(&o.device))
            .map(Arc::new)
            .map_err(|error| OpenError::Load {
                name: name(),
                error,
            })
    }
}
