for d in /dev/neuron*; do args+=(--device="$d"); done
