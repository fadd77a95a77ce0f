#!/bin/sh
# Step 90 (Packer only): the weights from the uploaded context's model/<layer>/ folders into
# $PREFIX/model. The Containerfile COPYs each folder as its own layer instead; Packer's docker
# builder commits one layer for everything, so here the folders are merged by renaming
# their files (the upload is the only copy: no second one, no extra disk).
# With model.at = "boot" (weights.json says so) there are no weights: start.sh fetches them.
. "$(dirname "$0")/00-env.sh"

if grep -q '"at": "boot"' weights.json 2>/dev/null; then
  echo "gpubake-build: model.at = boot: no weights in the image; start.sh fetches them into the volume at boot" >&2
  exit 0
fi
[ -d model ] || die "no model/ in the build context (gpubake.images.model_layer.prepare_model places it; build-image --render-only DIR --with-model)"
mkdir -p "$PREFIX/model"
n=0
for layer in model/*/; do
  [ -d "$layer" ] || continue
  n=$((n + 1))
  (cd "$layer" && find . -type f) | while IFS= read -r f; do
    mkdir -p "$PREFIX/model/$(dirname "$f")"
    mv "$layer/$f" "$PREFIX/model/$f"
  done
done
echo "gpubake-build: $n weight layer folders moved into $PREFIX/model (one commit: Packer's docker builder makes one layer)" >&2
