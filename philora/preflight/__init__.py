"""`philora check`: every check that needs no training, in seconds, before the expensive part starts.

architecture.py builds the model from its config on the meta device with LoRA applied; memory.py estimates one
step's peak memory; tokens.py judges the template and the eos/pad/end-of-turn tokens; report.py gathers findings
and prints them; command.py is the command, and `gate` what `philora train` runs first. It sits below train/,
which imports it; --time's real steps are train/trial.py's.
"""
