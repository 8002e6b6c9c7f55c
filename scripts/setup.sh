# Sourced by the other scripts: installs the toolchain, components and targets that
# rust-toolchain.toml names (fast when they are present), so a fresh machine needs only rustup.
rustup toolchain install >/dev/null
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
  || rustup target add wasm32-unknown-unknown
