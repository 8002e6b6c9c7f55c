# Sourced by scripts/test: makes NVRTC (the CUDA 13.0 run-time compiler, which needs no GPU)
# loadable, so that the kernel compile test builds every .cu file for sm_90 on any machine.
# The library comes from NVIDIA's PyPI wheel, is unpacked once into the cache, and is put on
# LD_LIBRARY_PATH, where cudarc's loader finds `libnvrtc.so.13`. Quiet and instant once
# cached. If the wheel cannot be fetched this only warns: the compile test then reports
# itself skipped (unless TERN_REQUIRE_NVRTC=1).

tern_nvrtc_setup() {
  local package=nvidia-cuda-nvrtc version=13.0.88 cache
  if [ -n "${TERN_MODELS:-}" ]; then
    cache="$TERN_MODELS/../nvrtc"
  else
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/tern/nvrtc"
  fi
  local lib="$cache/$package-$version/lib"
  if [ ! -e "$lib/libnvrtc.so.13" ]; then
    local tmp
    tmp=$(mkdir -p "$cache" && mktemp -d "$cache/fetch.XXXXXX") || {
      echo "nvrtc.sh: cannot create $cache; CUDA kernel compile tests will be skipped" >&2
      return 0
    }
    if python3 -m pip download -q --disable-pip-version-check --timeout 20 --retries 1 \
         --no-deps --only-binary=:all: -d "$tmp" "$package==$version" >/dev/null 2>&1 \
       && python3 - "$tmp" <<'EOF'
import glob, os, sys, zipfile
tmp = sys.argv[1]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
out = os.path.join(tmp, "lib")
os.makedirs(out)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        # The library and the builtins it loads; not the `.alt` variants.
        if name.endswith((".so.13", ".so.13.0")) and ".alt." not in base:
            with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
EOF
    then
      mkdir -p "$cache/$package-$version" && rm -rf "$lib" && mv "$tmp/lib" "$lib"
    else
      echo "nvrtc.sh: could not fetch $package==$version from PyPI; CUDA kernel compile tests will be skipped" >&2
    fi
    rm -rf "$tmp"
  fi
  if [ -e "$lib/libnvrtc.so.13" ]; then
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
}
tern_nvrtc_setup
unset -f tern_nvrtc_setup
