"""Help texts the commands share."""

PRESET_HELP = "Preset name (see `tlvr presets list`) or path to a YAML file."
SET_HELP = "Override a preset key: dotted.key=value (repeatable), e.g. --set optim.lr=1e-6."
RESUME_HELP = "Resume from 'auto' (the latest checkpoint in the run directory) or a checkpoint directory."
