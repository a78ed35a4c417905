#!/usr/bin/env bash
# Runs KeyPort's real-browser test: headless Chromium (/usr/bin/chromium, apt package `chromium`)
# drives the demo portal against the real agent. Needs `cargo build -p agent -p keyport-e2e -p keyport-soft-skf` first.
# Installs the pinned npm packages from the lockfile when they are missing. Exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")"

if [[ ! -x /usr/bin/chromium && -z ${KEYPORT_CHROMIUM:-} ]]; then
    echo "run.sh: /usr/bin/chromium is missing: apt-get install chromium" >&2
    exit 1
fi
installed=$(node -p 'try { require("playwright-core/package.json").version } catch { "" }')
wanted=$(node -p 'require("./package.json").devDependencies["playwright-core"]')
if [[ $installed != "$wanted" ]]; then
    npm ci --no-audit --no-fund
fi
exec node --test --test-concurrency=1 demo.test.mjs "$@"
