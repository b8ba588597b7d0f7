"""The case axes whose values the command line names before anything heavy is imported (the plugin's options and
its first look at ``-m``): subjects, families, scales and tiers. The tables behind them live with their modules
(subjects, families, matrix, tiers), which take their names from here."""

SUBJECTS = ("diffusers", "comfyui")
SCALES = ("tiny", "real")
TIERS = ("default", "nightly")
FAMILY_NAMES = ("qwen", "flux", "wan")
