args+=(--gpus all)
