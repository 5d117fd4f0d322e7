"""beit3: BEiT-3, the Multiway Transformer of "Image as a Foreign Language", with Hugging Face integration.

Importing the package registers its classes with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel

from .configuration_beit3 import Beit3Config, list_presets
from .modeling_beit3 import Beit3Model, Beit3ModelOutput, Beit3PreTrainedModel

AutoConfig.register(Beit3Config.model_type, Beit3Config, exist_ok=True)
AutoModel.register(Beit3Config, Beit3Model, exist_ok=True)

__all__ = ["Beit3Config", "Beit3Model", "Beit3ModelOutput", "Beit3PreTrainedModel", "list_presets"]
__version__ = "0.1.0"
