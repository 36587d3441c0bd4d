#!/bin/sh
# Container entrypoint: seed the models volume from the weights baked into the image, then run
# `upscale-server "$@"` as PID 1 (exec), so SIGTERM reaches the server and it can drain its tasks.
#
# Why: /app/models is a volume (to keep weights you drop in, e.g. RealESRGAN_x2plus.pth, across
# upgrades), and a bind mount or an existing volume hides what the image has at that path. The
# weights converted at build time live in $BAKED_WEIGHTS_DIR instead; any of them missing from
# $UPSCALE_MODELS_DIR is copied there. Files already present are never overwritten: the server checks
# their sha256 against the manifest and converts again (offline) if one does not match.
set -eu

baked="${BAKED_WEIGHTS_DIR:-}"
models="${UPSCALE_MODELS_DIR:-}"
if [ -n "$baked" ] && [ -n "$models" ] && [ -d "$baked" ]; then
    if mkdir -p "$models" 2>/dev/null && [ -w "$models" ]; then
        for file in "$baked"/*; do
            [ -f "$file" ] || continue
            target="$models/$(basename "$file")"
            if [ ! -e "$target" ]; then
                cp "$file" "$target.partial" && mv "$target.partial" "$target"
            fi
        done
    else
        echo "upscale-entrypoint: $models is not writable by uid $(id -u), so neither this script nor" \
            "the server can put weights there: chown it to 10001:10001 (docs/operations.md)" >&2
    fi
fi

exec upscale-server "$@"
