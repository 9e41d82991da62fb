"""Training: config.py (YAML) · data.py (examples -> batches) · losses.py · step.py (pure step, optimizer)
· sharding.py (mesh, rules) · loop.py (jit, Orbax, resume, export)."""
