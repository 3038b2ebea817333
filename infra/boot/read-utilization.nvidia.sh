read_utilization() { timeout 30 nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits; }
