#!/usr/bin/env bash
# A screenshot of an MLflow UI page, as a user's browser shows it: headless Chromium (Debian's
# `chromium` package) against a UI that `dgan ui` serves on 127.0.0.1.
#
#   dgan ui --port 5055 &    # prints a link per experiment
#   bash benchmarks/ui_screenshot.sh 'http://127.0.0.1:5055/#/experiments/1/runs?workflowType=machine_learning' ui.png
set -euo pipefail
url=${1:?usage: ui_screenshot.sh URL OUT.png [WIDTHxHEIGHT]}
out=${2:?usage: ui_screenshot.sh URL OUT.png [WIDTHxHEIGHT]}
size=${3:-1600x900}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "error: no Chromium found; install it (Debian: apt-get install chromium)" >&2
  exit 1
fi
# The UI is a single-page app: the virtual-time budget lets it fetch and draw the runs first.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size="${size/x/,}" --virtual-time-budget=15000 --screenshot="$out" "$url" 2>/dev/null
echo "wrote $out"
