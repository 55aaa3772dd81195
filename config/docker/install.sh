#!/bin/sh
# Install solo-relay into a fresh virtual environment: the Dockerfile's build
# stage runs exactly this, and tests/test_deploy.py runs it in CI, so the two
# cannot drift apart.
#
#   usage: install.sh VENV SOURCE
#     VENV    where to create the virtual environment (the image: /opt/solo-relay)
#     SOURCE  a directory holding pyproject.toml, README.md and relay/
set -eu
if [ "$#" -ne 2 ]; then
    echo "usage: $0 VENV SOURCE" >&2
    exit 2
fi
venv=$1
source_dir=$2

python3 -m venv "$venv"
# A regular (not editable) install: the wheel is built from SOURCE and the
# virtual environment holds everything the relay needs at run time.
"$venv/bin/pip" install --disable-pip-version-check --no-input "$source_dir"
# The entry point exists and imports: fail the build, not the first start.
"$venv/bin/solo-relay" --version
