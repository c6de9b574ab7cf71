#!/usr/bin/env bash
# Installs the Debian packages boneflow's tests and demo use, when they are missing:
# dcmtk (storescu, echoscu, storescp), dicom3tools (dciodvfy), orthanc and its DICOMweb
# plugin (STOW-RS tests), redis-server, and docker-compose (only to check the compose
# files: no engine is needed for `docker-compose config`).
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
ls /usr/share/orthanc/plugins/*DicomWeb* >/dev/null 2>&1 || need+=(orthanc-dicomweb)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
  || need+=(docker-compose)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts Orthanc as a service on install where it can; boneflow starts its own.
  if command -v service >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
else
  echo "boneflow: please install these Debian packages (as root): apt-get install ${need[*]}" >&2
  exit 1
fi
