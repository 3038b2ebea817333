# No CloudWatch agent plugin exists for this accelerator: publish its utilisation (the safety net reads it).
busiest=$(printf '%s\n' "$utilization" | sort -n | tail -n1)
[[ $busiest =~ ^[0-9.]+$ ]] || { echo "no accelerator utilisation reading" >&2; exit 1; }
aws cloudwatch put-metric-data --region "$region" --namespace '@NAMESPACE@' --metric-name '@METRIC@' \
  --unit Percent --value "$busiest" --dimensions "InstanceId=$instance_id"
