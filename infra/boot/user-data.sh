#!/bin/bash
# tessera training instance (@ACCELERATOR@). cloud-init runs user data once per instance, but this box is
# stopped and started many times (and the idle alarm may stop it during its first boot): install the setup
# as a per-boot script, which cloud-init runs at every boot, and run it now.
set -euo pipefail
install -D -m 0755 /dev/stdin /var/lib/cloud/scripts/per-boot/10-tessera-training.sh <<'TESSERA_SETUP'
@SETUP@
TESSERA_SETUP
exec /var/lib/cloud/scripts/per-boot/10-tessera-training.sh
