#!/usr/bin/env bash
# Prints the home of a JDK >= 21 (Keycloak 26 needs one; the default JDK here
# may be 17). Looks at JAVA_HOME, then /usr/lib/jvm/*. Exit 1 if none.
set -euo pipefail
for home in "${JAVA_HOME:-}" /usr/lib/jvm/*; do
  [[ -n $home && -x $home/bin/java ]] || continue
  v="$("$home/bin/java" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')"
  if [[ ${v%%.*} =~ ^[0-9]+$ ]] && (( ${v%%.*} >= 21 )); then
    echo "$home"
    exit 0
  fi
done
echo "no JDK >= 21 found (looked at JAVA_HOME and /usr/lib/jvm/*)" >&2
exit 1
