#!/bin/sh
# The images' entrypoint: runs the command it is given (by default `diffusion-studio serve --host 0.0.0.0 ...`;
# also `diffusion-studio users ...` and the compose file's `ray start ...`). Before `serve` it looks after users,
# which `serve` requires on a non-loopback address:
#   STUDIO_ADMIN_PASSWORD_FILE=/run/secrets/admin_password  (a Docker secret, mounted at run time): the admin
#       STUDIO_ADMIN_USER (default admin) gets that password at every start, so changing the secret and
#       restarting changes the password; the admin's API tokens are kept.
#   otherwise, with no users file yet, it says how to create the first user; `serve` then refuses to start.
set -eu

if [ "${1:-}" = "diffusion-studio" ] && [ "${2:-}" = "serve" ]; then
    if [ -n "${STUDIO_ADMIN_PASSWORD_FILE:-}" ]; then
        if [ ! -r "$STUDIO_ADMIN_PASSWORD_FILE" ]; then
            echo "studio-entrypoint: STUDIO_ADMIN_PASSWORD_FILE=$STUDIO_ADMIN_PASSWORD_FILE is not a readable file" >&2
            exit 2
        fi
        diffusion-studio users add "${STUDIO_ADMIN_USER:-admin}" --admin --password-stdin <"$STUDIO_ADMIN_PASSWORD_FILE"
    elif [ "${DS_AUTH:-auto}" != "off" ] && [ ! -s "${DS_USERS_FILE:-${DS_DATA_DIR:-data}/users.json}" ]; then
        cat >&2 <<'HINT'
studio-entrypoint: no users yet, and the studio requires them (it listens beyond loopback). Create the first
admin, then start again:
    docker compose run --rm --no-deps -T studio diffusion-studio users add admin --admin --password-stdin < admin-password.txt
    (docker run: docker run --rm -i -v ds-data:/data IMAGE diffusion-studio users add admin --admin --password-stdin)
or mount the admin's password as a secret file and set STUDIO_ADMIN_PASSWORD_FILE to its path.
HINT
    fi
fi

exec "$@"
