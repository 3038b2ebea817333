#!/bin/bash
# tessera training instance setup; runs at every boot and is safe to run again.
set -euo pipefail
region=@REGION@
data_volume_id=@VOLUME_ID@

# --- the trainer's state file (the idle agent reads it): /run is a tmpfs, made again at every boot ---------
install -d -m 0755 -o @TRAINER_UID@ -g @TRAINER_UID@ @STATE_DIR@

# --- data volume: wait for the attachment, format only if blank, mount ------------------------------------
find_data_device() {
  local dev
  for dev in "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${data_volume_id//-/}" @DEVICE@ /dev/xvdf; do
    if [ -b "$dev" ]; then readlink -f "$dev"; return 0; fi
  done
  return 1
}
device=""
for _ in $(seq 1 120); do device=$(find_data_device) && break; sleep 5; done
[ -n "$device" ] || { echo "data volume $data_volume_id never attached" >&2; exit 1; }
found=0
blkid -p "$device" >/dev/null 2>&1 || found=$?
if [ "$found" -eq 2 ]; then
  mkfs.ext4 -q -L tessera-data "$device"   # blkid found no file system: a new, blank volume
elif [ "$found" -ne 0 ]; then
  echo "blkid could not read $device (exit $found); refusing to format it" >&2; exit 1
fi
uuid=$(blkid -s UUID -o value "$device")
mkdir -p @DATA@
grep -q "UUID=$uuid" /etc/fstab || echo "UUID=$uuid @DATA@ ext4 defaults,nofail 0 2" >> /etc/fstab
mountpoint -q @DATA@ || mount @DATA@
# A volume grown in place (trainingDataVolumeGb raised) gets its file system grown too; a no-op otherwise.
resize2fs "$device" || echo "could not grow the file system on $device" >&2
# The trainer (its image's user) stages datasets and caches checkpoints here (TESSERA_DATA_DIR).
chown @TRAINER_UID@:@TRAINER_UID@ @DATA@

# --- CloudWatch agent: memory, disk and (NVIDIA) the GPU metrics the idle alarm reads ---------------------
agent_ctl=/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl
if [ ! -x "$agent_ctl" ]; then
  if command -v dnf >/dev/null; then
    dnf install -y amazon-cloudwatch-agent
  else
    curl -fsSL -o /tmp/amazon-cloudwatch-agent.deb \
      "https://amazoncloudwatch-agent-$region.s3.$region.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb"
    dpkg -i -E /tmp/amazon-cloudwatch-agent.deb
  fi
fi
@FILES@
"$agent_ctl" -a fetch-config -m ec2 -s -c file:/opt/aws/amazon-cloudwatch-agent/etc/tessera.json
@DRIVER_CHECK@
# --- trainer, idle agent, activity metric, idle-alarm re-arm: enabled for every boot, started now ---------
systemctl daemon-reload
systemctl --no-block enable --now @UNITS@
