"""The export fixes live in `omnicache_export.integrations.export_fixes` (one implementation, shared
with `export_transformer`); kept here for the zoo's older importers."""

from omnicache_export.integrations.export_fixes import export_friendly_tensor_ops

__all__ = ["export_friendly_tensor_ops"]
