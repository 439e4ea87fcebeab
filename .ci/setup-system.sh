#!/usr/bin/env bash
# Installs the Debian tools the tests and benchmarks use: dcmtk (storescu, echoscu,
# storescp, dsr2html), dicom3tools (dciodvfy), Orthanc and its DICOMweb plugin (a
# real PACS for the end-to-end tests, DICOM and STOW-RS) and PostgreSQL (a throwaway server for the tests of a shared
# index; the tests start their own, as the postgres user) and openssl (certificates
# for the DICOM TLS tests), libpixelmed-java (/usr/share/java/pixelmed.jar: pixelmed's
# DicomSRValidator for tests/test_conformance.py) with default-jre-headless to run
# it (libpixelmed-java does not depend on a Java runtime; pixelmed-apps, which does,
# only adds /usr/bin wrappers, and its DicomSRValidator one fails on Java 17's XPath
# limits), and chromium (the browser tests/test_web.py opens the status page in,
# driven by Playwright; nothing is downloaded at test time), fonts-dejavu-core (the
# font of the captures' captions). Idempotent; needs
# root (or sudo) and Debian's package registry.
set -euo pipefail

packages=(dcmtk dicom3tools orthanc orthanc-dicomweb postgresql openssl libpixelmed-java
    default-jre-headless chromium fonts-dejavu-core)
need=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "setup-system: ${packages[*]} already installed"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${need[@]}"
# The orthanc package starts a system-wide service where systemd runs; the tests
# start their own Orthanc on ephemeral ports, so that one is not needed.
echo "setup-system: installed ${need[*]}"
