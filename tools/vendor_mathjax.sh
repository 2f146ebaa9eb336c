#!/usr/bin/env bash
# Refresh the vendored MathJax 3 bundle (SVG output: one self-contained file, no web fonts),
# so that the book's maths typesets with no network. Needs npm; run by hand, commit the result.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
(cd "$tmp" && npm pack --silent mathjax@3 >/dev/null && tar xzf mathjax-*.tgz)
mkdir -p "$here/_vendor/mathjax"
cp "$tmp/package/es5/tex-svg-full.js" "$tmp/package/LICENSE" "$here/_vendor/mathjax/"
grep '"version"' "$tmp/package/package.json" | tr -d ' ,' > "$here/_vendor/mathjax/VERSION"
rm -rf "$tmp"
