#!/bin/sh
# SeaweedFS start-up for docker/compose.cluster.yml: write the S3 identity config from the
# environment (so no key is ever written into a committed file), then run the given command,
# the image's own entrypoint.
#
# The one identity may only read, write, list and tag objects of the cluster's bucket
# ($UPSCALE_S3_BUCKET); `weed mini -bucket` creates that bucket at start-up through the filer,
# with no S3 credentials. The AWS_* variables are unset before SeaweedFS starts: with them set it
# would add a second identity, an administrator, for the same key.
set -eu

: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID in docker/cluster.env}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY in docker/cluster.env}"
: "${UPSCALE_S3_BUCKET:?set UPSCALE_S3_BUCKET}"
config="${S3_IDENTITY_CONFIG:-/etc/seaweedfs/s3.json}"

# The JSON is written by hand, so refuse what would need escaping.
for value in "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" "$UPSCALE_S3_BUCKET"; do
    case "$value" in
    *[\"\\]* | *[[:space:]]*)
        echo "seaweedfs-entrypoint: S3 keys and the bucket name may not contain quotes, backslashes or spaces" >&2
        exit 2
        ;;
    esac
done

umask 077
cat >"$config.partial" <<JSON
{
  "identities": [
    {
      "name": "upscale-server",
      "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
      "actions": [
        "Read:$UPSCALE_S3_BUCKET",
        "Write:$UPSCALE_S3_BUCKET",
        "List:$UPSCALE_S3_BUCKET",
        "Tagging:$UPSCALE_S3_BUCKET"
      ]
    }
  ]
}
JSON
mv "$config.partial" "$config"
# The image's entrypoint starts as root and drops to the seaweed user, who must read the file.
if [ "$(id -u)" = "0" ] && id seaweed >/dev/null 2>&1; then
    chown seaweed:seaweed "$config"
fi

unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
exec "$@"
