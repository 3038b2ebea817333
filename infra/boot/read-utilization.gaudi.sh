read_utilization() {
  timeout 30 hl-smi --query-aip=utilization.aip --format=csv,noheader,nounits | tr -d ' %'
}
