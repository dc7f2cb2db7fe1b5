#!/usr/bin/env bash
# Makes sure the real components the tests use are up on this machine: PostgreSQL on
# 127.0.0.1:5432 (user postgres, trust auth over TCP) and RabbitMQ on 127.0.0.1:5672 (guest/guest),
# and that Chromium with chromedriver is installed for the dashboard's browser test.
# Installs them from Debian's packages when missing. Safe to run again.
set -euo pipefail

log() { printf '[services-up] %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

pg_ok() { psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; }

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-contrib
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    log "starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  fi
  if ! pg_ok; then
    # A fresh Debian install asks for passwords over TCP: trust local TCP connections instead.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    log "setting trust auth for 127.0.0.1 in $hba"
    $SUDO sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
  fi
  pg_ok || { log "PostgreSQL is not reachable on 127.0.0.1:5432 as user postgres"; exit 1; }
  # The suite's tests run two at a time, each starting up to seven services with their own pools
  # (the process harness included): Debian's default of 100 connections is too tight for that.
  local max
  max=$(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show max_connections')
  if [ "$max" -lt 300 ]; then
    log "raising max_connections from $max to 300 (restarts PostgreSQL)"
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'alter system set max_connections = 300'
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main restart
    for _ in $(seq 1 30); do pg_ok && break; sleep 1; done
  fi
  log "PostgreSQL is up (max_connections $(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show max_connections'))"
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing RabbitMQ"
    apt_install rabbitmq-server
  fi
  if ! $SUDO rabbitmqctl -q status >/dev/null 2>&1; then
    log "starting RabbitMQ"
    $SUDO rabbitmq-server -detached || true
  fi
  # Never act on a node that has not finished booting (stream queues can be left unusable).
  $SUDO timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1 || {
    log "RabbitMQ did not finish starting"; exit 1; }
  log "RabbitMQ is up"
}

ensure_browser() {
  # The Supervisor's dashboard test drives headless Chromium through chromedriver.
  if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    log "installing Chromium and chromedriver"
    apt_install chromium chromium-driver
  fi
  command -v chromedriver >/dev/null 2>&1 || { log "chromedriver is not installed"; exit 1; }
  log "Chromium is installed ($(chromium --version 2>/dev/null | head -n 1))"
}

ensure_postgres
ensure_rabbitmq
ensure_browser
