"""`sentinel.yaml`: the configuration, validated once into frozen objects.

- `models`: the whole configuration (`Config`, `WorkerConfig`, ...), `load_config` and
  `parse_config`, and `ConfigError`, which lists every problem with file:line:column and
  field path;
- `base`: what every model is built from (`Frozen`, `Duration`, `parse_duration`);
- `yamlpos`: YAML loading that remembers the line and column of every value;
- `doc`: renders docs/configuration.md from the models.

Nothing is imported here: the notify and remediation packages define their own settings
models on `base`, and `models` imports those, so importing a model from the package
itself would be circular. Import from the submodules.
"""

__all__ = ["base", "doc", "models", "yamlpos"]
