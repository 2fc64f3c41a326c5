"""The policy: its schema, its typed model (backends, sections, signals, rules, scorer specs),
and loading a YAML file into it with every problem at ``file:line:column``."""
