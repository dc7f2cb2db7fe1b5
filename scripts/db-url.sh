# Sourced by scripts that give each service its own database on the server of DATABASE_URL.

# DATABASE_URL with its database name replaced by $1 (query string kept).
db_url() {
  local base=${DATABASE_URL%%\?*}
  local query=${DATABASE_URL#"$base"}
  printf '%s/%s%s' "${base%/*}" "$1" "$query"
}
