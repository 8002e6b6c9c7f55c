# Sourced by the other scripts: installs the toolchain, components and targets that
# rust-toolchain.toml names (fast when they are present), so a fresh machine needs only rustup;
# on Debian-like systems also lavapipe, Mesa's CPU Vulkan driver, so the wgpu tests run
# without a GPU.
rustup toolchain install >/dev/null
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
  || rustup target add wasm32-unknown-unknown
rustup target list --installed 2>/dev/null | grep -qx aarch64-apple-darwin \
  || rustup target add aarch64-apple-darwin
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
  $sudo apt-get install -y -q mesa-vulkan-drivers >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q mesa-vulkan-drivers >/dev/null 2>&1; } \
    || echo "setup: could not install mesa-vulkan-drivers; the wgpu tests will report themselves skipped" >&2
fi
