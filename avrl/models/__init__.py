from avrl.models.loading import load_model, load_processor
from avrl.models.processing import AudioTextProcessor

__all__ = ["AudioTextProcessor", "load_model", "load_processor"]
