#!/usr/bin/env bash
# Prints the Debian mirror this machine's apt sources already use (deb822 or one-line
# format), so cross builds and the emulated arm64 root fetch from the same place and no
# host name is written into the repository. Fails with one line when there is none.
set -euo pipefail
shopt -s nullglob
mirror=$(cat /dev/null /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | sed -n -E 's#^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)(https?://[^[:space:]]+/debian)/?([[:space:]].*)?$#\3#p' \
  | head -n 1 || true)
if [ -z "$mirror" ]; then
  echo "no Debian mirror (a URI ending in /debian) in /etc/apt/sources.list*" >&2
  exit 1
fi
echo "$mirror"
