#!/usr/bin/env bash
# Spark (the [spark] extra, tests/test_spark.py, python -m training.population) needs a Java runtime:
# Spark 4.x runs on Java 17 or 21. Exit 0 when one is on PATH; otherwise install Debian's headless JRE
# (as root, through apt-get) and check again. Called by `make test` before pytest.
set -euo pipefail

java_major() {
    # `java -version` prints e.g. 'openjdk version "17.0.15" 2025-04-15' (or "1.8.0_x" for Java 8) on stderr
    java -version 2>&1 | sed -n 's/.*version "\([0-9]*\)\.\{0,1\}\([0-9]*\).*/\1 \2/p' | head -n 1 |
        awk '{ print ($1 == 1) ? $2 : $1 }'
}

have_java() {
    command -v java > /dev/null 2>&1 || return 1
    local major
    major="$(java_major)"
    [ -n "$major" ] && [ "$major" -ge 17 ]
}

if have_java; then
    echo "ensure_java: Java $(java_major) found ($(command -v java))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo > /dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure_java: no Java >= 17 on PATH and not root: install openjdk-17-jre-headless" >&2
        exit 1
    fi
fi

echo "ensure_java: no Java >= 17 on PATH; installing a headless JRE with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian 12 ships openjdk-17; Debian 13 ships openjdk-21 only (Spark 4 runs on both)
for pkg in openjdk-17-jre-headless openjdk-21-jre-headless; do
    if apt-cache show "$pkg" > /dev/null 2>&1; then
        $SUDO apt-get install -y -qq --no-install-recommends "$pkg"
        break
    fi
done
hash -r
if have_java; then
    echo "ensure_java: Java $(java_major) installed ($(command -v java))"
    exit 0
fi
echo "ensure_java: could not install a Java >= 17 runtime" >&2
exit 1
