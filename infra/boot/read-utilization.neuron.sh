read_utilization() {
  timeout 30 neuron-monitor -c /etc/tessera/neuron-monitor.json 2>/dev/null | python3 -c '
import json, sys
report = json.loads(sys.stdin.readline() or "{}")
cores = [core.get("neuroncore_utilization", 0.0)
         for runtime in report.get("neuron_runtime_data") or []
         for core in runtime.get("report", {}).get("neuroncore_counters", {})
                            .get("neuroncores_in_use", {}).values()]
print(max(cores, default=0.0))'
}
