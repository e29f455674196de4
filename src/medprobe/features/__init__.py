"""Feature extraction and the on-disk feature store."""
from medprobe.features.extract import ExtractResult, extract_features, preprocessor_for
from medprobe.features.store import FeatureStore, open_store

__all__ = ["ExtractResult", "FeatureStore", "extract_features", "open_store", "preprocessor_for"]
