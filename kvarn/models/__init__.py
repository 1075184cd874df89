"""Model loading for kvarn: name/path resolution (see ``kvarn.models.resolve``) and model files."""

from kvarn.models.resolve import resolve, EMBEDDED_MODELS
