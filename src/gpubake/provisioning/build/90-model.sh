#!/bin/sh
# Step 90 (Packer only): the model weights from the context's model/ to $PREFIX/model.
# The Containerfile does this with `COPY model/ $PREFIX/model/` instead, so the weights
# are the last layer and a COPY (content-hashed) keeps the layer cache exact.
. "$(dirname "$0")/00-env.sh"

if [ ! -d model ]; then
  echo "gpubake-build: no model/ in the build context; the image fetches its model at boot"
  exit 0
fi
rm -rf "$PREFIX/model" && mkdir -p "$PREFIX" && cp -R model "$PREFIX/model"
