"""`philora sweep`: a hyper-parameter search over config keys, each trial a real `philora train` run (Optuna)."""
