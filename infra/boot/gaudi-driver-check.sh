# --- Gaudi: Habana's host driver must be of the trainer image's SynapseAI release (@SYNAPSE@) --------------
driver=$(timeout 60 hl-smi -Q driver_version -f csv,noheader 2>/dev/null | sed -n 1p | tr -d ' ') || driver=""
case "${driver%%-*}" in
  @SYNAPSE@.*) echo "Habana driver $driver matches the trainer image's SynapseAI @SYNAPSE@" ;;
  *) message="ERROR: Habana driver '${driver:-unknown}' is not of SynapseAI @SYNAPSE@, the trainer image's"
     message+=" release: Gaudi jobs will fail. Use an AMI with a @SYNAPSE@ driver"
     message+=" (infra/training.py GAUDI_SYNAPSE_VERSION, AMI_NAME_PATTERNS)."
     echo "$message" >&2
     logger -p user.err -t tessera-training "$message" || true ;;
esac
