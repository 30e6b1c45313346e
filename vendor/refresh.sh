#!/usr/bin/env bash
# Re-downloads the browser files kvql serves for GraphiQL (/graphql) and
# Swagger UI (/docs) from the npm registry, at the versions pinned below, and
# records each file's version and sha256 in vendor/VERSIONS.
#
# To move to another version: change it here, run `bash vendor/refresh.sh`,
# then update the matching constant in api/src/pages/ (the asset path carries
# the version, so browsers fetch the new files at once) and run the tests.
set -euo pipefail
cd "$(dirname "$0")"

GRAPHIQL=4.1.2      # the last GraphiQL with a standalone (UMD) build; 5.x needs a bundler
REACT=18.3.1        # React 19 ships no UMD build
SWAGGER_UI=5.35.0

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# fetch PACKAGE VERSION DEST FILE...: unpacks the registry tarball and copies
# FILE (a path inside the package) into DEST/.
fetch() {
    local package="$1" version="$2" dest="$3"
    shift 3
    (cd "$work" && npm pack --silent "$package@$version" >/dev/null)
    local tarball="$work/$(echo "$package" | tr -d @ | tr / -)-$version.tgz"
    rm -rf "$work/package" && tar xzf "$tarball" -C "$work"
    mkdir -p "$dest"
    for file in "$@"; do
        cp "$work/package/$file" "$dest/$(basename "$file")"
    done
}

rm -rf graphiql swagger-ui
fetch graphiql "$GRAPHIQL" graphiql graphiql.min.js graphiql.min.css
cp "$work/package/LICENSE" graphiql/LICENSE.graphiql
fetch react "$REACT" graphiql umd/react.production.min.js LICENSE
mv graphiql/LICENSE graphiql/LICENSE.react
fetch react-dom "$REACT" graphiql umd/react-dom.production.min.js LICENSE
mv graphiql/LICENSE graphiql/LICENSE.react-dom
fetch swagger-ui-dist "$SWAGGER_UI" swagger-ui swagger-ui-bundle.js swagger-ui.css \
    LICENSE swagger-ui-bundle.js.LICENSE.txt

{
    echo "# Written by vendor/refresh.sh from the npm registry; do not edit."
    echo "graphiql $GRAPHIQL"
    echo "react $REACT"
    echo "react-dom $REACT"
    echo "swagger-ui-dist $SWAGGER_UI"
    echo
    find graphiql swagger-ui -type f | LC_ALL=C sort | xargs sha256sum
} >VERSIONS
cat VERSIONS
