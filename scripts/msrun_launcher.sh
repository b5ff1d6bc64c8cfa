#!/usr/bin/env bash
# Upstream MindFormers' launcher path (scripts/msrun_launcher.sh): this project's is tools/msrun_launcher.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../tools/msrun_launcher.sh" "$@"
