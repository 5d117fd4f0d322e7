"""beit3: BEiT-3, the Multiway Transformer of "Image as a Foreign Language", with Hugging Face integration.

Importing the package registers its classes with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_beit3 import Beit3Config, list_presets
from .image_processing_beit3 import Beit3ImageProcessor, Beit3ImageProcessorPil
from .modeling_beit3 import Beit3Model, Beit3ModelOutput, Beit3PreTrainedModel
from .modeling_heads import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForMaskedDataModeling,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
)
from .processing_beit3 import Beit3Processor
from .tokenization_beit3 import Beit3Tokenizer, check_tokenizer_matches, load_tokenizer, train_sentencepiece

AutoConfig.register(Beit3Config.model_type, Beit3Config, exist_ok=True)
AutoModel.register(Beit3Config, Beit3Model, exist_ok=True)
# Only where transformers has an Auto class for the task; the other heads load through their own class.
AutoModelForImageClassification.register(Beit3Config, Beit3ForImageClassification, exist_ok=True)
AutoModelForVisualQuestionAnswering.register(Beit3Config, Beit3ForVisualQuestionAnswering, exist_ok=True)
AutoModelForZeroShotImageClassification.register(
    Beit3Config, Beit3ForImageTextRetrieval, exist_ok=True
)  # the dual encoder, as CLIP
AutoModelForImageTextToText.register(
    Beit3Config, Beit3ForCaptioning, exist_ok=True
)  # pipeline("image-text-to-text"): captions
AutoTokenizer.register(Beit3Config, tokenizer_class=Beit3Tokenizer, exist_ok=True)
AutoImageProcessor.register(
    Beit3Config,
    image_processor_classes={"torchvision": Beit3ImageProcessor, "pil": Beit3ImageProcessorPil},
    exist_ok=True,
)
AutoProcessor.register(Beit3Config, Beit3Processor, exist_ok=True)

__all__ = [
    "Beit3Config",
    "Beit3ForCaptioning",
    "Beit3ForImageClassification",
    "Beit3ForImageTextRetrieval",
    "Beit3ForMaskedDataModeling",
    "Beit3ForVisualQuestionAnswering",
    "Beit3ForVisualReasoning",
    "Beit3ImageProcessor",
    "Beit3ImageProcessorPil",
    "Beit3Model",
    "Beit3ModelOutput",
    "Beit3PreTrainedModel",
    "Beit3Processor",
    "Beit3Tokenizer",
    "check_tokenizer_matches",
    "list_presets",
    "load_tokenizer",
    "train_sentencepiece",
]
__version__ = "0.1.0"
