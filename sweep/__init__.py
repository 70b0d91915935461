"""The parts of run_sweep.py: the sweep YAML and its checks (config.py), the command and process of each
trial (trials.py), the offline and online controllers (offline.py, online.py), and the ranked results
(results.py)."""
